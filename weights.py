"""Find a Qwen2 model, dequantize it, and hand back (params, config, tokenizer).

Sources, all ending in the same nested dict of dense arrays with Hugging Face key names:
  1. a hub repo id (or an alias: qwen2-0.5b, qwen2-1.5b, qwen2-7b), through the hub cache;
  2. a local MLX folder, quantized (affine, any bits and group size) or not;
  3. a local Hugging Face folder of the original checkpoint;
  4. a GGUF file of the qwen2 architecture, converted once into a Hugging Face folder (convert.py);
  5. the packaged offline model (a GGUF split over six data packages), when none is named.
"""

from qwen2s.qwen2_scratch import Config, Sampling, config_from_dict  # first: the model loads the fast BLAS before MLX

# isort: split
import json
import math
import os
import re
import resource
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
from mlx.utils import tree_unflatten

from qwen2s import blas
from qwen2s.convert import (
    ModelError,
    Rule,
    cache_root,
    gguf_folder,
    is_complete,
    is_number,
    is_whole,
    one_line,
    packaged_folder,
    shown,
)

__all__ = ["load", "resolve", "sampling_defaults", "sampling_for", "load_tokenizer", "ModelError", "ALIASES"]

# transformers (the tokenizer) would announce at import that it has no PyTorch: it needs none here
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


ALIASES = {
    "qwen2-0.5b": "Qwen/Qwen2-0.5B-Instruct-MLX",
    "qwen2-1.5b": "Qwen/Qwen2-1.5B-Instruct-MLX",
    "qwen2-7b": "Qwen/Qwen2-7B-Instruct-MLX",
}
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
TOKENIZER_FILES = [("tokenizer.json",), ("vocab.json", "merges.txt")]  # a fast (Rust) or a slow BPE tokenizer
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer.model"]
CHOICES = (
    "a local folder (config.json + *.safetensors), a .gguf file, an alias "
    f"({', '.join(ALIASES)}), a hub id like Qwen/Qwen2-0.5B-Instruct-MLX, "
    "or no --model for the packaged model"
)


def default_dtype() -> str:
    """float32 on the CPU (its only fast matmul path), bfloat16 on a GPU (Qwen2 overflows float16)."""
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


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


PACKAGED_NAME = "qwen2.5-coder-0.5b-instruct"  # the packaged model's id (the server lists it; --model takes it)


def resolve(model: str | None) -> Path:
    """A model name -> the local folder it loads from: a path first, then an alias, then a hub id."""
    if model == "":  # -m "$MODEL" with MODEL unset: not a request for the packaged model
        raise ModelError("the model is an empty name; leave --model out for the packaged model, or name one")
    if model is None or (model == PACKAGED_NAME and not expand_user(model).exists()):
        return packaged_folder(check_converted)
    path = expand_user(model)
    if path.exists():
        return local_folder(path.resolve())
    if model in ALIASES:
        return hub_folder(ALIASES[model])
    if is_hub_id(model):
        return hub_folder(model)
    raise ModelError(f"no model '{model}': not an existing path, an alias or a hub id (owner/name); use {CHOICES}")


def expand_user(model: str) -> Path:
    """~ and ~user expanded where they can be (~nobody-here is left as written: then not a path)."""
    try:
        return Path(model).expanduser()
    except RuntimeError:  # no such user, or no home folder
        return Path(model)


def is_hub_id(name: str) -> bool:
    """owner/name as the hub allows them: nothing path-like (.., ~, a leading . or /) reaches the hub cache."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def local_folder(path: Path) -> Path:
    if path.is_file():
        if path.suffix == ".gguf":
            return gguf_folder(path, check_converted)
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


# ---------------------------------------------------------------------------------------------
# Loading a folder
# ---------------------------------------------------------------------------------------------


EOS_RULE = Rule(lambda v: is_whole(v) and v >= 0 or isinstance(v, list) and all(is_whole(i) and i >= 0 for i in v),
                "a token id or a list of token ids")
OBJECT_RULE = Rule(lambda v: isinstance(v, dict), "an object")
# mlx_lm and transformers scale RoPE as rope_scaling says (YaRN, linear...); ours has no scaling: refused, not ignored
UNSCALED_RULE = Rule(lambda v: isinstance(v, dict) and v.get("rope_type", v.get("type")) == "default",
                     "null: this project's RoPE has no scaling (remove it: contexts up to max_position_embeddings "
                     "need none)")
# generation_config.json's values that we use (null: not set)
GENERATION_RULES = {
    "temperature": Rule(lambda v: is_number(v) and 0 <= v < math.inf, "a number of at least 0"),
    "top_p": Rule(lambda v: is_number(v) and 0 < v <= 1, "a number above 0 and at most 1"),
    "top_k": Rule(lambda v: is_whole(v) and 0 <= v <= 1 << 31, "a whole number from 0 to 2147483648"),
    "repetition_penalty": Rule(lambda v: is_number(v) and 0 < v < math.inf, "a number above 0"),
    "do_sample": Rule(lambda v: isinstance(v, bool), "true or false"),
    "eos_token_id": EOS_RULE,
}
SAMPLING_NAMES = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repetition_penalty"}


def check_value(raw: dict, key: str, rule: Rule, where) -> None:
    if raw.get(key) is not None and not rule.test(raw[key]):
        raise ModelError(f"{where}: {key} is {shown(raw[key])}, expected {rule.expected}")


def sampling_defaults(folder: Path) -> dict:
    """The sampling values of the folder's generation_config.json, in our names ({} without one); each checked."""
    path = folder / "generation_config.json"
    g = read_json(path) if path.is_file() else {}
    for key, rule in GENERATION_RULES.items():
        check_value(g, key, rule, path)
    defaults = {ours: g[theirs] for theirs, ours in SAMPLING_NAMES.items() if g.get(theirs) is not None}
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
    sampling_defaults(folder)  # a bad generation_config.json fails here, before any weight is read
    # imported here, not first in the helper thread: importing mlx_lm makes MLX arrays (its samplers' compile reads
    # mx.random.state), and MLX may abort the process at exit for arrays a thread that has ended made (engine.py)
    import mlx_lm.tokenizer_utils  # noqa: F401
    with ThreadPoolExecutor(1) as parser:  # the tokenizer parses (Python) while MLX reads the weights (no GIL);
        tokenizing = parser.submit(load_tokenizer, folder)  # not the other way: MLX aborts the process at exit
        params, config = load_params(folder, DTYPES[dtype])  # when a thread that computed has ended (engine.py)
        tokenizer = tokenizing.result()  # the weights' error first, as when one followed the other
    check_vocabulary(tokenizer, config, folder)
    return params, config, tokenizer


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a ModelError naming the file."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, an integer past 4300 digits
        raise ModelError(f"{path}: not a readable JSON config ({one_line(e)})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: the config is not a JSON object")
    return raw


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    raw = read_json(path)
    if raw.get("model_type") != "qwen2":
        raise ModelError(f"{path}: model_type is {shown(raw.get('model_type'))}, "
                         "but this project runs only 'qwen2' models")
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
            raise ModelError(f"{where}: {key} is {shown(raw[key])}, {problem}")
    for key in ("quantization", "quantization_config"):
        check_value(raw, key, OBJECT_RULE, where)
    check_value(raw, "eos_token_id", EOS_RULE, where)
    check_value(raw, "rope_scaling", UNSCALED_RULE, where)
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
    nbytes = sum(math.prod(shape) for shape in expected_shapes(config).values()) * dtype.size
    # decode streams them all; in MLX's CPU build only, whose arrays come from malloc's heap (a CUDA build's from CUDA)
    in_heap = mx.default_device() == mx.cpu and not mx.cuda.is_available() and not mx.metal.is_available()
    with blas.huge_pages_for(nbytes if in_heap else 0):
        flat = read_files(files)
        flat = sanitize(flat, config)
        flat = dequantize(flat, raw.get("quantization") or raw.get("quantization_config"), folder)
        check_shapes(flat, config, folder)
        if not (folder.is_relative_to(cache_root()) and is_complete(folder)):  # ours were checked when made
            check_finite(flat, folder)
        flat = {k: v.astype(dtype) for k, v in flat.items()}
        params = tree_unflatten(list(flat.items()))
        mx.eval(params)
    return params, config


def read_files(files: list[Path]) -> dict:
    """Every file's tensors in one dict. A name in two files is an error: the last file's had replaced the other's
    silently, two checkpoints' weights mixed (a stale model.safetensors beside new shards), an exit 0 with garbage."""
    flat, source = {}, {}
    for f in files:
        for key, value in read_safetensors(f).items():
            if key in source:
                raise ModelError(f"{f}: {key} is in {source[key].name} too (two checkpoints in one folder?); "
                                 "keep one checkpoint's files")
            flat[key], source[key] = value, f
    return flat


def read_safetensors(path: Path) -> dict:
    """The file's tensors, once the safetensors library has checked it: a JSON object for a header
    (of at most 100 MB), each tensor's dtype, shape and offsets consistent, and the file whole."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():  # a link to nothing (a hub snapshot's blob deleted) or a loop of links
        raise ModelError(f"{path}: a link to a file that does not exist ({os.path.realpath(path)}); "
                         "download the weights again")
    if not path.is_file():  # a FIFO would be waited on for ever, a device read without end
        raise ModelError(f"{path}: not a regular file (a FIFO, a device or a folder); download the weights again")
    try:
        with safe_open(str(path), "numpy"):
            pass
        return mx.load(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:  # RuntimeError, ValueError: mx.load's
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
            try:
                out[key] = mx.dequantize(value, scales, flat.get(prefix + ".biases"), group_size=q["group_size"],
                                         bits=q["bits"], mode=q.get("mode", "affine"))
            except (ValueError, TypeError, RuntimeError) as e:  # a mode MLX lacks, or dtypes it refuses
                raise ModelError(f"{folder}: cannot dequantize {prefix} ({one_line(e)})") from None
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


def check_converted(tensors: dict, raw: dict, where: Path) -> None:
    """What convert.py asks of a conversion before writing it: a sound config and every tensor's shape."""
    check_shapes(tensors, check_config(raw, where), where)


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
            raw = read_json(path)
            check_value(raw, "eos_token_id", EOS_RULE, path)  # load_tokenizer may be called alone
            value = raw.get("eos_token_id")
            ids += value if isinstance(value, list) else [value] if value is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab]
    return list(dict.fromkeys(ids))


def load_tokenizer(folder: Path):
    """mlx_lm's own loader, which picks the streaming detokenizer that fits (BPE for Qwen2), with every EOS id."""
    from mlx_lm.tokenizer_utils import load as load_wrapper

    if not any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILES):
        # transformers would build a tokenizer of the special tokens alone, which encodes any text as nothing
        raise ModelError(f"{folder}: no tokenizer files (tokenizer.json, or vocab.json and merges.txt); "
                         "copy them from the model's release")
    try:
        tokenizer = load_wrapper(Path(folder), {"trust_remote_code": False})
    except Exception as e:  # transformers raises many kinds for a missing or broken tokenizer
        raise ModelError(f"{folder}: no usable tokenizer files ({one_line(e)})") from None
    if not tokenizer.encode("hello world"):
        raise ModelError(f"{folder}: the tokenizer encodes text as no tokens at all (an empty vocabulary?)")
    tokenizer.eos_token_ids = eos_ids(folder, tokenizer._tokenizer)
    return tokenizer


def check_vocabulary(tokenizer, config: Config, folder: Path) -> None:
    """Every id the tokenizer can give has a row in the embeddings (a gather past them reads garbage)."""
    largest = max(tokenizer.get_vocab().values())
    if largest >= config.vocab_size:
        raise ModelError(f"{folder}: the tokenizer has ids up to {largest}, but vocab_size is {config.vocab_size} "
                         "(the embedding rows): the tokenizer belongs to another model")
