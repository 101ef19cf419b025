"""The conventions people bring from other tools: mlx_lm's flag names, llama.cpp's prompt file,
--quiet, ollama's chat commands and multi-line input, and sampling defaults from the model's
generation_config.json."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import json
import re
import shutil

import pytest

from conftest import STATS, invoke, run_cli
from qwen2s import convert, weights


def generate(folder, *args):
    return invoke("generate", "-m", str(folder), "--max-tokens", "6", *args)


def test_mlx_lm_aliases_prompt_file_and_quiet(tiny_folder, tmp_path):
    base = generate(tiny_folder, "--prompt", "hello", "--system", "the lazy dog")
    assert base.exit_code == 0, base.output
    assert generate(tiny_folder, "--prompt", "hello", "--system-prompt", "the lazy dog").stdout == base.stdout
    raw = generate(tiny_folder, "--prompt", "the quick", "--raw")
    assert generate(tiny_folder, "--prompt", "the quick", "--ignore-chat-template").stdout == raw.stdout
    (tmp_path / "prompt.txt").write_text("the quick")
    from_file = generate(tiny_folder, "--prompt-file", str(tmp_path / "prompt.txt"), "--raw")
    assert from_file.stdout == raw.stdout and re.fullmatch(STATS, from_file.stderr.strip())
    quiet = generate(tiny_folder, "--prompt", "the quick", "--raw", "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == raw.stdout and quiet.stderr == ""
    for args in ([], ["--prompt", "x", "--prompt-file", str(tmp_path / "prompt.txt")]):
        result = generate(tiny_folder, *args)
        assert result.exit_code == 2 and "--prompt or --prompt-file" in result.stderr


def chat(folder, *lines, args=()):
    return run_cli("chat", "--model", str(folder), "--temp", "0", "--max-tokens", "4", *args,
                   input="".join(f"{x}\n" for x in lines))


def prefills(stderr):
    return [int(n) for n in re.findall(r"prefill: (\d+) tokens", stderr)]


def test_chat_aliases_and_multi_line_input(tiny_folder):
    for leave in ("/exit", "/bye"):
        result = chat(tiny_folder, leave, "hello")
        assert result.returncode == 0 and result.stdout == "", result.stderr
    cleared = chat(tiny_folder, "hello world", "/clear", "the lazy dog")
    fresh = chat(tiny_folder, "the lazy dog")
    assert "the conversation was forgotten" in cleared.stderr
    assert cleared.stdout.split("\n\n")[1] == fresh.stdout.split("\n\n")[0], "/clear forgets as /reset does"
    multi = chat(tiny_folder, '"""hello', "the quick", 'brown fox"""', "the lazy dog", args=["--quiet"])
    assert multi.returncode == 0 and len(multi.stdout.split("\n\n")) == 3, "two answers: one per message"
    assert "prefill" not in multi.stderr
    one = chat(tiny_folder, '"""', "hello", "the quick brown fox", '"""')
    tokenizer = weights.load_tokenizer(tiny_folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello\nthe quick brown fox"}],
                                        add_generation_prompt=True)
    assert prefills(one.stderr) == [len(ids)], one.stderr


def test_sampling_defaults_come_from_generation_config(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "with-defaults")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 1.0, "top_k": 5, "do_sample": True}))
    assert weights.sampling_defaults(folder) == {"temp": 1.0, "top_k": 5}
    args = ["--prompt", "hello", "--max-tokens", "20", "--seed", "3"]
    by_default = invoke("generate", "-m", str(folder), *args)
    assert by_default.stdout == invoke("generate", "-m", str(tiny_folder), *args, "--temp", "1", "--top-k", "5").stdout
    assert by_default.stdout != invoke("generate", "-m", str(tiny_folder), *args).stdout, "greedy without the file"
    assert invoke("generate", "-m", str(folder), *args, "--temp", "0").stdout == \
        invoke("generate", "-m", str(tiny_folder), *args).stdout, "--temp 0 is greedy"
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 1.0, "do_sample": False}))
    assert weights.sampling_defaults(folder) == {"temp": 0.0}


def test_values_given_win_and_the_rest_come_from_the_defaults():
    defaults = {"temp": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert weights.sampling_for(defaults, temp=0) == q.Sampling(0, 0.8, 20, 0.0, 1.05)
    assert weights.sampling_for(defaults, temp=0, repetition_penalty=1.0, top_p=None) == q.Sampling(0, 0.8, 20)
    assert weights.sampling_for({}) == q.Sampling()


@pytest.mark.packaged_model
def test_the_packaged_conversion_writes_its_generation_config(packaged):
    written = json.loads((packaged[0] / "generation_config.json").read_text())
    assert written == convert.PACKAGED_GENERATION
    assert weights.sampling_defaults(packaged[0]) == {"temp": 0.7, "top_p": 0.8, "top_k": 20,
                                                      "repetition_penalty": 1.05}
