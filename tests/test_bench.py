"""The benchmark, end to end on the tiny model (no speed assertions)."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import copy
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import HERE, invoke, run_cli
from qwen2s import bench

LLAMA_BENCH_OUTPUT = HERE / "testdata" / "llama-bench-F32.json"  # llama-bench -p 16,32 -n 8 -r 1 -o json, captured

# ---------------------------------------------------------------------------------------------
# bench, end to end on the tiny model (no speed assertions)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bench(tiny_folder, tmp_path_factory):
    """bench on the tiny model, two trials: (the finished process, its JSON report)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = run_cli("bench", "--model", str(tiny_folder), "--prompt-tokens", "8,16", "--gen-tokens", "6",
                     "--trials", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    return result, json.loads(out.read_text())


def test_bench_end_to_end_on_a_tiny_model(tiny_bench):
    result, report = tiny_bench
    for row in ("prefill 8 tok/s", "prefill 16 tok/s", "decode tok/s", "% of roofline", "peak memory GB",
                "mlx_lm default (int4, group 64"):
        assert row in result.stdout, row
    # MLX's own reference BLAS is the CPU's: on a GPU there is nothing to compare it with
    assert ("mlx_lm on MLX's own reference BLAS" in result.stdout) == (mx.default_device() == mx.cpu)
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
    # llama.cpp has a GGUF of the packaged model only: one line says so, in the table and the JSON
    assert report["llama_cpp"] is None and "x llama.cpp" not in result.stdout
    assert report["llama_cpp_missing"] == "llama.cpp: not timed (only the packaged model has a GGUF for it here)"
    assert report["llama_cpp_missing"] in result.stdout.splitlines() and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# llama.cpp as a contender (its build is not needed: a captured output, and a stand-in llama-bench)
# ---------------------------------------------------------------------------------------------


def test_llama_bench_output_becomes_our_figures():
    figures = bench.llama_bench_figures(LLAMA_BENCH_OUTPUT.read_text())
    tests = json.loads(LLAMA_BENCH_OUTPUT.read_text())
    assert figures == {"prefill_16": tests[0]["avg_ts"], "prefill_32": tests[1]["avg_ts"], "decode": tests[2]["avg_ts"]}
    assert figures["decode"] == pytest.approx(8 / (tests[2]["avg_ns"] / 1e9), rel=1e-5)  # tokens / seconds


def test_llama_cpp_not_available_is_one_line_saying_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache: nothing built
    line = bench.find_llama_cpp(None, None, None)
    folder = tmp_path / "qwen2-scratch" / f"llama.cpp-{bench.LLAMA_CPP_VERSION}"
    assert line == (f"llama.cpp: not timed ({folder}/build/bin/llama-bench and {folder}/packaged-F32.gguf not found; "
                    "build them once with: make llama-cpp)")
    given = tmp_path / "llama-bench"  # --llama-bench given, the GGUF still missing
    given.write_text("")
    assert bench.find_llama_cpp(str(given), None, None) == (f"llama.cpp: not timed ({folder}/packaged-F32.gguf not "
                                                            "found; build them once with: make llama-cpp)")
    for model, shape in ((None, "qwen2-0.5b"), ("tiny-folder", None)):  # no GGUF of these
        assert bench.find_llama_cpp(None, model, shape) == "llama.cpp: not timed (only the packaged model has a " \
                                                           "GGUF for it here)"


def test_the_makefile_builds_the_llama_cpp_that_bench_looks_for():
    makefile = (HERE / "Makefile").read_text()
    assert f"LLAMA_CPP_VERSION ?= {bench.LLAMA_CPP_VERSION}\n" in makefile
    assert "packaged-F32.gguf" in makefile and "build/bin" in makefile
    test_target = re.search(r"^test: (.*)$", makefile, re.M).group(1)
    assert "llama" not in test_target, "make test must not build llama.cpp"


def stand_in_llama_bench(folder, output) -> str:
    """A llama-bench that prints a captured output and records its arguments."""
    script = folder / "llama-bench"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {folder}/argv\ncat {output}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_llama_cpp_runs_on_this_process_cores_with_our_lengths(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = bench.llama_cpp_dir()
    folder.mkdir(parents=True)
    (folder / "packaged-F32.gguf").write_text("")
    llama = bench.find_llama_cpp(stand_in_llama_bench(tmp_path, LLAMA_BENCH_OUTPUT), None, None)
    assert llama == bench.LlamaCpp(str(tmp_path / "llama-bench"), str(folder / "packaged-F32.gguf"))
    figures = bench.measure_llama_cpp(llama, [16, 32])(8)
    assert figures == bench.llama_bench_figures(LLAMA_BENCH_OUTPUT.read_text())
    threads = len(os.sched_getaffinity(0))
    assert (tmp_path / "argv").read_text().split() == ["-m", llama.gguf, "-t", str(threads), "-p", "16,32", "-n", "8",
                                                       "-r", "1", "-o", "json"]


def test_a_failing_llama_bench_is_one_line():
    with pytest.raises(bench.BenchError, match=r"^llama-bench failed \(exit code 1\): "):
        bench.run_llama_bench(bench.LlamaCpp("/bin/false", "model.gguf"), [16], 8)


def test_each_contender_over_llama_cpp():
    results = {"ours": {"decode": 11.0, "prefill_16": 60.0}, "llama.cpp F32": {"decode": 14.0, "prefill_16": 120.0}}
    ratios = bench.versus(results, "llama.cpp F32", "llama_cpp", ["decode", "prefill_16"])
    assert ratios == {"ours": {"decode_vs_llama_cpp": 11 / 14, "prefill_16_vs_llama_cpp": 0.5},
                      "llama.cpp F32": {"decode_vs_llama_cpp": 1.0, "prefill_16_vs_llama_cpp": 1.0}}


def test_the_table_shows_llama_cpp_beside_the_others(tiny_bench):
    """A report with llama.cpp's column: its figures, each contender's ratio to it, '-' for its memory."""
    report = copy.deepcopy(tiny_bench[1])
    theirs = {"prefill_8": 80.0, "prefill_16": 90.0, "decode": 14.0, "roofline": 0.9}
    ratios = bench.versus(report["results"] | {bench.LLAMA_CPP: theirs}, bench.LLAMA_CPP, "llama_cpp", list(theirs)[:3])
    report["results"] = {name: r | ratios[name] for name, r in report["results"].items()}
    report["results"][bench.LLAMA_CPP] = theirs | ratios[bench.LLAMA_CPP]
    report["spreads"][bench.LLAMA_CPP] = {"decode": 0.02}
    report["llama_cpp"], report["llama_cpp_missing"] = {"version": "version: 0.5.0-dev", "gguf": "F32.gguf"}, None
    lines = bench.table(report).splitlines()
    assert lines[0].split()[-1] == "F32" and "llama.cpp F32" in lines[0]
    decode = lines.index(next(x for x in lines if x.startswith("decode tok/s")))
    assert lines[decode].split()[-1] == "14.00" and lines[decode + 2].startswith("  x llama.cpp F32")
    ours = report["results"]["ours-reference"]["decode"] / 14.0
    assert lines[decode + 2].split()[3] == f"{ours:.2f}" and lines[decode + 2].split()[-1] == "1.00"
    assert next(x for x in lines if x.startswith("peak memory GB")).split()[-1] == "-"
    assert any(x.startswith("llama.cpp F32: version: 0.5.0-dev, llama-bench -r 1 a trial on F32.gguf") for x in lines)


@pytest.fixture
def talking_folder(tiny_folder, tmp_path):
    """The tiny model answering "o" at every step (its lm_head row of "o" follows the constant feature that keeps
    it from ending), so that a stream's text comes token by token: the tiny model's own tokens are stray bytes
    of UTF-8, held back until the answer ends."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "talking"
    shutil.copytree(tiny_folder, folder)
    (o,) = AutoTokenizer.from_pretrained(str(folder)).encode("o")
    weights = mx.load(str(folder / "model.safetensors"))
    weights["lm_head.weight"][o, 0] = 60.0
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    return folder


def test_bench_serve_end_to_end_on_a_tiny_model(talking_folder, tmp_path):
    """Both servers answer every level's burst, and a short request is timed alone and while 8 stream."""
    out = tmp_path / "serve.json"
    result = run_cli("bench", "--serve", "--model", str(talking_folder), "--clients", "1,3", "--gen-tokens", "4",
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
        assert short["restarts"] == 0  # the tiny model never ends: every sample was taken while the 8 streams ran
        assert len(report["short_request_runs"][name][0]["while_streaming_samples"]) == 3
    assert "while 8 stream" in result.stdout


def test_bench_rejects_bad_prompt_lengths():
    result = invoke("bench", "--prompt-tokens", "12,abc")
    assert result.exit_code == 2 and "whole numbers separated by commas" in result.output



@pytest.mark.skipif(sys.platform != "linux", reason="a process's end signalled to its children is Linux's prctl")
def test_a_bench_killed_takes_its_servers_with_it(tiny_folder):
    """bench --serve's servers end when the bench's process ends, even by SIGKILL (a killed bench had left both
    running, decoding for clients long gone)."""
    port = bench.free_port()
    script = (f"import sys, time\nfrom qwen2s import bench\n"
              f"p = bench.start_server([sys.executable, '-m', 'qwen2s.cli', 'serve', '--port', '{port}', '--model', "
              f"{str(tiny_folder)!r}], {port}, {{}})\nprint(p.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server = int(parent.stdout.readline())
    parent.kill()
    parent.wait()

    def running() -> bool:  # an ended server not yet reaped by init is a zombie ("Z")
        try:
            return Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    for _ in range(300):
        if not running():
            break
        time.sleep(0.1)
    else:
        os.kill(server, 9)
        pytest.fail("the server outlived the bench by 30 s")


def test_a_short_request_to_a_server_gone_is_a_bench_error():
    """The short request's timing, like the bursts, reports a server that does not answer as one BenchError line."""
    with pytest.raises(bench.BenchError, match="failed a request: ConnectError"):
        bench.short_request_ttft(bench.free_port(), streams=2, samples=1)
