"""The generate, perplexity and pull commands, through Click's runner and the real console script."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import json
import os
import re
import signal
import subprocess

import numpy as np
import pytest

from conftest import COMMAND, STATS, invoke, run_cli
from qwen2s import cli, weights


@pytest.mark.packaged_model
def test_generate_command_on_the_packaged_model(packaged):
    result = run_cli("generate", "--prompt", "What is 2 + 2? Answer with one number.", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "4" in result.stdout and result.stdout.endswith("\n")
    assert re.fullmatch(STATS, result.stderr.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The generate, perplexity and pull commands
# ---------------------------------------------------------------------------------------------


def test_generate_prints_only_the_text_and_one_stats_line(tiny_folder):
    result = invoke("generate", "-m", str(tiny_folder), "--prompt", "hello", "--max-tokens", "5")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(STATS, result.stderr.strip())  # exactly one line, nothing else
    # the text and the counts are mlx_lm's, greedy on the same templated prompt
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(tiny_folder))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    theirs = list(stream_generate(model, tokenizer, ids, max_tokens=5, sampler=make_sampler(0.0)))
    assert result.stdout == "".join(r.text for r in theirs) + "\n"
    assert f"prefill: {len(ids)} tokens" in result.stderr and f"decode: {len(theirs)} tokens" in result.stderr


def test_generate_reads_the_prompt_from_stdin_and_raw_continues_plain_text(tiny_folder):
    a = invoke("generate", "-m", str(tiny_folder), "--prompt", "-", "--raw", "--max-tokens", "6", input="the quick")
    b = invoke("generate", "-m", str(tiny_folder), "--prompt", "the quick", "--raw", "--max-tokens", "6")
    assert a.exit_code == 0 and a.stdout == b.stdout
    assert "prefill: 2 tokens" in a.stderr  # "the", " quick": no template around it
    c = invoke("generate", "-m", str(tiny_folder), "--prompt", "the quick", "--max-tokens", "6")
    assert "prefill: 2 tokens" not in c.stderr  # templated


def test_sampling_is_reproducible_with_a_seed(tiny_folder):
    args = ["generate", "-m", str(tiny_folder), "--prompt", "hello", "--temp", "1.0", "--max-tokens", "20"]
    a, b = invoke(*args, "--seed", "3"), invoke(*args, "--seed", "3")
    c = invoke(*args, "--seed", "4")
    assert a.stdout == b.stdout and a.stdout != c.stdout


def test_system_message_changes_the_prompt(tiny_folder):
    a = invoke("generate", "-m", str(tiny_folder), "--prompt", "hello", "--max-tokens", "2")
    b = invoke("generate", "-m", str(tiny_folder), "--prompt", "hello", "--system", "the lazy dog", "--max-tokens", "2")
    tokens = [int(re.search(r"prefill: (\d+)", r.stderr).group(1)) for r in (a, b)]
    assert tokens[0] != tokens[1]


BAD_VALUES = [
    (["--max-tokens", "0"], "--max-tokens"), (["--max-tokens", "-3"], "--max-tokens"),
    (["--temp", "-1"], "--temp"), (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"), (["--dtype", "float64"], "--dtype"), (["--min-p", "2"], "--min-p"),
    (["--repetition-penalty", "0"], "--repetition-penalty"), (["--max-kv-size", "0"], "--max-kv-size"),
    (["--kernels", "cuda"], "--kernels"),
]


@pytest.mark.parametrize("args,words", BAD_VALUES)
def test_generate_rejects_bad_values(tiny_folder, args, words):
    result = invoke("generate", "-m", str(tiny_folder), "--prompt", "hi", *args)
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output


def test_generate_rejects_an_empty_prompt_and_raw_with_system(tiny_folder):
    for args in (["--prompt", ""], ["--prompt", "  \n"], ["--prompt", "-"]):
        result = invoke("generate", "-m", str(tiny_folder), *args, input="")
        assert result.exit_code == 2 and "the prompt is empty" in result.output
    result = invoke("generate", "-m", str(tiny_folder), "--prompt", "hi", "--raw", "--system", "x")
    assert result.exit_code == 2 and "--system needs the chat template" in result.output


def test_generate_prompt_longer_than_the_context_is_an_error(tiny_folder):
    result = invoke("generate", "-m", str(tiny_folder), "--prompt", "hello world " * 20, "--max-kv-size", "8")
    assert result.exit_code == 1 and "the context holds 8" in result.output and "--max-kv-size" in result.output


def test_generate_stops_at_the_context_limit_with_a_notice(tiny_folder):
    result = invoke("generate", "-m", str(tiny_folder), "--prompt", "hello", "--raw", "--max-kv-size", "6",
                    "--max-tokens", "50")
    assert result.exit_code == 0 and "notice: stopped at --max-kv-size 6" in result.stderr


def test_closed_stdout_ends_quietly(tiny_folder):
    proc = subprocess.Popen([str(COMMAND), "generate", "-m", str(tiny_folder),
                             "--prompt", "hello", "--max-tokens", "2000", "--raw"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(5)  # like `| head -c 5`
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err and b"decode: 2000" not in err


def test_ctrl_c_during_generate_exits_130_without_a_traceback(tiny_folder):
    proc = subprocess.Popen([str(COMMAND), "generate", "-m", str(tiny_folder),
                             "--prompt", "hello", "--max-tokens", "100000", "--raw"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(20)  # it is generating
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err and err.strip().endswith(b"interrupted")


def test_perplexity_command_json_and_text(tiny_folder, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world, the quick brown fox " * 20, encoding="utf-8")
    result = invoke("perplexity", "-m", str(tiny_folder), "--file", str(text), "--json", "--context", "16")
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout)
    assert set(line) == {"tokens", "nll", "perplexity"} and result.stdout.count("\n") == 1
    params, config, tokenizer = weights.load(str(tiny_folder))
    expected = q.perplexity(params, config, tokenizer.encode(text.read_text()), 16, cli.default_kernels())
    assert line["tokens"] == expected.tokens and abs(line["nll"] - expected.nll) < 1e-6
    assert abs(line["perplexity"] - np.exp(line["nll"])) < 1e-6 * line["perplexity"]
    readable = invoke("perplexity", "-m", str(tiny_folder), "--file", str(text), "--context", "16")
    assert readable.exit_code == 0 and "perplexity" in readable.stdout and "{" not in readable.stdout
    assert "default 1024" in invoke("perplexity", "--help").stdout


def test_perplexity_rejects_a_missing_or_non_utf8_file(tiny_folder, tmp_path):
    result = invoke("perplexity", "-m", str(tiny_folder), "--file", str(tmp_path / "nope.txt"))
    assert result.exit_code == 2 and "does not exist" in result.output
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    result = invoke("perplexity", "-m", str(tiny_folder), "--file", str(binary))
    assert result.exit_code == 2 and "not a readable UTF-8 file" in result.output


def test_pull_prints_only_the_folder(tiny_folder):
    result = run_cli("pull", "--model", str(tiny_folder))
    assert result.returncode == 0 and result.stdout == f"{tiny_folder}\n"




def test_the_command_line_never_imports_torch(tiny_folder, tmp_path):
    """Where PyTorch is installed, transformers (the tokenizer's loader) imported it: seconds and hundreds of MB a
    start, and on a CUDA machine a second CUDA stack beside MLX's. Here a `torch` that fails the command if
    imported, installed as transformers looks for it (a package and its metadata, version 2.9)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise SystemExit('torch was imported')\n")
    (tmp_path / "torch-2.9.0.dist-info").mkdir()
    (tmp_path / "torch-2.9.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.9.0\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    result = run_cli("generate", "--model", str(tiny_folder), "--prompt", "hi", "--max-tokens", "2",
                     env={"PYTHONPATH": path})
    assert result.returncode == 0 and "torch was imported" not in result.stderr, result.stderr
