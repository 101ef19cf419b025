"""The fast BLAS: MLX's matmuls on scipy-openblas32 through blas_adapter.c, loaded in-process.

The machines that run these tests have different CPUs (some with AVX-512, some with AVX2
only). OPENBLAS_CORETYPE forces the kernels of older CPUs, so the products are checked on
Haswell (AVX2), Sandybridge (AVX) and Nehalem (SSE) kernels on every machine.
"""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import json
import os
import resource
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from conftest import HERE, assert_close, rand, run_cli, without_package
from qwen2s import blas

pytestmark = pytest.mark.usefixtures("on_cpu")  # the CPU's BLAS, also on a GPU machine


def test_mlx_runs_on_openblas_and_matmul_matches_numpy():
    assert blas.load().kind == "openblas" and blas.in_use() == "openblas", blas.load().why
    a, b = rand((300, 200), seed=1), rand((200, 150), seed=2)
    assert_close(a @ b, mx.array(np.array(a) @ np.array(b)), 1e-4, 1e-4, "float32 matmul")


def test_large_temporaries_reuse_memory_instead_of_faulting_it_in_each_call():
    """glibc returned every freed buffer of more than a few MB to the kernel: an exp over 4M floats
    faulted its temporaries in again on each call (19,500 faults, 3-4x the time)."""
    assert blas.keep_freed_memory()
    exp = mx.compile(lambda x: q.exp_of_nonpositive(x - 10.0))
    x = mx.random.normal((4_000_000,))
    for _ in range(3):
        mx.eval(exp(x))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        mx.eval(exp(x))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 1000  # 4M floats are 3,900 pages


HUGE_PAGES_PROBE = """
from qwen2s import qwen2_scratch
import re, sys, mlx.core as mx, numpy as np
from qwen2s import blas
mx.set_default_device(mx.cpu)
with blas.huge_pages_for(64 << 20):
    weights = mx.arange(16 << 20, dtype=mx.float32)  # 64 MB (mx.ones would be one float, broadcast)
    mx.eval(weights)
middle = np.frombuffer(memoryview(weights), np.float32).ctypes.data + weights.nbytes // 2  # its start may lie in
inside, held = False, None  # the heap's last 4 KB pages, before the reservation's first 2 MB boundary
for line in open("/proc/self/smaps"):
    if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        inside = start <= middle < end
    elif inside and line.startswith("AnonHugePages:"):
        held = int(line.split()[1])
later = mx.arange(16 << 20, dtype=mx.float32) + 1  # after it: malloc as before
mx.eval(later)
assert float(weights[-1]) == (16 << 20) - 1 and float(later[0]) == 1.0
print(held)
"""


def test_weights_loaded_within_huge_pages_for_lie_in_2_mb_pages():
    """A decode step streams every weight: in 4 KB pages each page's first read missed the TLB (2 MB pages decoded
    the packaged model 6-16% faster). Arrays made within huge_pages_for, in a process that starts (as every command
    does, loading its weights first), lie in huge pages where the kernel has them."""
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    run = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    held = int(run.stdout)
    # MLX's CUDA build allocates every array, a CPU one too, with CUDA's allocator, not from malloc's heap (the
    # H200: 0 KB in huge pages, THP "madvise"): there the weights are the GPU's, and weights.py asks for nothing
    in_malloc_heap = not mx.cuda.is_available()
    assert (held >= 32 << 10) if "[never]" not in thp and in_malloc_heap else held == 0, (held, thp)


def test_large_products_in_every_dtype_blas_serves_match_numpy():
    a, b = rand((256, 896), seed=1), rand((896, 4864), seed=2)  # a prefill chunk through gate_proj
    assert_close(a @ b, mx.array(np.array(a) @ np.array(b)), 1e-4, 1e-3, "float32 256x896 @ 896x4864")
    a64, b64 = np.array(rand((64, 48), seed=3), np.float64), np.array(rand((48, 32), seed=4), np.float64)
    ours = mx.matmul(mx.array(a64, mx.float64), mx.array(b64, mx.float64), stream=mx.cpu)  # dgemm
    assert np.allclose(np.array(ours), a64 @ b64, rtol=1e-12, atol=1e-12)
    c = (np.array(rand((16, 24), seed=5)) + 1j * np.array(rand((16, 24), seed=6))).astype(np.complex64)
    d = (np.array(rand((24, 8), seed=7)) + 1j * np.array(rand((24, 8), seed=8))).astype(np.complex64)
    assert np.allclose(np.array(mx.array(c) @ mx.array(d)), c @ d, rtol=1e-4, atol=1e-4)  # cgemm


@pytest.mark.parametrize("case", ["row @ W.T", "row @ W", "W @ col", "W.T @ col", "row.T @ W", "col.T^T",
                                  "dot", "batched rows", "strided row"])
def test_single_row_and_column_products_forwarded_to_gemv_match_numpy(case):
    """blas_adapter.c sends every sgemm with one row or one column to sgemv: all layouts agree."""
    W, x = rand((37, 23), seed=3), rand((1, 23), seed=4)
    y = rand((1, 37), seed=5)
    cases = {
        "row @ W.T": lambda: (x @ W.T, np.array(x) @ np.array(W).T),
        "row @ W": lambda: (y @ W, np.array(y) @ np.array(W)),
        "W @ col": lambda: (W @ x.T, np.array(W) @ np.array(x).T),
        "W.T @ col": lambda: (W.T @ y.T, np.array(W).T @ np.array(y).T),
        "row.T @ W": lambda: (y.T.T @ W, np.array(y) @ np.array(W)),
        "col.T^T": lambda: (mx.array(np.array(x).T).T @ W.T, np.array(x) @ np.array(W).T),
        "dot": lambda: (x @ x.T, np.array(x) @ np.array(x).T),
        "batched rows": lambda: (rand((3, 1, 23), seed=6) @ W.T, np.array(rand((3, 1, 23), seed=6)) @ np.array(W).T),
        "strided row": lambda: (rand((4, 46), seed=7)[:1, ::2] @ W.T,
                                np.array(rand((4, 46), seed=7))[:1, ::2] @ np.array(W).T),
    }
    ours, theirs = cases[case]()
    assert_close(ours, mx.array(theirs), 1e-5, 1e-5, case)


@pytest.mark.parametrize("rows", [2, 9, 16, 17])
@pytest.mark.parametrize("case", ["x @ W.T", "x @ W", "x.T^T @ W.T", "addmm", "strided rows"])
def test_few_row_products_computed_row_by_row_match_numpy(case, rows):
    """blas_adapter.c computes products of 2-16 rows (a batch's decode step, a verifier step) row by row: all
    layouts agree."""
    W, x, y = rand((37, 23), seed=3), rand((rows, 23), seed=4), rand((rows, 37), seed=5)
    b = rand((37,), seed=6)
    cases = {
        "x @ W.T": lambda: (x @ W.T, np.array(x) @ np.array(W).T),
        "x @ W": lambda: (y @ W, np.array(y) @ np.array(W)),
        "x.T^T @ W.T": lambda: (mx.array(np.array(x).T).T @ W.T, np.array(x) @ np.array(W).T),
        "addmm": lambda: (mx.addmm(b, x, W.T, alpha=0.5, beta=2.0),
                          0.5 * np.array(x) @ np.array(W).T + 2 * np.array(b)),
        "strided rows": lambda: (rand((rows, 46), seed=7)[:, ::2] @ W.T,
                                 np.array(rand((rows, 46), seed=7))[:, ::2] @ np.array(W).T),
    }
    ours, theirs = cases[case]()
    assert_close(ours, mx.array(theirs), 1e-5, 1e-5, case)



@pytest.mark.parametrize("layout", ["x @ W.T", "x @ W"])
def test_a_row_of_a_product_is_the_same_bits_alone_and_among_others(layout):
    """One request, one answer: a row's product does not depend on the rows beside it (1 to 16 rows, weights
    spanning several of the adapter's blocks), so a sequence decodes the same alone, in a batch, or verified."""
    W = rand((5000, 900), seed=8) if layout == "x @ W.T" else rand((900, 5000), seed=8)
    x = rand((16, 900), seed=9)
    product = (lambda a: a @ W.T) if layout == "x @ W.T" else (lambda a: a @ W)
    alone = np.concatenate([np.array(product(x[i : i + 1])) for i in range(16)])
    for rows in (2, 3, 8, 16):
        together = np.array(product(x[:rows]))
        assert np.array_equal(together, alone[:rows]), f"{rows} rows: max diff {np.abs(together - alone[:rows]).max()}"


ROWS_PROBE = """
from qwen2s import qwen2_scratch
import hashlib, mlx.core as mx, numpy as np
mx.set_default_device(mx.cpu)  # the CPU's BLAS, also on a GPU machine (a GPU's rows round by batch size)
out = []
for n, k in ((5003, 901), (4864, 896)):  # threaded products; a column tail and a K tail, and none
    W = mx.random.normal((n, k), key=mx.random.key(8)); x = mx.random.normal((64, k), key=mx.random.key(9))
    alone = np.concatenate([np.array(x[i : i + 1] @ W.T) for i in range(64)])
    exact = np.array(x, np.float64) @ np.array(W, np.float64).T
    assert np.abs(alone - exact).max() < 1e-3 * np.abs(exact).max(), "wrong products"
    for rows in (2, 3, 5, 8, 13, 16, 33, 64):
        together = np.array(x[:rows] @ W.T)
        assert np.array_equal(together, alone[:rows]), (n, k, rows, np.abs(together - alone[:rows]).max())
    out.append(hashlib.sha256(alone.tobytes()).hexdigest())
# attention: a query's scores against 3000 keys, and probabilities times values, for any number of queries; keys
# past the end (probability 0 against values 0, a cache's unfilled slots) change no bit
keys, values = (mx.random.normal((3000, 64), key=mx.random.key(s)) for s in (10, 11))
q = mx.random.normal((448, 64), key=mx.random.key(12))
p = mx.softmax(mx.random.normal((448, 3000), key=mx.random.key(13)), axis=-1)
scores = np.concatenate([np.array(q[i : i + 1] @ keys.T) for i in range(448)])
mixed = np.concatenate([np.array(p[i : i + 1] @ values) for i in range(448)])
assert np.abs(mixed - np.array(p, np.float64) @ np.array(values, np.float64)).max() < 1e-5, "wrong values"
for rows in (2, 7, 63, 64, 65, 448):
    assert np.array_equal(np.array(q[:rows] @ keys.T), scores[:rows]), ("scores", rows)
    assert np.array_equal(np.array(p[:rows] @ values), mixed[:rows]), ("values", rows)
padded = mx.concatenate([values, mx.zeros((256, 64))])
assert np.array_equal(np.array(mx.pad(p[:7], ((0, 0), (0, 256))) @ padded), mixed[:7]), "unfilled slots"
out.append(hashlib.sha256(scores.tobytes() + mixed.tobytes()).hexdigest())
print(" ".join(out))
"""


def test_few_row_kernels_and_thread_counts_give_the_same_bits():
    """Our few-row kernel and attention's: rows independent of each other under every kernel kind this CPU runs
    (AVX-512's 4x4 and AVX2's 3x4 blocks give the same bits: the same eight-lane sums; the values' sums run key
    by key, one FMA each, in both) and whatever the thread count."""
    runs = {}
    for kernel, threads, one_row in (("", "", ""), ("avx2", "", ""), ("avx2", "1", ""), ("", "3", ""),
                                     ("baseline", "", ""), ("", "", "sequential"), ("", "", "interleaved"),
                                     ("avx2", "", "interleaved"), ("baseline", "", "interleaved")):
        done = python(ROWS_PROBE, env={"QWEN2_SCRATCH_KERNEL": kernel, "QWEN2_SCRATCH_THREADS": threads,
                                       "QWEN2_SCRATCH_ONE_ROW": one_row})
        assert done.returncode == 0, (kernel, threads, one_row, done.stderr[-2000:])
        runs[kernel, threads, one_row] = done.stdout.split()
    fused = [runs[k] for k in runs if k[0] != "baseline"]
    assert all(r == fused[0] for r in fused), runs  # one row's weights read one by one or four at a time alike
    assert runs["baseline", "", ""] == runs["baseline", "", "interleaved"] and len(runs["baseline", "", ""]) == 3
    version = run_cli("--version", env={"QWEN2_SCRATCH_KERNEL": "baseline", "QWEN2_SCRATCH_THREADS": "3",
                                        "QWEN2_SCRATCH_ONE_ROW": "sequential"})
    assert "1-64 rows on our kernel, baseline 2x4, 3 threads)" in version.stdout, version.stdout + version.stderr
    version = run_cli("--version", env={"QWEN2_SCRATCH_ONE_ROW": "interleaved"})
    assert "threads, one row 4 weight rows at a time)" in version.stdout, version.stdout + version.stderr



def test_openblas_takes_only_the_free_cores():
    """On a machine with more runnable threads than cores, OpenBLAS's spinning threads thrash: a large product
    takes one thread per free core (/proc/loadavg's runnable count), or QWEN2_SCRATCH_THREADS."""
    code = """
from qwen2s import qwen2_scratch, blas
import ctypes, os, subprocess, sys, time, mlx.core as mx
mx.set_default_device(mx.cpu)  # the CPU's BLAS, also on a GPU machine
loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * os.cpu_count() + 2)]
try:
    time.sleep(1.0)
    a = mx.random.normal((64, 512)); b = mx.random.normal((512, 512))
    mx.eval(a @ b)
finally:
    for loop in loops:
        loop.kill()
print(ctypes.CDLL(str(blas.load().adapter)).qwen2_scratch_blas_sgemm_threads())
"""
    busy = python(code)
    assert busy.returncode == 0 and busy.stdout.split() == ["1"], busy.stdout + busy.stderr
    forced = python(code, env={"QWEN2_SCRATCH_THREADS": "3"})
    assert forced.returncode == 0 and forced.stdout.split() == ["3"], forced.stdout + forced.stderr

# ---------------------------------------------------------------------------------------------
# Older CPUs' kernels, forced; loading in-process; the fallbacks
# ---------------------------------------------------------------------------------------------

OLDER_CORES = ["Haswell", "Sandybridge", "Nehalem"]  # AVX2, AVX, SSE kernels


def python(code, env=None, timeout=120):
    """Run code in a fresh interpreter (cwd: the project) -> CompletedProcess."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.mark.parametrize("core", OLDER_CORES)
def test_products_on_older_cpus_kernels_match_numpy(core):
    env = {"OPENBLAS_CORETYPE": core}
    version = run_cli("--version", env=env)
    assert version.returncode == 0 and f"(core: {core};" in version.stdout, version.stdout + version.stderr
    tests = [f"{__file__}::{name}" for name in ("test_mlx_runs_on_openblas_and_matmul_matches_numpy",
                                                 "test_large_products_in_every_dtype_blas_serves_match_numpy",
                                                 "test_single_row_and_column_products_forwarded_to_gemv_match_numpy",
                                                 "test_a_row_of_a_product_is_the_same_bits_alone_and_among_others")]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=HERE,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-2000:]


@pytest.mark.packaged_model
def test_greedy_generation_is_the_same_on_older_cpus_kernels(packaged):
    args = ["generate", "--prompt", "Write a Python function that reverses a string.", "--max-tokens", "24",
            "--temp", "0", "--repetition-penalty", "1"]
    default = run_cli(*args)
    assert default.returncode == 0 and len(default.stdout) > 20, default.stderr
    for core in OLDER_CORES:
        forced = run_cli(*args, env={"OPENBLAS_CORETYPE": core})
        assert forced.returncode == 0 and forced.stdout == default.stdout, (core, forced.stdout, default.stdout)


PROBE = """
import os, sys, json
before = os.getpid()
{prelude}
from qwen2s import qwen2_scratch, blas
import mlx.core as mx, numpy as np
mx.set_default_device(mx.cpu)  # the CPU's BLAS, also on a GPU machine
a = mx.random.normal((64, 48), key=mx.random.key(1)); b = mx.random.normal((48, 80), key=mx.random.key(2))
x = mx.random.normal((1, 48), key=mx.random.key(3))
err = max(float(np.abs(np.array(a @ b) - np.array(a) @ np.array(b)).max()),
          float(np.abs(np.array(x @ b) - np.array(x) @ np.array(b)).max()))
maps = open("/proc/self/maps").read()
print(json.dumps(dict(before=before, after=os.getpid(), kind=blas.load().kind, in_use=blas.in_use(), err=err,
                      mapped="libscipy_openblas" in maps and "libqwen2_blas_adapter" in maps,
                      ld_preload=os.environ.get("LD_PRELOAD"))))
"""


def probe(prelude="", env=None):
    """(what the probe saw, the warning lines on stderr) in a fresh interpreter."""
    done = python(PROBE.format(prelude=prelude), env=env)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.strip()]
    return json.loads(done.stdout.strip().splitlines()[-1]), warnings


def test_loading_does_not_reexecute_and_maps_the_fast_blas(tmp_path):
    seen, warnings = probe(env={"XDG_CACHE_HOME": str(tmp_path)})  # a fresh cache: built here, then loaded
    assert seen["before"] == seen["after"] and seen["ld_preload"] is None
    assert seen["kind"] == "openblas" and seen["in_use"] == "openblas" and seen["mapped"], (seen, warnings)
    assert seen["err"] < 1e-4 and warnings == []
    assert list((tmp_path / "qwen2-scratch" / "blas").glob("libqwen2_blas_adapter-*.so"))


def assert_fallback(seen, warnings, words):
    assert seen["kind"] == "reference" and seen["in_use"] == "reference", seen
    assert seen["err"] < 1e-4, "the slow BLAS still computes the right products"
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and words in warnings[0], warnings


def test_fallback_without_a_c_compiler(tmp_path):
    seen, warnings = probe(env={"XDG_CACHE_HOME": str(tmp_path), "PATH": str(tmp_path / "no-bin")})
    assert_fallback(seen, warnings, "no C compiler")


def test_fallback_when_the_cache_folder_cannot_be_written(tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    seen, warnings = probe(env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert_fallback(seen, warnings, "cannot write the cache folder")


def test_fallback_without_the_library():
    seen, warnings = probe(without_package("scipy-openblas32"))
    assert_fallback(seen, warnings, "scipy-openblas32 is missing")


def test_warning_when_mlx_was_imported_first():
    seen, warnings = probe("import mlx.core")
    assert_fallback(seen, warnings, "import qwen2_scratch (or any module of ours) before mlx")


def test_opting_out_is_quiet():
    seen, warnings = probe(env={"QWEN2_SCRATCH_BLAS": "reference"})
    assert seen["kind"] == "reference" and seen["in_use"] == "reference" and warnings == []


@pytest.mark.parametrize("value", ["refrence", "x" * 1000])
def test_an_unknown_choice_is_one_warning_then_openblas(value):
    seen, warnings = probe(env={"QWEN2_SCRATCH_BLAS": value})
    assert seen["kind"] == "openblas" and seen["in_use"] == "openblas", seen
    assert len(warnings) == 1 and warnings[0].startswith("warning: QWEN2_SCRATCH_BLAS=") and len(warnings[0]) < 160


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_broken_cached_adapter_is_rebuilt(tmp_path, damage):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    probe(env=env)
    (cached,) = (tmp_path / "qwen2-scratch" / "blas").glob("libqwen2_blas_adapter-*.so")
    if damage == "truncated":
        cached.write_bytes(cached.read_bytes()[:1000])
    else:  # a real shared library, but not ours
        shutil.copy(blas.library_dir() / "libscipy_openblas.so", cached)
    seen, warnings = probe(env=env)
    assert seen["kind"] == "openblas" and seen["mapped"] and seen["err"] < 1e-4 and warnings == []
    assert blas.open_adapter(cached, cached.stem.rsplit("-", 1)[1]) is not None


def test_two_processes_building_at_once_both_get_the_adapter(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", PROBE.format(prelude="")], cwd=HERE, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and json.loads(out.splitlines()[-1])["kind"] == "openblas", err
    assert not [p for p in (tmp_path / "qwen2-scratch" / "blas").iterdir() if p.name.startswith(".")]
