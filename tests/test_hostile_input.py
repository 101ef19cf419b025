"""Hostile input and faults: every one gets a one-line error and a non-zero exit, never a traceback, a
hang, runaway memory or an exit 0 with garbage (issue 12)."""

import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import json
import resource
import subprocess

import pytest
from conftest import COMMAND, TINY, invoke, tiny_model
from test_weights import write_gguf

import weights


def one_line_error(result, *words, exit_code=1):
    """A CliRunner result that failed with exactly one line on stderr holding every one of words."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
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


def run_limited(*args):
    """The console script under an address-space limit, so that a runaway cannot hurt the machine."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    return subprocess.run([str(COMMAND), *args], capture_output=True, text=True, timeout=300, preexec_fn=limit)


def test_a_billion_layers_is_refused_before_anything_is_built(tmp_path, tiny_folder):
    folder = copy_with_config(tmp_path, tiny_folder, "huge", num_hidden_layers=10**9)
    result = run_limited("generate", "-m", str(folder), "--prompt", "hi", "--max-tokens", "2")
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "num_hidden_layers is 1000000000" in result.stderr, result.stderr


def test_a_gguf_with_a_billion_blocks_is_refused(tmp_path, tiny_tokenizer_dir):
    model, raw = tiny_model(tie=False)
    write_gguf(tmp_path / "huge.gguf", model, {**raw, "num_hidden_layers": 10**9}, tiny_tokenizer_dir)
    result = run_limited("pull", "-m", str(tmp_path / "huge.gguf"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "num_hidden_layers is 1000000000" in result.stderr and "Traceback" not in result.stderr


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
]


@pytest.mark.parametrize("changes,words", BAD_CONFIGS, ids=[str(c) for c, _ in BAD_CONFIGS])
def test_bad_config_values_are_named(tmp_path, tiny_folder, changes, words):
    folder = copy_with_config(tmp_path, tiny_folder, "bad", **changes)
    line = one_line_error(invoke("generate", "-m", str(folder), "--prompt", "hi"), words, "config.json")
    assert "expected" in line


def test_quantization_bits_that_do_not_match_the_data(tmp_path, tiny_tokenizer_dir):
    from conftest import write_checkpoint

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
