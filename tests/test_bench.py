"""The benchmark, end to end on the tiny model (no speed assertions)."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import json

import mlx.core as mx
import pytest

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
                "mlx_lm default (int4, group 64"):
        assert row in result.stdout, row
    # MLX's own reference BLAS is the CPU's: on a GPU there is nothing to compare it with
    assert ("mlx_lm on MLX's own reference BLAS" in result.stdout) == (mx.default_device() == mx.cpu)
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"ours-reference", "ours-fast", "mlx_lm"}
    for figures in report["results"].values():
        assert figures["decode"] > 0 and figures["prefill_16"] > 0 and 0 < figures["roofline"]
        assert figures["peak_gb"] > 0
    mlx_lm = report["results"]["mlx_lm"]
    for name, figures in report["results"].items():  # each ratio is this contender's figure over mlx_lm's
        for figure in ("decode", "prefill_8", "prefill_16"):
            assert figures[f"{figure}_vs_mlx_lm"] == pytest.approx(figures[figure] / mlx_lm[figure]), (name, figure)
        roofline = report["bytes_per_token"] * figures["decode"] / (report["read_bandwidth_gbs"] * 1e9)
        assert figures["roofline"] == pytest.approx(roofline), name
    ratios = next(line for line in result.stdout.splitlines() if line.startswith("  x mlx_lm"))
    assert ratios.split()[-3:] == [f"{report['results'][k]['prefill_8_vs_mlx_lm']:.2f}"
                                   for k in report["results"]], ratios
    assert report["mlx"] == mx.__version__ and report["blas"].startswith("OpenBLAS ")
    assert report["read_bandwidth_gbs"] > 0 and report["bytes_per_token"] > 0
    for name, trials in report["trials_by_contender"].items():  # each spread is (max - min) / median of its trials
        decode = [t["decode"] for t in trials]
        assert len(trials) == 2 and report["spreads"][name]["decode"] == pytest.approx(
            (max(decode) - min(decode)) / report["results"][name]["decode"])
    assert "spread over the trials" in result.stdout
    probes = report["bandwidth_probes"]  # before and after the trials; the roofline's is the best reader's
    assert len(probes) == 2 and isinstance(report["machine_busy"], bool)
    assert report["read_bandwidth_gbs"] == max(g for p in probes for g in p["readers"].values())
    if mx.default_device() == mx.cpu:
        assert {"numpy sgemv", "sum, 1 threads"} <= set(probes[0]["readers"])
    assert ("warning: the machine was busy" in result.stdout) == report["machine_busy"]
    assert "bench --model" in report["command"] and report["mlx_lm_default_int4"]["decode"] > 0
    if mx.default_device() == mx.cpu:  # MLX's reference BLAS: the CPU's only
        assert report["mlx_lm_stock_blas"]["decode"] > 0 and report["mlx_lm_stock_blas"]["prefill_32"] > 0


def test_bench_serve_end_to_end_on_a_tiny_model(tiny_folder, tmp_path):
    """Both servers answer every level's burst, and a short request is timed alone and while 8 stream."""
    out = tmp_path / "serve.json"
    result = run_cli("bench", "--serve", "--model", str(tiny_folder), "--clients", "1,3", "--gen-tokens", "4",
                     "--trials", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for name in ("ours", "mlx_lm"):
        for n in ("1", "3"):
            figures = report["results"][name][n]
            assert figures["tokens"] == 4 * int(n) and figures["tokens_per_s"] > 0, (name, n, figures)
            assert 0 < figures["ttft_p50"] <= figures["ttft_p95"] <= figures["latency_p95"]
        short = report["short_request"][name]
        assert short["alone"] > 0 and short["ratio"] == pytest.approx(short["while_streaming"] / short["alone"])
    assert "while 8 stream" in result.stdout


def test_bench_rejects_bad_prompt_lengths():
    result = invoke("bench", "--prompt-tokens", "12,abc")
    assert result.exit_code == 2 and "whole numbers separated by commas" in result.output

