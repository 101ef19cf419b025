"""The benchmark, end to end on the tiny model (no speed assertions)."""

import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import json

import mlx.core as mx
from conftest import invoke, run_cli

# ---------------------------------------------------------------------------------------------
# bench, end to end on the tiny model (no speed assertions)
# ---------------------------------------------------------------------------------------------


def test_bench_end_to_end_on_a_tiny_model(tiny_folder, tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--model", str(tiny_folder), "--prompt-tokens", "8,16", "--gen-tokens", "6",
                     "--trials", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    for row in ("prefill 8 tok/s", "prefill 16 tok/s", "decode tok/s", "% of roofline", "peak memory GB",
                "mlx_lm default (int4, group 64", "mlx_lm on MLX's own reference BLAS"):
        assert row in result.stdout, row
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"ours-reference", "ours-fast", "mlx_lm"}
    for figures in report["results"].values():
        assert figures["decode"] > 0 and figures["prefill_16"] > 0 and 0 < figures["roofline"]
        assert figures["peak_gb"] > 0
    assert report["results"]["mlx_lm"]["decode_vs_mlx_lm"] == 1.0
    assert report["mlx"] == mx.__version__ and report["blas"].startswith("OpenBLAS ")
    assert report["read_bandwidth_gbs"] > 0 and report["bytes_per_token"] > 0
    assert "bench --model" in report["command"] and report["mlx_lm_default_int4"]["decode"] > 0
    assert report["mlx_lm_stock_blas"]["decode"] > 0 and report["mlx_lm_stock_blas"]["prefill_32"] > 0


def test_bench_rejects_bad_prompt_lengths():
    result = invoke("bench", "--prompt-tokens", "12,abc")
    assert result.exit_code == 2 and "whole numbers separated by commas" in result.output

