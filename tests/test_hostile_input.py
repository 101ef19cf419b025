"""Hostile input and faults: every one gets a one-line error and a non-zero exit, never a traceback, a
hang, runaway memory or an exit 0 with garbage (issue 12)."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import functools
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import COMMAND, TINY, invoke, reference_model, run_cli, tiny_model, write_checkpoint
from qwen2s import convert, weights


def one_line_error(result, *words, exit_code=1):
    """A CliRunner result that failed with one error line holding every one of words (besides it, stderr
    may hold only progress or usage lines), and no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def copy_with_config(root, folder, name, **changes):
    """A copy of a model folder whose config.json has these keys changed (None: removed)."""
    out = root / name
    out.mkdir()
    for f in folder.iterdir():
        (out / f.name).symlink_to(f)
    (out / "config.json").unlink()
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (out / "config.json").write_text(json.dumps(raw))
    return out


# ---------------------------------------------------------------------------------------------
# Runaway memory: a config that asks for a billion layers
# ---------------------------------------------------------------------------------------------

MEMORY_LIMIT = 6 << 30  # bytes of address space: far more than a tiny model needs, far less than 1e9 layers

PEAK_PROBE = """
import sys
from qwen2s import cli
try:
    cli.cli(sys.argv[1:], standalone_mode=False)
finally:
    print(next(line for line in open("/proc/self/status") if line.startswith("VmPeak")), end="", file=sys.stderr)
"""


@functools.cache
def mapped_by_a_run(folder) -> int:
    """The address space (bytes, VmPeak) of a short generation with folder's model on this machine's default
    device. Limits are this plus what a test means to allow: MLX's CUDA backend maps about 295 GiB (it
    cannot even be imported under 3.8 GiB), a CPU run about 1 GiB."""
    done = subprocess.run([sys.executable, "-c", PEAK_PROBE, "generate", "-m", str(folder), "--prompt", "hi",
                           "--max-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stderr.splitlines()[-1].split()[1]) * 1024


def run_limited(folder, *args):
    """The console script under an address-space limit (MEMORY_LIMIT beyond what a run of folder's model
    maps), so that a runaway cannot hurt the machine."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
    size = mapped_by_a_run(folder) + MEMORY_LIMIT
    return subprocess.run([str(COMMAND), *args], capture_output=True, text=True, timeout=300, preexec_fn=limit)


def test_a_billion_layers_is_refused_before_anything_is_built(tmp_path, tiny_folder):
    folder = copy_with_config(tmp_path, tiny_folder, "huge", num_hidden_layers=10**9)
    result = run_limited(tiny_folder, "generate", "-m", str(folder), "--prompt", "hi", "--max-tokens", "2")
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "num_hidden_layers is 1000000000" in result.stderr, result.stderr




def test_layer_count_must_match_the_tensors(tmp_path, tiny_folder):
    folder = copy_with_config(tmp_path, tiny_folder, "three", num_hidden_layers=3)
    one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), "num_hidden_layers is 3",
                   "layers 0 to 1")


# ---------------------------------------------------------------------------------------------
# Config values of the wrong type or impossible: one validation, naming key, value and expectation
# ---------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"hidden_size": "64"}, "hidden_size is \"64\""), ({"hidden_size": 64.0}, "hidden_size is 64.0"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0"), ({"rms_norm_eps": None}, "rms_norm_eps is null"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings is \"false\""),
    ({"rope_theta": "fast"}, "rope_theta is \"fast\""),
    ({"max_position_embeddings": 0}, "max_position_embeddings is 0"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"), ({"vocab_size": -1}, "vocab_size is -1"),
    ({"rope_theta": float("inf")}, "rope_theta is Infinity"), ({"hidden_size": True}, "hidden_size is true"),
    ({"hidden_size": {"value": 64}}, 'hidden_size is {"value": 64}'),
    ({"quantization": [4, 64]}, "quantization is [4, 64], expected an object"),
    ({"eos_token_id": {"id": 2}}, 'eos_token_id is {"id": 2}'),
    ({"eos_token_id": [2, "x"]}, 'eos_token_id is [2, "x"]'),
    ({"num_hidden_layers": [2] * 1000}, "num_hidden_layers is [2, 2, 2"),
    # mlx_lm scales RoPE so; ours has no scaling, and the answers differed from the reference's, exit 0
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, 'rope_scaling is {"type": "yarn", "factor": 4.0}'),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "has no scaling"),
]


@pytest.mark.parametrize("changes,words", BAD_CONFIGS, ids=[str(c) for c, _ in BAD_CONFIGS])
def test_bad_config_values_are_named(tmp_path, tiny_folder, changes, words):
    folder = copy_with_config(tmp_path, tiny_folder, "bad", **changes)
    line = one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), words, "config.json")
    assert "expected" in line


def test_a_weight_in_two_files_is_refused(tmp_path, tiny_folder):
    """A stale checkpoint beside another (model.safetensors and shards): the last file's weights had replaced the
    first's silently, two models mixed, exit 0."""
    folder = copy_with_config(tmp_path, tiny_folder, "two")
    (folder / "model-00001-of-00001.safetensors").symlink_to(tiny_folder / "model.safetensors")
    one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), "model.safetensors:", "is in",
                   "model-00001-of-00001.safetensors too")


def test_quantization_bits_that_do_not_match_the_data(tmp_path, tiny_tokenizer_dir):
    model, raw = tiny_model(quantize=(4, 64))
    folder = write_checkpoint(tmp_path / "q4", model, raw, tiny_tokenizer_dir)
    for bits, words in [("4", "bits is \"4\""), (8, "bits 8")]:
        (folder / "config.json").write_text(json.dumps({**raw, "quantization": {"group_size": 64, "bits": bits}}))
        one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), words)


def test_generation_config_that_is_not_json(tmp_path, tiny_folder):
    folder = copy_with_config(tmp_path, tiny_folder, "gen")
    (folder / "generation_config.json").write_text("{nope")
    one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), "generation_config.json",
                   "not a readable JSON")


@pytest.mark.parametrize("text", ['{"temperature": 1' + "0" * 5000 + "}", "[" * 100_000 + "]" * 100_000],
                         ids=["an integer of 5001 digits", "nested 100,000 deep"])
def test_config_files_that_json_loads_raises_other_errors_on(tmp_path, tiny_folder, text):
    """json.loads raises ValueError (not JSONDecodeError) past 4300 digits and RecursionError past its depth:
    each was a traceback, in config.json or generation_config.json."""
    for name in ("config.json", "generation_config.json"):
        folder = copy_with_config(tmp_path, tiny_folder, name)
        (folder / name).write_text(text)
        one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), name, "not a readable JSON")


def test_config_validation_holds_for_any_value(tmp_path_factory):
    """Property: any JSON value for any checked key gives a Config or a ModelError, nothing else."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    values = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                       st.text(max_size=5), st.lists(st.integers(), max_size=2))
    keys = st.sampled_from(sorted(weights.CONFIG_RANGES) + ["tie_word_embeddings"])

    @settings(max_examples=300, deadline=None)
    @given(keys, values)
    def check(key, value):
        raw = {**TINY, key: value}
        try:
            config = weights.check_config(raw, "config.json")
        except weights.ModelError as e:
            assert key in str(e) and "\n" not in str(e)
        else:
            assert getattr(config, key) == value

    check()


# ---------------------------------------------------------------------------------------------
# Untrusted model folders: every file checked at its door (issue 21)
# ---------------------------------------------------------------------------------------------

BAD_GENERATION = [
    ({"temperature": float("nan")}, "temperature is NaN", "at least 0"),
    ({"temperature": -1}, "temperature is -1", "at least 0"),
    ({"repetition_penalty": 0}, "repetition_penalty is 0", "above 0"),
    ({"repetition_penalty": -1.5}, "repetition_penalty is -1.5", "above 0"),
    ({"top_k": 2.5}, "top_k is 2.5", "whole number"), ({"top_k": "20"}, 'top_k is "20"', "whole number"),
    ({"top_p": 0}, "top_p is 0", "above 0 and at most 1"), ({"top_p": 1.5}, "top_p is 1.5", "at most 1"),
    ({"temperature": {"value": 0.7}}, 'temperature is {"value": 0.7}', "a number"),
    ({"do_sample": "yes"}, 'do_sample is "yes"', "true or false"),
    ({"eos_token_id": [2, [3]]}, "eos_token_id is [2, [3]]", "token id"),
]


@pytest.mark.parametrize("values,words,expected", BAD_GENERATION, ids=[str(v) for v, _, _ in BAD_GENERATION])
def test_bad_generation_config_values_are_named(tmp_path, tiny_folder, values, words, expected):
    folder = copy_with_config(tmp_path, tiny_folder, "gen")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.7, **values}))
    for args in (["generate", "--prompt", "hi"], ["chat"]):
        one_line_error(invoke(*args, "-m", str(folder), input="hi\n"), "generation_config.json", words, expected)


def test_generation_config_values_hold_for_any_json(tmp_path):
    """Property: any generation_config.json gives defaults that make a valid Sampling, or a ModelError."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    keys = st.sampled_from(sorted(weights.GENERATION_RULES) + ["max_new_tokens", "pad_token_id"])

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(keys, json_values(), max_size=4))
    def check(g):
        (tmp_path / "generation_config.json").write_text(json.dumps(g))
        try:
            defaults = weights.sampling_defaults(tmp_path)
        except weights.ModelError as e:
            assert "\n" not in str(e) and "generation_config.json" in str(e)
            return
        s = q.Sampling(**defaults)
        assert 0 <= s.temp < float("inf") and 0 < s.top_p <= 1 and s.top_k >= 0 and not isinstance(s.top_k, float)
        assert 0 < s.repetition_penalty < float("inf")

    check()


def json_values():
    """Any JSON value: scalars (NaN and infinities too, which Python's json reads), lists and objects of them."""
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), st.text(max_size=8))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                        st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


def test_whole_configs_load_or_give_one_model_error(tmp_path, tiny_folder):
    """Property: a config.json with any keys changed to any JSON loads, or fails with one ModelError line."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    folder = copy_with_config(tmp_path, tiny_folder, "any")
    keys = st.sampled_from(sorted(weights.CONFIG_RANGES) + ["tie_word_embeddings", "model_type", "quantization",
                                                            "quantization_config", "eos_token_id", "architectures"])

    @settings(max_examples=60, deadline=None)
    @given(st.dictionaries(keys, json_values(), min_size=1, max_size=3))
    def check(changes):
        (folder / "config.json").write_text(json.dumps({**TINY, **changes}))
        try:
            weights.load(str(folder), "float32")
        except weights.ModelError as e:
            assert "\n" not in str(e)

    check()


def test_a_folder_without_tokenizer_files_is_refused(tmp_path, tiny_folder):
    folder = copy_with_config(tmp_path, tiny_folder, "no-tokenizer")
    (folder / "tokenizer.json").unlink()
    one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), "no tokenizer files", "tokenizer.json")
    one_line_error(invoke("chat", "-m", str(folder), input="hi\n"), "no tokenizer files")


def test_a_tokenizer_with_an_empty_vocabulary_is_refused(tmp_path, tiny_folder):
    folder = copy_with_config(tmp_path, tiny_folder, "empty-vocab")
    tok = json.loads((tiny_folder / "tokenizer.json").read_text())
    tok["model"].update(vocab={}, merges=[])
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), str(folder))


def safetensors_bytes(header, data=b"", length=None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


BAD_SAFETENSORS = {
    "a JSON array": safetensors_bytes([1, 2]),
    "a JSON string": safetensors_bytes("x"),
    "a tensor that is a number": safetensors_bytes({"a": 3}),
    "offsets beyond the data": safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}},
                                                 bytes(8)),
    "a shape larger than its bytes": safetensors_bytes(
        {"a": {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 8]}}, bytes(8)),
    "a nested metadata object": safetensors_bytes(
        {"__metadata__": {"a": {"b": 1}}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "a huge header length": safetensors_bytes({}, length=2**63),
    "a header past the end": safetensors_bytes({}, length=4096),
    "no header at all": b"\x01\x02",
}


@pytest.mark.parametrize("name", BAD_SAFETENSORS)
def test_hostile_safetensors_headers_are_refused(tmp_path, tiny_folder, name):
    folder = copy_with_config(tmp_path, tiny_folder, "bad-header")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(BAD_SAFETENSORS[name])
    one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), "truncated or corrupt safetensors")


def test_a_weights_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path, tiny_folder):
    """A FIFO named model.safetensors (in the folder, or linked from it): opening it waited for a writer for ever."""
    folder = copy_with_config(tmp_path, tiny_folder, "fifo")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), "model.safetensors", "not a regular file")


@pytest.mark.parametrize("target", ["/nonexistent/blob", "model.safetensors"])
def test_a_weights_link_to_nothing_is_named_as_such(tmp_path, tiny_folder, target):
    """A hub snapshot whose blob is gone (or a link to itself) was called "a FIFO, a device or a folder"."""
    folder = copy_with_config(tmp_path, tiny_folder, "dangling")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(target)
    result = invoke("generate", "-m", str(folder), "--prompt", "hi")
    line = one_line_error(result, "model.safetensors", "does not exist")
    assert "FIFO" not in line


def test_safetensors_headers_load_or_give_one_model_error(tmp_path):
    """Property: any header (any JSON, tensors with any dtype, shape and offsets) and any bytes after it
    load, or fail with one ModelError line."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tensor = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "F64", "Q4", 7]),
                                    "shape": st.lists(st.integers(-2, 40), max_size=3) | json_values(),
                                    "data_offsets": st.lists(st.integers(-2, 200), min_size=0, max_size=3)})
    headers = st.dictionaries(st.text(max_size=6), tensor, max_size=3) | json_values()
    path = tmp_path / "model.safetensors"

    @settings(max_examples=300, deadline=None)
    @given(headers, st.binary(max_size=200), st.none() | st.integers(0, 2**64 - 1), st.booleans())
    def check(header, data, length, raw_bytes):
        path.write_bytes(data if raw_bytes else safetensors_bytes(header, data, length))
        try:
            weights.read_safetensors(path)
        except weights.ModelError as e:
            assert "\n" not in str(e) and str(path) in str(e)

    check()


HUB_LIKE = ["x/..", "~nosuchuser-qwen2/x", "../x", "a/b/c", "x/.", "/x", "x/--y", "x//y"]


@pytest.mark.parametrize("name", HUB_LIKE)
def test_path_like_hub_ids_are_refused_before_the_hub(tmp_path, monkeypatch, name):
    def hub_folder(repo_id):
        raise AssertionError(f"{repo_id!r} reached the hub cache")

    monkeypatch.chdir(tmp_path)  # none of these is a path here
    monkeypatch.setattr(weights, "hub_folder", hub_folder)
    one_line_error(invoke("generate", "-m", name, "--prompt", "hi"), "not an existing path, an alias or a hub id")


def test_an_empty_model_name_is_not_the_packaged_model(monkeypatch):
    """-m "$MODEL" with MODEL unset ran the packaged model (converting it first, if it was not yet), exit 0."""
    monkeypatch.setattr(weights, "packaged_folder", lambda *a: pytest.fail("the packaged model was loaded"))
    one_line_error(invoke("generate", "-m", "", "--prompt", "hi"), "empty name", "leave --model out")


def test_an_empty_draft_model_name_is_an_error_not_plain_decoding(monkeypatch):
    """--draft-model "$DRAFT" with DRAFT unset had decoded without speculation, exit 0."""
    monkeypatch.setattr(weights, "packaged_folder", lambda *a: pytest.fail("the model was loaded"))
    one_line_error(invoke("generate", "--draft-model", "", "--prompt", "hi"), "empty name", exit_code=2)


def test_a_forged_completion_marker_does_not_skip_the_finite_check(tmp_path, tiny_tokenizer_dir):
    """Only our own conversions, in our cache, are trusted as checked: a folder's own complete.json is not."""
    model, raw = tiny_model(tie=False)
    model.model.layers[0].mlp.down_proj.weight[1, 2] = float("nan")
    folder = write_checkpoint(tmp_path / "forged", model, raw, tiny_tokenizer_dir)
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    (folder / convert.MARKER).write_text(json.dumps(sizes))
    assert convert.is_complete(folder)
    one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), "model.layers.0.mlp.down_proj.weight",
                   "not finite")


# ---------------------------------------------------------------------------------------------
# Options out of range: non-finite floats, seeds, top-k and repetition context beyond the vocabulary
# ---------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    (["--seed", "-1"], "--seed"), (["--seed", str(2**64)], "--seed"),
    (["--temp", "nan"], "--temp"), (["--temp", "inf"], "--temp"), (["--top-p", "nan"], "--top-p"),
    (["--min-p", "nan"], "--min-p"), (["--repetition-penalty", "nan"], "--repetition-penalty"),
    (["--repetition-penalty", "inf"], "--repetition-penalty"),
]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("args,words", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_are_usage_errors(tiny_folder, command, args, words):
    prompt = ["--prompt", "hi"] if command == "generate" else []
    result = invoke(command, "-m", str(tiny_folder), *prompt, *args, input="hello\n")
    assert result.exit_code == 2 and words in result.stderr and result.exception is None or \
        isinstance(result.exception, SystemExit), result.output


def test_top_k_beyond_the_vocabulary_and_a_huge_repetition_context_are_clamped(tiny_folder):
    base = ["generate", "-m", str(tiny_folder), "--prompt", "hello", "--max-tokens", "8", "--seed", "1"]
    wide = invoke(*base, "--temp", "1", "--top-k", "100000")
    off = invoke(*base, "--temp", "1", "--top-k", "0")
    assert wide.exit_code == 0 and wide.stdout == off.stdout, wide.output
    huge = invoke(*base, "--repetition-penalty", "1.3", "--repetition-context", "99999999999")
    whole = invoke(*base, "--repetition-penalty", "1.3", "--repetition-context", "32768")
    assert huge.exit_code == 0 and huge.stdout == whole.stdout, huge.output


def test_tiny_temperatures_are_greedy(tiny_folder):
    base = ["generate", "-m", str(tiny_folder), "--prompt", "hello", "--max-tokens", "12"]
    greedy = invoke(*base, "--temp", "0")
    for temp in ("1e-300", "1e-30", "1e-8"):
        result = invoke(*base, "--temp", temp, "--seed", "5")
        assert result.exit_code == 0 and result.stdout == greedy.stdout, (temp, result.output)


# ---------------------------------------------------------------------------------------------
# Input that is not UTF-8
# ---------------------------------------------------------------------------------------------


def run_bytes(*args, input=b""):
    return subprocess.run([str(COMMAND), *args], input=input, capture_output=True, timeout=300)


def test_prompt_that_is_not_utf8(tiny_folder):
    result = run_bytes("generate", "-m", str(tiny_folder), "--prompt", "-", input=b"caf\xe9 \xff\n")
    assert result.returncode == 2 and b"not valid UTF-8" in result.stderr and b"Traceback" not in result.stderr
    result = run_bytes("generate", "-m", str(tiny_folder), "--prompt", b"caf\xe9")
    assert result.returncode == 2 and b"not valid UTF-8" in result.stderr and b"Traceback" not in result.stderr


def test_chat_skips_a_line_that_is_not_utf8_and_keeps_going(tiny_folder):
    result = run_bytes("chat", "-m", str(tiny_folder), "--max-tokens", "3", "--temp", "0",
                       input=b"hello world\ncaf\xe9 \xff\nthe lazy dog\n")
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    assert b"not valid UTF-8" in result.stderr and result.stdout.count(b"\n\n") == 2
    without = run_bytes("chat", "-m", str(tiny_folder), "--max-tokens", "3", "--temp", "0",
                        input=b"hello world\nthe lazy dog\n")
    alone = run_bytes("chat", "-m", str(tiny_folder), "--max-tokens", "3", "--temp", "0", input=b"the lazy dog\n")
    prefills = [re.findall(rb"prefill: (\d+)", r.stderr) for r in (result, without, alone)]
    assert prefills[0] == prefills[1], "the same turns, as if the line had never been typed"
    assert prefills[1][1] != prefills[2][0], "the second turn is run on top of the first one's history"


# ---------------------------------------------------------------------------------------------
# Chat templates: none at all, or one that raises
# ---------------------------------------------------------------------------------------------


def folder_with_template(root, tiny_folder, name, template):
    folder = copy_with_config(root, tiny_folder, name)
    config = folder / "tokenizer_config.json"
    raw = json.loads(config.read_text())
    raw.pop("chat_template", None)
    if template is not None:
        raw["chat_template"] = template
    config.unlink()
    config.write_text(json.dumps(raw))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def test_no_chat_template_says_so_and_raw_still_works(tmp_path, tiny_folder):
    folder = folder_with_template(tmp_path, tiny_folder, "plain", None)
    one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), "no chat template", "--raw")
    one_line_error(invoke("chat", "-m", str(folder), input="hi\n"), "no chat template", "--raw")
    assert invoke("generate", "-m", str(folder), "--prompt", "hi", "--raw", "--max-tokens", "3").exit_code == 0


def test_a_template_that_raises_gives_its_message(tmp_path, tiny_folder):
    folder = folder_with_template(tmp_path, tiny_folder, "raises", "{{ raise_exception('roles must alternate') }}")
    one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), "roles must alternate")
    one_line_error(invoke("chat", "-m", str(folder), input="hi\n"), "roles must alternate")


# ---------------------------------------------------------------------------------------------
# Silent garbage: tokenizer beyond the embeddings, non-finite weights, the streamed text
# ---------------------------------------------------------------------------------------------


def test_tokenizer_larger_than_the_embeddings_is_refused(tmp_path, tiny_tokenizer_dir):
    model, _, _, raw = reference_model(**{**TINY, "vocab_size": 100, "eos_token_id": None})
    folder = write_checkpoint(tmp_path / "v100", model, {**raw, "eos_token_id": 2}, tiny_tokenizer_dir)
    one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), "tokenizer", "vocab_size is 100")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_with_the_tensor_name(tmp_path, tiny_tokenizer_dir, bad):
    model, raw = tiny_model(tie=False)
    model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    folder = write_checkpoint(tmp_path / "nan", model, raw, tiny_tokenizer_dir)
    one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), "model.layers.1.mlp.up_proj.weight",
                   "not finite")




def test_streamed_text_matches_mlx_lm(tiny_folder):
    """The text, not only the ids: mlx_lm's own loader picks the BPE streaming detokenizer (no leading space)."""
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    ours = invoke("generate", "-m", str(tiny_folder), "--prompt", "the quick brown", "--raw", "--max-tokens", "16")
    model, tokenizer = load(str(tiny_folder))
    theirs = "".join(r.text for r in stream_generate(model, tokenizer, "the quick brown", max_tokens=16,
                                                     sampler=make_sampler(0.0)))
    assert ours.exit_code == 0 and ours.stdout == theirs + "\n"
    assert type(weights.load_tokenizer(tiny_folder).detokenizer).__name__ == "BPEStreamingDetokenizer"


# ---------------------------------------------------------------------------------------------
# I/O faults: stdout full or closed, a folder that does not exist, a read-only or full cache
# ---------------------------------------------------------------------------------------------


def test_stdout_full_or_closed(tiny_folder):
    args = [str(COMMAND), "generate", "-m", str(tiny_folder), "--prompt", "hi", "--max-tokens", "3"]
    with open("/dev/full", "w") as full:
        result = subprocess.run(args, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 1 and "standard output" in result.stderr and "No space left" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    result = subprocess.run(" ".join(args) + " >&-", shell=True, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 1 and "standard output" in result.stderr and result.stderr.count("\n") == 1, \
        result.stderr


def test_bench_json_into_a_missing_folder_fails_before_the_run(tmp_path):
    result = invoke("bench", "--shape", "qwen2-0.5b", "--json", str(tmp_path / "nope" / "b.json"))
    one_line_error(result, str(tmp_path / "nope"), exit_code=2)


@pytest.mark.parametrize("args, words", [
    (["--prompt-tokens", "40000"], ["40000", "32768 positions"]),  # was the engine's ValueError, a traceback
    (["--prompt-tokens", "8", "--gen-tokens", "32761"], ["--gen-tokens 32761", "32768 positions"]),
])
def test_bench_lengths_beyond_the_positions_are_refused(tiny_folder, args, words):
    one_line_error(invoke("bench", "-m", str(tiny_folder), "--no-int4", "--one-kernel", "--trials", "1", *args), *words)


@pytest.mark.parametrize("args, words", [
    (["--prompt-tokens", "9" * 23], ["--prompt-tokens", str(2**63 - 1)]),  # was a TypeError from mx.random.randint
    (["--speculative", "--num-draft", "4," + "9" * 13], ["--num-draft", "at most 63"]),  # an OverflowError in MLX
    (["--serve", "--clients", "8,65"], ["--clients", "at most 64"]),  # beyond 64 ours answers 503: 0 tokens timed
])
def test_bench_lists_beyond_their_limits_are_usage_errors(tiny_folder, args, words):
    one_line_error(invoke("bench", "-m", str(tiny_folder), "--trials", "1", *args), *words, exit_code=2)




# ---------------------------------------------------------------------------------------------
# A cache that heals: checked on use, rebuilt atomically, no stale temporaries, absolute paths
# ---------------------------------------------------------------------------------------------














@pytest.mark.packaged_model
def test_streamed_text_of_the_packaged_model_matches_mlx_lm(packaged, packaged_mlx_lm):
    """Once `red, ...` streamed as ` red, ...`: the text printed, not only the ids, is mlx_lm's."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    prompt = "The three primary colors are"
    ours = run_cli("generate", "--prompt", prompt, "--raw", "--max-tokens", "12", "--temp", "0",
                   "--repetition-penalty", "1")
    model, tokenizer = packaged_mlx_lm
    theirs = "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=12,
                                                     sampler=make_sampler(0.0)))
    assert ours.returncode == 0 and ours.stdout == theirs + "\n", (ours.stdout, theirs)
    assert not ours.stdout.startswith(" ")


# ---------------------------------------------------------------------------------------------
# Hostile input at the command line: huge counts, closed or endless stdin, messages naming the cause
# ---------------------------------------------------------------------------------------------

def shell(command: str, cwd=None, timeout=120):
    """A command line run by bash (for <&- and a deleted working directory), with the console script as $Q."""
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "Q": str(COMMAND)})


def one_error_line(done, *words, returncode=1):
    """A finished subprocess that failed with one Error line holding every one of words, and no traceback."""
    assert done.returncode == returncode and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), done.stderr


@pytest.mark.parametrize("option", ["--top-k", "--max-tokens", "--repetition-context", "--max-kv-size"])
def test_counts_beyond_64_bits_are_usage_errors(tiny_folder, option):
    result = invoke("generate", "-m", str(tiny_folder), "--prompt", "hi", option, str(2**64))
    one_line_error(result, option, str(2**63 - 1), exit_code=2)


def test_prompt_from_a_closed_stdin_says_so(tiny_folder):
    done = shell(f'"$Q" generate -m {tiny_folder} --prompt - --max-tokens 2 <&-')
    one_error_line(done, "standard input", "closed", returncode=2)
    done = shell(f'"$Q" chat -m {tiny_folder} --max-tokens 2 <&-')  # the weights never land on descriptor 0
    assert done.returncode == 0 and "safetensors" not in done.stderr, done.stderr


@pytest.mark.parametrize("command", ['"$Q" generate -m {m} --prompt-file /dev/zero',
                                     '"$Q" generate -m {m} --prompt - < /dev/zero',
                                     '"$Q" perplexity -m {m} --file /dev/zero'])
def test_endless_input_is_read_only_up_to_a_limit(tiny_folder, command):
    done = shell(command.format(m=tiny_folder), timeout=60)
    one_error_line(done, "larger than 16 MiB", returncode=2)


@pytest.mark.parametrize("command", ['"$Q" chat -m {m} --max-tokens 2 < /dev/zero',
                                     '{{ echo hi; echo \'"""\'; yes hello; }} | "$Q" chat -m {m} --max-tokens 2'])
def test_endless_chat_input_is_read_only_up_to_a_limit(tiny_folder, command):
    """A piped line without end (/dev/zero) or a \"\"\" block that never closes was read into memory without
    bound: 7.6 GB resident in 25 s."""
    done = shell(f"ulimit -v {mapped_by_a_run(tiny_folder) // 1024 + HEADROOM}; " + command.format(m=tiny_folder),
                 timeout=60)
    one_error_line(done, "larger than 16 MiB")


def test_a_prompt_file_that_cannot_be_read_is_named(tiny_folder):
    """Its read error reached main, which blamed standard output: "cannot write to standard output: Input/output
    error" (reading /proc/self/mem at offset 0 is an EIO, as a failing disk's file is)."""
    line = one_line_error(invoke("generate", "-m", str(tiny_folder), "--prompt-file", "/proc/self/mem"),
                          "--prompt-file", "/proc/self/mem", "Input/output error", exit_code=2)
    assert "standard output" not in line


def test_a_deleted_working_directory_is_named(tmp_path, tiny_folder):
    done = shell(f'mkdir gone && cd gone && rmdir ../gone && "$Q" generate -m {tiny_folder} --prompt hi', cwd=tmp_path)
    one_error_line(done, "working directory no longer exists")


def test_a_device_as_the_model_is_not_a_write_error():
    done = shell('"$Q" generate --model /dev/zero --prompt hi')
    one_error_line(done, "/dev/zero")
    assert "write" not in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------
# Memory: what a run will allocate is checked against the limits before it allocates
# ---------------------------------------------------------------------------------------------

HEADROOM = 4000000  # KiB (3.8 GiB) of address space beyond what a run of the tiny model maps on this machine


def ulimit(tiny_folder) -> str:
    """`ulimit -v N`: N KiB, HEADROOM more than a run of the tiny model maps here (on a GPU, MLX's CUDA
    backend maps about 295 GiB as it is imported)."""
    return f"ulimit -v {mapped_by_a_run(tiny_folder) // 1024 + HEADROOM}"


def test_perplexity_context_beyond_the_positions_or_the_memory_is_refused(tmp_path, tiny_folder):
    text = tmp_path / "long.txt"
    text.write_text("the quick brown fox " * 5000)
    done = shell(f'"$Q" perplexity -m {tiny_folder} --file {text} --context 100000')
    one_error_line(done, "--context", "100000", "32768 positions", returncode=2)
    limited = ulimit(tiny_folder)
    done = shell(f'{limited}; "$Q" perplexity -m {tiny_folder} --file {text} --context 32768')  # 48 GiB of scores
    one_error_line(done, "--context 32768 needs about", "GiB", limited, returncode=2)
    done = shell(f'{limited}; "$Q" perplexity -m {tiny_folder} --file {text} --context 256')
    assert done.returncode == 0, done.stderr[-2000:]


def test_weights_beyond_the_memory_are_refused_before_loading(tmp_path, tiny_folder):
    folder = tmp_path / "huge"
    folder.mkdir()
    for f in tiny_folder.iterdir():
        (folder / f.name).symlink_to(f)
    raw = json.loads((tiny_folder / "config.json").read_text())
    (folder / "config.json").unlink()
    # in range, but 64 layers of 3 x 128 x 262144 float32 MLP weights: about 24 GiB
    (folder / "config.json").write_text(json.dumps({**raw, "intermediate_size": 262144, "num_hidden_layers": 64}))
    limited = ulimit(tiny_folder)
    done = shell(f'{limited}; "$Q" generate -m {folder} --prompt hi', timeout=60)
    one_error_line(done, "needs about", "GiB", limited)
    done = shell(f'{limited}; "$Q" bench --shape qwen2-7b --no-int4 --trials 1', timeout=60)  # 14 GiB at bfloat16
    one_error_line(done, "qwen2-7b", "needs about", limited)


def test_an_empty_home_does_not_write_to_the_root(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "")
    root = weights.cache_root()
    assert root != Path("/.cache/qwen2-scratch") and root.is_absolute() and str(root).endswith(".cache/qwen2-scratch")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert weights.cache_root() == root  # empty counts as unset
    monkeypatch.setenv("HOME", "/")
    with pytest.raises(weights.ModelError, match="XDG_CACHE_HOME"):
        weights.cache_root()
