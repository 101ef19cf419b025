"""Attention in one kernel on the CPU: attention.cpp, built by cpu_attention.py into the cache and loaded as an MLX
primitive. What it computes is tested beside the model's other layers (test_qwen2_scratch.py); here, how it is
built, found, rebuilt, and what happens where it cannot be."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import json
import os
import subprocess
import sys

import pytest

from conftest import HERE, without_package

pytestmark = pytest.mark.usefixtures("on_cpu")

PROBE = """
{prelude}
import json
from qwen2s import qwen2_scratch as q, cpu_attention
import mlx.core as mx
import numpy as np
mx.set_default_device(mx.cpu)
mx.random.seed(0)
x, k, v = mx.random.normal((1, 4, 9, 32)), mx.random.normal((1, 2, 300, 32)), mx.random.normal((1, 2, 300, 32))
start = mx.array([200], mx.int32)
reference = q.scaled_dot_product_attention(x, k, v, 0.2, q.causal_mask(9, 300, start))
runs = cpu_attention.runs_here(mx.float32, 32)
out = cpu_attention.attention(x, k, v, start, 0.2) if runs else reference
print(json.dumps({{"runs": runs, "describe": cpu_attention.describe(), "err": float(mx.abs(out - reference).max()),
                  "bits": np.array(out).tobytes().hex()}}))
"""


def probe(prelude="", env=None):
    done = subprocess.run([sys.executable, "-c", PROBE.format(prelude=prelude)], capture_output=True, text=True,
                          cwd=HERE, env={**os.environ, **(env or {})}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), [line for line in done.stderr.splitlines() if line]


def test_a_fresh_cache_builds_the_kernel_and_a_broken_build_is_built_again(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    seen, warnings = probe(env=env)
    assert seen["runs"] and seen["describe"].startswith("ours (") and seen["err"] < 1e-5 and warnings == [], seen
    (built,) = (tmp_path / "qwen2-scratch" / "attention").glob("qwen2_cpu_attention-*.so")
    built.write_bytes(built.read_bytes()[:5000])  # a build cut short (a full disk, a kill)
    again, warnings = probe(env=env)
    assert again["runs"] and again["bits"] == seen["bits"] and warnings == [], again
    assert built.stat().st_size > 5000


def test_without_nanobind_attention_is_mlx_ops_after_one_warning(tmp_path):
    seen, warnings = probe(without_package("nanobind"), env={"XDG_CACHE_HOME": str(tmp_path)})  # nothing built yet
    assert not seen["runs"] and seen["describe"] == "MLX's ops", seen
    assert len(warnings) == 1 and warnings[0].startswith("warning: attention on the CPU runs as MLX's ops"), warnings
    assert "nanobind" in warnings[0] and not (tmp_path / "qwen2-scratch" / "attention").exists()


def test_without_the_blas_adapter_the_kernel_runs_on_one_thread_and_gives_the_same_bits():
    """The blocks of queries run on the BLAS adapter's threads; without the adapter on one: each query's bits are
    its own either way."""
    pooled, _ = probe()
    alone, warnings = probe(env={"QWEN2_SCRATCH_BLAS": "reference"})
    assert "BLAS adapter" in pooled["describe"] and alone["describe"].endswith("one thread)"), (pooled, alone)
    assert alone["bits"] == pooled["bits"] and warnings == []
