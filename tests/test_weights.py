"""Every model source (MLX, Hugging Face, GGUF, hub cache, the packaged model) and every loading error."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import json
import pickle
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from test_convert import write_gguf

from conftest import (
    LOGITS_ATOL_F32,
    LOGITS_TOL,
    REAL_LOGITS_ATOL,
    TINY,
    assert_close,
    log_softmax,
    mlx_lm_logits,
    run_cli,
    tiny_model,
    write_checkpoint,
)
from qwen2s import cli, weights

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 7, 120]])


@pytest.mark.parametrize("tie,quantize,shards", [
    (True, None, 1), (False, None, 2),
    (True, (4, 32), 1), (False, (4, 64), 1), (True, (4, 128), 2),
    (False, (8, 32), 1), (True, (8, 64), 1), (False, (8, 128), 3),
])
def test_mlx_folder_loads_and_matches_mlx_lm(tmp_path, tiny_tokenizer_dir, tie, quantize, shards):
    model, raw = tiny_model(tie, quantize)
    folder = write_checkpoint(tmp_path / "m", model, raw, tiny_tokenizer_dir, shards=shards)
    params, config, tokenizer = weights.load(str(folder), "float32")
    assert ("lm_head" in params) == (not tie)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(params))  # dense, dequantized
    ours, _ = q.forward(params, config, TOKENS)
    assert_close(ours, mlx_lm_logits(folder, TOKENS), 0, LOGITS_ATOL_F32, f"folder {tie} {quantize} {shards}")
    assert 2 in tokenizer.eos_token_ids and 0 in tokenizer.eos_token_ids  # <|im_end|> and <|endoftext|>


def test_per_layer_quantization_overrides(tmp_path, tiny_tokenizer_dir):
    model, raw = tiny_model(False)
    # as mlx_lm writes mixed-precision checkpoints: one layer's own entry in config.json
    with mx.stream(mx.cpu):  # as tiny_model quantizes
        nn.quantize(model, group_size=64, bits=4,
                    class_predicate=lambda p, m: isinstance(m, nn.Linear | nn.Embedding) and p != "lm_head")
        nn.quantize(model, group_size=32, bits=8, class_predicate=lambda p, m: p == "lm_head")
        mx.eval(model.parameters())
    raw["quantization"] = {"group_size": 64, "bits": 4, "lm_head": {"group_size": 32, "bits": 8}}
    folder = write_checkpoint(tmp_path / "m", model, raw, tiny_tokenizer_dir)
    params, config, _ = weights.load(str(folder), "float32")
    ours, _ = q.forward(params, config, TOKENS)
    assert_close(ours, mlx_lm_logits(folder, TOKENS), 0, LOGITS_ATOL_F32, "mixed quantization")


def test_hugging_face_folder_drops_what_qwen2_does_not_use(tmp_path, tiny_tokenizer_dir):
    model, raw = tiny_model(tie=True)
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": mx.zeros((16,)),
             "lm_head.weight": mx.zeros((300, 128))}  # tied: a stale lm_head is dropped
    folder = write_checkpoint(tmp_path / "hf", model, {**raw, "architectures": ["Qwen2ForCausalLM"]},
                              tiny_tokenizer_dir, extra=extra, dtype=mx.bfloat16)
    params, config, _ = weights.load(str(folder), "bfloat16")
    assert "lm_head" not in params and params["model"]["norm"]["weight"].dtype == mx.bfloat16
    ours, _ = q.forward(params, config, TOKENS)
    theirs = mlx_lm_logits(folder, TOKENS, mx.bfloat16)
    assert_close(log_softmax(ours), log_softmax(theirs), *LOGITS_TOL[mx.bfloat16], "bfloat16 folder")


def test_dtype_choice(tiny_folder):
    for name, dtype in weights.DTYPES.items():
        params, _, _ = weights.load(str(tiny_folder), name)
        assert {v.dtype for _, v in tree_flatten(params)} == {dtype}


DEFAULT_DTYPES = [(d, t) for d, t in [(mx.cpu, mx.float32), (mx.gpu, mx.bfloat16)] if mx.is_available(d)]


@pytest.mark.parametrize("device,dtype", DEFAULT_DTYPES, ids=[str(d) for d, _ in DEFAULT_DTYPES])
def test_no_dtype_means_float32_on_the_cpu_and_bfloat16_on_a_gpu(tiny_folder, device, dtype):
    before = mx.default_device()
    mx.set_default_device(device)
    try:
        params, _, _ = weights.load(str(tiny_folder))
    finally:
        mx.set_default_device(before)
    assert {v.dtype for _, v in tree_flatten(params)} == {dtype}










def make_hub_cache(root, repo_id, folder):
    """The real hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    return snapshot



def test_hub_id_loads_from_the_local_hub_cache_offline(tmp_path, tiny_folder):
    snapshot = make_hub_cache(tmp_path / "hub", "test-org/tiny-qwen2", tiny_folder)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = run_cli("pull", "--model", "test-org/tiny-qwen2", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{snapshot}\n"
    result = run_cli("generate", "--model", "test-org/tiny-qwen2", "--prompt", "hello", "--max-tokens", "3",
                     env=env)
    assert result.returncode == 0, result.stderr
    result = run_cli("pull", "--model", "qwen2-0.5b", env=env)  # an alias, not in this cache
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot reach the model hub, and Qwen/Qwen2-0.5B-Instruct-MLX is not in the local hub cache" \
        in result.stderr


# ---------------------------------------------------------------------------------------------
# Errors: one line, what is wrong and what to do, a non-zero exit code, no traceback
# ---------------------------------------------------------------------------------------------


class RunsCode:
    """Unpickled, it creates the file it names: what any code in a hostile checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def code_running_pickle(path) -> bytes:
    return pickle.dumps(RunsCode(path))


def broken_folders(root, tiny_folder, tokenizer_dir):
    """name -> (a --model value, the words its error must contain)."""
    cases = {}

    def copy(name):
        folder = root / name
        folder.mkdir()
        for f in tiny_folder.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        return folder

    cases["missing path"] = (str(root / "nope"), "not an existing path, an alias or a hub id")
    (root / "empty").mkdir()
    cases["no config"] = (str(root / "empty"), "no config.json")
    llama = copy("llama")
    (llama / "config.json").write_text(json.dumps({**TINY, "model_type": "llama"}))
    cases["llama config"] = (str(llama), 'model_type is "llama"')
    bad_json = copy("bad-json")
    (bad_json / "config.json").write_text("{nope")
    cases["bad config"] = (str(bad_json), "not a readable JSON config")
    truncated = copy("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 1000])
    cases["truncated safetensors"] = (str(truncated), "truncated or corrupt safetensors")
    garbage = copy("garbage")
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    cases["corrupt header"] = (str(garbage), "truncated or corrupt safetensors")
    model, raw = tiny_model(tie=False)
    flat = dict(tree_flatten(model.parameters()))
    for name, change, words in [
        ("missing key", lambda f: f.pop("model.layers.1.mlp.up_proj.weight"), "no model.layers.1.mlp.up_proj.weight"),
        ("wrong shape", lambda f: f.update({"model.norm.weight": mx.ones((7,))}), "model.norm.weight has shape [7]"),
        ("unexpected key", lambda f: f.update({"model.extra.weight": mx.ones((2,))}), "unexpected weight model.extra"),
    ]:
        folder = copy(name.replace(" ", "-"))
        broken = dict(flat)
        change(broken)
        mx.save_safetensors(str(folder / "model.safetensors"), broken)
        cases[name] = (str(folder), words)
    pickle_file = root / "pytorch_model.bin"
    pickle_file.write_bytes(code_running_pickle(root / "pickle-ran"))
    cases["pickle file"] = (str(pickle_file), "pickle checkpoints are refused")
    pickle_folder = root / "pickle-folder"
    pickle_folder.mkdir()
    (pickle_folder / "pytorch_model.bin").write_bytes(code_running_pickle(root / "pickle-ran"))
    cases["pickle folder"] = (str(pickle_folder), "pickle checkpoints are refused")
    beside_config = copy("pickle-beside-config")
    (beside_config / "model.safetensors").unlink()
    (beside_config / "pytorch_model.bin").write_bytes(code_running_pickle(root / "pickle-ran"))
    cases["pickle beside config.json"] = (str(beside_config), "pickle checkpoints are refused")
    write_gguf(root / "truncated.gguf", model, raw, tokenizer_dir, truncate=True)
    cases["truncated gguf"] = (str(root / "truncated.gguf"), "truncated or corrupt GGUF")
    write_gguf(root / "llama.gguf", model, raw, tokenizer_dir, arch="llama")
    cases["llama gguf"] = (str(root / "llama.gguf"), "GGUF architecture is 'llama'")
    cases["not a model"] = ("no-such-thing", "not an existing path, an alias or a hub id")
    return cases


def test_every_model_error_is_one_line_with_exit_code_1(tmp_path, tiny_folder, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runner = CliRunner()
    for name, (model, words) in broken_folders(tmp_path, tiny_folder, tiny_tokenizer_dir).items():
        result = runner.invoke(cli.cli, ["generate", "--model", model, "--prompt", "hi"])
        assert result.exit_code == 1, f"{name}: exit {result.exit_code}: {result.output}"
        assert words in result.output, f"{name}: {result.output}"
        assert result.output.count("\n") == 1 and result.output.startswith("Error: "), f"{name}: {result.output}"
        assert isinstance(result.exception, SystemExit), f"{name}: {result.exception!r}"
    assert not (tmp_path / "pickle-ran").exists(), "a pickle was loaded: its code ran"
    # no half-written conversion was left behind by the failed GGUF conversions
    assert not any((tmp_path / "cache" / "qwen2-scratch").glob("gguf-*"))
    assert not any((tmp_path / "cache" / "qwen2-scratch").glob(".gguf-*"))


def test_model_error_in_a_real_subprocess(tmp_path):
    result = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: no model")
    result = run_cli("generate", "--dtype", "float64", "--prompt", "hi")
    assert result.returncode == 2 and "'float64' is not one of" in result.stderr









@pytest.mark.packaged_model
def test_packaged_tokenizer_known_ids(packaged):
    tokenizer = packaged[3]
    assert tokenizer.encode("Hello world, 你好") == [9707, 1879, 11, 220, 108386]
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]) == [151644, 151645, 151643]
    assert tokenizer.eos_token_ids == {151645, 151643}
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.packaged_model
def test_packaged_folder_loads_in_mlx_lm_with_the_same_logits(packaged, packaged_mlx_lm):
    _, params, config, tokenizer = packaged
    tokens = mx.array(tokenizer.encode("def quicksort(items):\n    if len(items) <= 1:"))[None]
    ours, _ = q.forward(params, config, tokens)
    assert_close(ours, packaged_mlx_lm[0](tokens), 0, REAL_LOGITS_ATOL, "packaged model logits")




def test_the_weights_error_comes_first_though_the_tokenizer_loads_beside_them(tmp_path, tiny_folder):
    """load parses the tokenizer in a thread while MLX reads the weights (a one-shot command starts 1.2-2 s sooner on
    the packaged model); a folder broken both ways still names its weights first, and either error alone."""
    folder = tmp_path / "both"
    shutil.copytree(tiny_folder, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(weights.ModelError, match="no tokenizer files"):
        weights.load(str(folder), "float32")
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(weights.ModelError, match="truncated or corrupt safetensors"):
        weights.load(str(folder), "float32")
    params, config, tokenizer = weights.load(str(tiny_folder), "float32")
    assert tokenizer.encode("hello") and params["model"]["layers"][0]["mlp"]["up_proj"]["weight"].dtype == mx.float32


def test_the_tokenizer_thread_imports_nothing_that_makes_mlx_arrays(tiny_folder):
    """The helper thread that parses the tokenizer must not be where mlx_lm is first imported: its import makes MLX
    arrays (its samplers' compile reads mx.random.state), and MLX may abort the process at exit for arrays made by a
    thread that has ended (a CLI error exit, "terminate called without an active exception", once in CI). In a
    fresh process, as the command line loads a model."""
    import subprocess
    import sys

    script = f"""
import sys, threading
from qwen2s import weights
start = threading.Thread.start
def checked(self):
    assert "mlx_lm.sample_utils" in sys.modules, "mlx_lm imported first in the helper thread"
    start(self)
threading.Thread.start = checked
weights.load({str(tiny_folder)!r}, "float32")
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
