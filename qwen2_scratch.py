"""Qwen2 from scratch in pure MLX: the forward pass, a KV cache, sampling and a command line.

The model is a set of pure functions over one nested parameter dict that keeps the
checkpoint's own key names: params["model"]["layers"][i]["self_attn"]["q_proj"]["weight"].
It follows week 1 of the tiny-llm course: softmax and linear, attention, RoPE, grouped-query
attention, RMSNorm and the SwiGLU MLP, the transformer block, the whole model, then text.

Shape legend, used in every comment below:
    B batch          L query length (new tokens)     S key length (cached + new tokens)
    E hidden size    H query heads                   K key/value heads
    G = H // K       D head dim (E // H)             F MLP hidden size
    V vocabulary size
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import NamedTuple

import click
import mlx.core as mx

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


class Config(NamedTuple):
    """A Qwen2 config with Hugging Face field names (a NamedTuple, so mx.compile accepts it)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def config_from_dict(d: dict) -> Config:
    """Build a Config from a checkpoint's config.json dict; unknown keys are ignored."""
    return Config(**{k: d[k] for k in Config._fields if k in d})


# ---------------------------------------------------------------------------------------------
# Day 1: softmax, linear, attention
# ---------------------------------------------------------------------------------------------


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """exp(x) / sum(exp(x)), stable: subtracting the max changes nothing but the overflow."""
    e = mx.exp(x - mx.max(x, axis=axis, keepdims=True))
    return e / mx.sum(e, axis=axis, keepdims=True)


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """[..., in] @ [out, in].T (+ [out]) -> [..., out]"""
    y = x @ weight.T
    return y if bias is None else y + bias


def causal_mask(L: int, S: int, offset: mx.array | int | None = None) -> mx.array:
    """[L, S] boolean, True where query i may see key j, aligned bottom-right.

    Query i sits at position offset + i, so it sees keys j <= offset + i; the default
    offset S - L is tril(k=S-L), right for a query shorter than the keys (decode).
    Keys past offset + L (unfilled cache slots) are never seen.
    """
    offset = S - L if offset is None else offset
    return mx.arange(S)[None, :] <= (mx.arange(L) + offset)[:, None]


def scaled_dot_product_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float | None = None,
    mask: mx.array | str | None = None,
) -> mx.array:
    """softmax(q @ k.T * scale + mask) @ v, grouped: [B, H, L, D], [B, K, S, D] -> [B, H, L, D].

    Each of the K key/value heads serves G = H // K query heads by broadcasting (no repeat).
    mask: None, "causal", a boolean array (True = attend) or an additive array,
    broadcastable to [B, H, L, S].
    """
    B, H, L, D = q.shape
    K, S = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    q = q.reshape(B, K, H // K, L, D)  # [B, K, G, L, D]
    k, v = k[:, :, None], v[:, :, None]  # [B, K, 1, S, D]
    scores = (q * scale) @ k.swapaxes(-1, -2)  # [B, K, G, L, S]
    scores = scores.astype(mx.float32)  # softmax in float32, as mx.fast does
    if isinstance(mask, str):
        mask = causal_mask(L, S)
    if mask is not None:
        if mask.ndim == 4:  # [B or 1, H or 1, L, S] -> [B or 1, K or 1, G or 1, L, S]
            mask = mask.reshape(mask.shape[0], -1, 1 if mask.shape[1] == 1 else H // K, L, S)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf)
        else:
            scores = scores + mask
    out = softmax(scores).astype(v.dtype) @ v  # [B, K, G, L, D]
    return out.reshape(B, H, L, D)


# ---------------------------------------------------------------------------------------------
# Day 2: rotary position embedding
# ---------------------------------------------------------------------------------------------


def rope(x: mx.array, theta: float, offset: mx.array | int = 0, traditional: bool = False) -> mx.array:
    """Rotate each pair of features by position * theta^(-2i/D): [B, H, L, D] -> [B, H, L, D].

    Qwen2 pairs feature i with i + D/2 (split halves); the traditional form pairs 2i with 2i+1.
    offset is the position of the first query (an mx.array, so a compiled step traces once).
    """
    L, D = x.shape[-2], x.shape[-1]
    inv_freq = theta ** (-mx.arange(0, D, 2, dtype=mx.float32) / D)  # [D/2]
    positions = mx.arange(L, dtype=mx.float32) + offset  # [L]
    angles = positions[:, None] * inv_freq[None, :]  # [L, D/2]
    cos, sin = mx.cos(angles), mx.sin(angles)
    if traditional:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    r1 = x1 * cos - x2 * sin  # [B, H, L, D/2]
    r2 = x2 * cos + x1 * sin
    if traditional:
        out = mx.stack([r1, r2], axis=-1).reshape(x.shape)
    else:
        out = mx.concatenate([r1, r2], axis=-1)
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Day 4: RMSNorm, SiLU and the SwiGLU MLP
# ---------------------------------------------------------------------------------------------


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """x / sqrt(mean(x^2) + eps) * weight: [..., E] -> [..., E]."""
    x32 = x.astype(mx.float32)  # accumulate in float32: bfloat16 squares lose too much
    normed = x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x)"""
    return x / (1 + mx.exp(-x))


def mlp(x: mx.array, gate_proj: dict, up_proj: dict, down_proj: dict) -> mx.array:
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases: [B, L, E] -> [B, L, F] -> [B, L, E]."""
    return linear(silu(linear(x, **gate_proj)) * linear(x, **up_proj), **down_proj)


# ---------------------------------------------------------------------------------------------
# The fast kernels: mx.fast at the same call sites (--kernels fast)
# ---------------------------------------------------------------------------------------------


def fast_rms_norm(x, weight, eps):
    return mx.fast.rms_norm(x, weight, eps)


def fast_rope(x, theta, offset=0, traditional=False):
    return mx.fast.rope(x, x.shape[-1], traditional=traditional, base=theta, scale=1.0, offset=offset)


def fast_attention(q, k, v, scale=None, mask=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


KERNELS = {
    "reference": (rms_norm, rope, scaled_dot_product_attention),
    "fast": (fast_rms_norm, fast_rope, fast_attention),
}


# ---------------------------------------------------------------------------------------------
# Day 3: the Qwen2 attention layer, with a KV cache that is plain data
# ---------------------------------------------------------------------------------------------


def self_attention(
    x: mx.array,
    q_proj: dict,
    k_proj: dict,
    v_proj: dict,
    o_proj: dict,
    config: Config,
    kv: tuple | None,
    offset: mx.array,
    kernels: str = "reference",
) -> tuple[mx.array, tuple | None]:
    """Grouped-query attention: [B, L, E] -> [B, L, E], and the layer's updated (keys, values).

    kv is this layer's cache, ([B, K, S, D], [B, K, S, D]) preallocated to capacity S, of
    which the first offset positions hold earlier tokens; None attends to x alone.
    """
    _, rope_fn, attention_fn = KERNELS[kernels]
    B, L, _ = x.shape
    H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    # Qwen2 gives q, k and v a bias (o_proj has none)
    q = linear(x, **q_proj).reshape(B, L, H, D).transpose(0, 2, 1, 3)  # [B, H, L, D]
    k = linear(x, **k_proj).reshape(B, L, K, D).transpose(0, 2, 1, 3)  # [B, K, L, D]
    v = linear(x, **v_proj).reshape(B, L, K, D).transpose(0, 2, 1, 3)  # [B, K, L, D]
    q = rope_fn(q, config.rope_theta, offset)
    k = rope_fn(k, config.rope_theta, offset)
    if kv is None:
        mask = "causal" if L > 1 else None
    else:
        keys = mx.slice_update(kv[0], k, offset, axes=(2,))  # [B, K, S, D]
        values = mx.slice_update(kv[1], v, offset, axes=(2,))
        kv, k, v = (keys, values), keys, values
        mask = causal_mask(L, keys.shape[2], offset)  # [L, S]: hides unfilled slots too
    out = attention_fn(q, k, v, scale=D**-0.5, mask=mask)  # [B, H, L, D]
    out = out.transpose(0, 2, 1, 3).reshape(B, L, H * D)  # [B, L, E]
    return linear(out, **o_proj), kv


# ---------------------------------------------------------------------------------------------
# Day 5: the block and the whole model
# ---------------------------------------------------------------------------------------------


def block(
    x: mx.array,
    layer: dict,
    config: Config,
    kv: tuple | None,
    offset: mx.array,
    kernels: str = "reference",
) -> tuple[mx.array, tuple | None]:
    """Pre-norm transformer block: [B, L, E] -> [B, L, E]."""
    norm = KERNELS[kernels][0]
    eps = config.rms_norm_eps
    a, kv = self_attention(
        norm(x, layer["input_layernorm"]["weight"], eps), **layer["self_attn"],
        config=config, kv=kv, offset=offset, kernels=kernels,
    )
    h = x + a
    out = h + mlp(norm(h, layer["post_attention_layernorm"]["weight"], eps), **layer["mlp"])
    return out, kv


def hidden_states(
    params: dict, config: Config, tokens: mx.array, cache: dict | None = None, kernels: str = "reference"
) -> tuple[mx.array, dict | None]:
    """Token ids [B, L] -> final-normed hidden states [B, L, E], and the updated cache."""
    model = params["model"]
    x = model["embed_tokens"]["weight"][tokens]  # [B, L, E]
    offset = mx.array(0) if cache is None else cache["offset"]
    new_kv = []
    for i, layer in enumerate(model["layers"]):
        kv = None if cache is None else cache["layers"][i]
        x, kv = block(x, layer, config, kv, offset, kernels)
        new_kv.append(kv)
    x = KERNELS[kernels][0](x, model["norm"]["weight"], config.rms_norm_eps)
    if cache is not None:
        cache = {"layers": new_kv, "offset": offset + tokens.shape[1]}
    return x, cache


def output_logits(params: dict, h: mx.array) -> mx.array:
    """[..., E] -> [..., V] through lm_head, or the embedding matrix when embeddings are tied."""
    head = params["lm_head"] if "lm_head" in params else params["model"]["embed_tokens"]
    return linear(h, head["weight"])


def forward(
    params: dict, config: Config, tokens: mx.array, cache: dict | None = None, kernels: str = "reference"
) -> tuple[mx.array, dict | None]:
    """Token ids [B, L] -> logits [B, L, V], and the cache with these L tokens added."""
    h, cache = hidden_states(params, config, tokens, cache, kernels)
    return output_logits(params, h), cache


# ---------------------------------------------------------------------------------------------
# The KV cache: preallocated per-layer arrays, grown in blocks
# ---------------------------------------------------------------------------------------------

CACHE_BLOCK = 256  # positions added at a time; the compiled step traces once per capacity


def new_cache(config: Config, batch: int = 1, dtype=mx.float32) -> dict:
    """An empty cache: per layer (keys, values) of [B, K, 0, D], and offset 0."""
    shape = (batch, config.num_key_value_heads, 0, config.head_dim)
    layers = [(mx.zeros(shape, dtype), mx.zeros(shape, dtype)) for _ in range(config.num_hidden_layers)]
    return {"layers": layers, "offset": mx.array(0)}


def cache_capacity(cache: dict) -> int:
    return cache["layers"][0][0].shape[2]


def reserve(cache: dict, length: int, block_size: int = CACHE_BLOCK) -> dict:
    """Grow every layer's arrays to hold `length` positions, rounded up to whole blocks."""
    have = cache_capacity(cache)
    if length <= have:
        return cache
    want = -(-length // block_size) * block_size

    def grow(a):  # [B, K, have, D] -> [B, K, want, D]
        pad = mx.zeros((*a.shape[:2], want - have, a.shape[3]), a.dtype)
        return mx.concatenate([a, pad], axis=2)

    return {"layers": [(grow(k), grow(v)) for k, v in cache["layers"]], "offset": cache["offset"]}


# ---------------------------------------------------------------------------------------------
# Days 6 and 7: prefill, one compiled decode step, sampling, generation
# ---------------------------------------------------------------------------------------------

# Prompt tokens per forward call, measured: on the 2-core CPU 256 beats 512 (less of the softmax
# is spent on masked scores); a GPU wants long chunks, as mlx_lm's 2048.
PREFILL_CHUNK = {"cpu": 256, "gpu": 2048}


def prefill(params, config, tokens, cache, kernels="reference", chunk=None):
    """Run the prompt [B, L] into the cache in chunks -> (logits of its last token [B, V], cache)."""
    chunk = chunk or PREFILL_CHUNK["gpu" if mx.default_device() == mx.gpu else "cpu"]
    offset = int(cache["offset"].item())
    for start in range(0, tokens.shape[1], chunk):
        piece = tokens[:, start : start + chunk]
        # grown to the exact length, so that the prompt attends to no empty slot
        cache = reserve(cache, offset + start + piece.shape[1], block_size=1)
        h, cache = hidden_states(params, config, piece, cache, kernels)
        if start + chunk < tokens.shape[1]:
            mx.eval(cache)  # only the cache: no logits for the prompt's inner tokens
    return output_logits(params, h[:, -1]), cache


def decode_step(params, config, token, cache, kernels="reference"):
    """One token per sequence [B, 1] -> (logits [B, V], cache). Compiled below."""
    h, cache = hidden_states(params, config, token, cache, kernels)
    return output_logits(params, h[:, -1]), cache


compiled_decode_step = mx.compile(decode_step)


class Sampling(NamedTuple):
    """How the next token is drawn; each default turns its filter off (temp 0 is greedy)."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 20


def apply_repetition_penalty(logits: mx.array, recent: mx.array, penalty: float) -> mx.array:
    """Make recently seen tokens less likely: [B, V], [N] -> [B, V] (positive / p, negative * p)."""
    seen = logits[:, recent]  # [B, N]
    logits[:, recent] = mx.where(seen < 0, seen * penalty, seen / penalty)
    return logits


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens: [B, V] -> [B, V] with the rest at -inf."""
    drop = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, k:]
    return mx.put_along_axis(logprobs, drop, mx.array(-mx.inf, logprobs.dtype), axis=-1)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches p: [B, V] -> [B, V]."""
    ascending = mx.sort(logprobs, axis=-1)
    probs = mx.exp(ascending.astype(mx.float32))
    mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)  # of likelier tokens
    total = mass_above[:, :1] + probs[:, :1]
    dropped = (mass_above >= p * total).sum(axis=-1, keepdims=True)  # [B, 1]
    threshold = mx.take_along_axis(ascending, dropped, axis=-1)
    return mx.where(logprobs < threshold, -mx.inf, logprobs)


def apply_min_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep tokens at least p times as likely as the most likely one: [B, V] -> [B, V]."""
    floor = mx.max(logprobs, axis=-1, keepdims=True) + math.log(p)
    return mx.where(logprobs < floor, -mx.inf, logprobs)


def sample(logits: mx.array, s: Sampling) -> mx.array:
    """Logits [B, V] -> next token ids [B], after the filters that s turns on."""
    if s.temp == 0:
        return mx.argmax(logits, axis=-1)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if 0 < s.top_p < 1:
        logprobs = apply_top_p(logprobs, s.top_p)
    if s.min_p > 0:
        logprobs = apply_min_p(logprobs, s.min_p)
    if s.top_k > 0:
        logprobs = apply_top_k(logprobs, s.top_k)
    return mx.random.categorical(logprobs * (1 / s.temp))


# The random state goes in and comes out, so a compiled sampler draws fresh numbers each call.
compiled_sample = mx.compile(sample, inputs=mx.random.state, outputs=mx.random.state)


def pick_next(logits: mx.array, recent: mx.array | None, s: Sampling) -> mx.array:
    """Logits [1, V] and recent token ids [N] -> the next token [1]."""
    if recent is not None and s.repetition_penalty != 1:
        logits = apply_repetition_penalty(logits, recent, s.repetition_penalty)
    return compiled_sample(logits, s)


def generate_tokens(
    params: dict,
    config: Config,
    prompt: list[int],
    cache: dict,
    sampling: Sampling = Sampling(),
    max_tokens: int = 256,
    max_kv_size: int | None = None,
    eos_ids: frozenset = frozenset(),
    kernels: str = "reference",
    report: dict | None = None,
):
    """Yield generated token ids for `prompt` (the tokens after what the cache already holds).

    report, when given, is filled with the stats (mlx_lm's definitions), the final cache and
    the finish reason: "stop" (an end-of-sequence id), "length" (max_tokens) or "context"
    (the cache reached max_kv_size).
    """
    report = {} if report is None else report
    max_kv_size = max_kv_size or config.max_position_embeddings
    pos = prompt_end = int(cache["offset"].item()) + len(prompt)  # tokens in the cache
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if pos > max_kv_size:
        raise ValueError(f"the prompt needs {pos} tokens of context but --max-kv-size is {max_kv_size}")
    penalize = sampling.repetition_penalty != 1
    recent = mx.array(prompt[-sampling.repetition_context :]) if penalize else None

    tic = time.perf_counter()
    logits, cache = prefill(params, config, mx.array(prompt)[None], cache, kernels)
    y = pick_next(logits, recent, sampling)
    mx.async_eval(y)
    n, finish, t_first, generated = 0, "length", tic, []
    while True:
        next_y = None
        if n + 1 < max_tokens and pos < max_kv_size:
            # build token n+1's graph before handing out token n, so the two overlap
            cache = reserve(cache, pos + 1)
            logits, cache = compiled_decode_step(params, config, y[:, None], cache, kernels)
            pos += 1
            if penalize:
                recent = mx.concatenate([recent, y])[-sampling.repetition_context :]
            next_y = pick_next(logits, recent, sampling)
            mx.async_eval(next_y)
        token = y.item()
        generated.append(token)
        if n == 0:
            t_first = time.perf_counter()
            report["prompt_tokens"] = len(prompt)
            report["prompt_tps"] = len(prompt) / (t_first - tic)
        n += 1
        if token in eos_ids:
            finish = "stop"
            break
        yield token
        if next_y is None:
            finish = "length" if n >= max_tokens else "context"
            break
        y = next_y
    elapsed = time.perf_counter() - t_first
    report.update(
        generation_tokens=n,
        generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
        peak_memory=mx.get_peak_memory() / 1e9,
        finish_reason=finish,
        generated=generated,  # every token drawn, the end-of-sequence one included
        cache=cache,  # holds the prompt and the first cached_new of `generated`
        cached_new=pos - prompt_end,
    )


def generate(
    params: dict,
    config: Config,
    tokenizer,
    prompt: list[int],
    cache: dict | None = None,
    report: dict | None = None,
    **options,
):
    """Yield the generated text in printable segments (mlx_lm's streaming detokenizer).

    Stops at any of the tokenizer's end-of-sequence ids or at max_tokens; options and report
    are those of generate_tokens. The detokenizer is finalized, so no tail is lost.
    """
    cache = new_cache(config, dtype=params["model"]["norm"]["weight"].dtype) if cache is None else cache
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    eos = frozenset(tokenizer.eos_token_ids)
    for token in generate_tokens(params, config, prompt, cache, eos_ids=eos, report=report, **options):
        detokenizer.add_token(token)
        if segment := detokenizer.last_segment:  # reading it hands the segment over
            yield segment
    detokenizer.finalize()
    if segment := detokenizer.last_segment:
        yield segment


def negative_log_likelihood(params, config, tokens: list[int], kernels="reference", slice_len=256):
    """Sum of -log p(token | the tokens before it) over tokens[1:], and how many were scored."""
    h, _ = hidden_states(params, config, mx.array(tokens[:-1])[None], None, kernels)  # [1, L-1, E]
    targets = mx.array(tokens[1:])  # position i predicts token i + 1
    total = mx.array(0.0)
    for start in range(0, len(tokens) - 1, slice_len):  # logits a slice at a time: [1, l, V]
        logits = output_logits(params, h[:, start : start + slice_len]).astype(mx.float32)[0]
        picked = mx.take_along_axis(logits, targets[start : start + slice_len, None], axis=-1)[:, 0]
        total = total + (mx.logsumexp(logits, axis=-1) - picked).sum()
        mx.eval(total)
    return total.item(), len(tokens) - 1


def perplexity(params, config, tokens: list[int], context: int = 1024, kernels="reference") -> dict:
    """Split tokens into consecutive windows of `context` and score all but each window's first."""
    nll, scored = 0.0, 0
    for start in range(0, len(tokens), context):
        window = tokens[start : start + context]
        if len(window) > 1:
            s, n = negative_log_likelihood(params, config, window, kernels)
            nll, scored = nll + s, scored + n
    if scored == 0:
        raise ValueError("the text has fewer than two tokens: nothing to score")
    mean = nll / scored
    return {"tokens": len(tokens), "nll": mean, "perplexity": math.exp(mean)}


# ---------------------------------------------------------------------------------------------
# A real BLAS on Linux: MLX's CPU wheel ships the slow reference one
# ---------------------------------------------------------------------------------------------


def openblas_env() -> dict | None:
    """The environment that loads cmeel-openblas ahead of MLX's reference BLAS, or None.

    Ahead of OpenBLAS goes gemv_forward.c (built here on first use), which sends MLX's
    single-row matrix products, all of decoding, to OpenBLAS's 2.5x faster gemv kernels.
    """
    import ctypes.util
    import importlib.metadata
    from pathlib import Path

    try:
        dist = importlib.metadata.distribution("cmeel-openblas")
    except importlib.metadata.PackageNotFoundError:
        return None
    lib = Path(dist.locate_file("cmeel.prefix/lib/libopenblas.so.0"))
    if not lib.is_file():
        return None
    own = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen2-scratch" / "blas"
    own.mkdir(parents=True, exist_ok=True)
    forward = build_gemv_forward(own)
    preload = [str(p) for p in (forward, lib) if p] + [os.environ.get("LD_PRELOAD", "")]
    env = {"LD_PRELOAD": " ".join(filter(None, preload))}
    if ctypes.util.find_library("gfortran") is None:
        # OpenBLAS needs libgfortran.so.5: borrow the copy that MLX's own wheel ships
        found = [p for d in sys.path if d for p in sorted(Path(d).glob("*.libs/libgfortran*.so.5*"))]
        if not found:
            return None
        link = own / "libgfortran.so.5"
        if not link.exists() or link.resolve() != found[0].resolve():
            tmp = own / f".libgfortran.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(found[0])
            os.replace(tmp, link)
        path = [str(own), str(found[0].parent), os.environ.get("LD_LIBRARY_PATH")]
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, path))
    return env


def build_gemv_forward(folder):
    """Compile gemv_forward.c into folder once (keyed by its content); None without a C compiler."""
    import hashlib
    import shutil
    import subprocess
    from pathlib import Path

    source = Path(__file__).with_name("gemv_forward.c")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not source.is_file() or compiler is None:
        print("warning: no C compiler, so decoding runs on OpenBLAS's slower sgemm (install gcc)", file=sys.stderr)
        return None
    out = folder / f"libgemv_forward-{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}.so"
    if not out.is_file():
        tmp = folder / f".{out.name}.{os.getpid()}"
        done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(source), "-ldl"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"warning: could not build gemv_forward.c ({done.stderr.strip()[:200]})", file=sys.stderr)
            return None
        os.replace(tmp, out)
    return out


def use_openblas(before_exec=None) -> None:
    """Re-execute this process once with OpenBLAS preloaded (Linux), or warn in one line."""
    if sys.platform != "linux" or os.environ.get("QWEN2_SCRATCH_BLAS"):
        return
    try:
        env = openblas_env()
    except OSError as e:
        env, why = None, str(e)
    else:
        why = "cmeel-openblas or libgfortran not found"
    if env is None:
        print(f"warning: MLX runs on its slow reference BLAS ({why}); run make install", file=sys.stderr)
        os.environ["QWEN2_SCRATCH_BLAS"] = "reference"
        return
    os.environ.update(env, QWEN2_SCRATCH_BLAS="openblas")
    if before_exec:
        before_exec()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def blas_in_use() -> str:
    """The BLAS library mapped into this process (for reports and the tests)."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return "system"  # macOS: Accelerate
    if "libopenblas" not in maps:
        return "reference"
    return "openblas+gemv_forward" if "libgemv_forward" in maps else "openblas"


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def model_options(f):
    """--model, --dtype and --kernels, the same on every command that runs the model."""
    f = click.option("--kernels", type=click.Choice(["reference", "fast"]), default=default_kernels,
                     help="reference: our hand-written functions; fast: the mx.fast kernels at the same call "
                          "sites [default: reference on CPU, fast on GPU].")(f)
    f = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="Compute dtype [default: float32 on CPU, bfloat16 on GPU].")(f)
    f = click.option("--model", "-m", default=None, metavar="M",
                     help="Folder, .gguf file, alias (qwen2-0.5b, qwen2-1.5b, qwen2-7b) or hub id "
                          "[default: the packaged model].")(f)
    return f


def default_kernels() -> str:
    """The hand-written functions on the CPU; on a GPU the mx.fast kernels, measured 1.5-2x faster there."""
    return "fast" if mx.default_device() == mx.gpu else "reference"


def sampling_options(temp, top_p, rep, max_tokens):
    """The sampling flags, with each command's own defaults."""
    def decorate(f):
        for option in reversed([
            click.option("--max-tokens", type=click.IntRange(min=1), default=max_tokens, show_default=True,
                         help="Most tokens to generate."),
            click.option("--temp", type=click.FloatRange(min=0), default=temp, show_default=True,
                         help="Sampling temperature; 0 is greedy."),
            click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=top_p,
                         show_default=True, help="Nucleus sampling; 1 is off."),
            click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                         help="Keep the k likeliest tokens; 0 is off."),
            click.option("--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                         help="Drop tokens less likely than min-p times the likeliest; 0 is off."),
            click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=rep,
                         show_default=True, help="Penalty for recent tokens; 1 is off."),
            click.option("--repetition-context", type=click.IntRange(min=1), default=20, show_default=True,
                         help="How many recent tokens the penalty looks at."),
            click.option("--seed", type=int, default=0, show_default=True, help="Random seed for sampling."),
            click.option("--max-kv-size", type=click.IntRange(min=1), default=None,
                         help="Most tokens the KV cache holds [default: the model's max_position_embeddings]."),
        ]):
            f = option(f)
        return f
    return decorate


def sampling_from(o: dict) -> Sampling:
    return Sampling(o["temp"], o["top_p"], o["top_k"], o["min_p"], o["repetition_penalty"], o["repetition_context"])


def load_model(model, dtype):
    """weights.load, with its errors as one-line Click errors."""
    import weights

    try:
        return weights.load(model, dtype)
    except weights.ModelError as e:
        raise click.ClickException(str(e)) from None


def stats_line(r: dict) -> str:
    return (f"prefill: {r['prompt_tokens']} tokens, {r['prompt_tps']:.2f} tok/s | "
            f"decode: {r['generation_tokens']} tokens, {r['generation_tps']:.2f} tok/s | "
            f"peak memory: {r['peak_memory']:.2f} GB")


def quiet_broken_pipe():
    """The reader went away (| head): silence further writes and leave without a traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Qwen2 from scratch in pure MLX: chat, generate, perplexity, pull, bench."""


@cli.command("generate")
@model_options
@click.option("--prompt", "-p", required=True, help="The prompt; - reads it from stdin.")
@click.option("--system", default=None, help="System message [default: the chat template's].")
@click.option("--raw", is_flag=True, help="Continue the prompt as plain text, without the chat template.")
@sampling_options(temp=0.0, top_p=1.0, rep=1.0, max_tokens=256)
def generate_command(model, dtype, kernels, prompt, system, raw, **o):
    """Generate text for one prompt: the text on stdout, one stats line on stderr.

    \b
    Examples:
      python qwen2_scratch.py generate --prompt "Write a haiku about the sea"
      echo "def fib(n):" | python qwen2_scratch.py generate --raw --prompt - --max-tokens 64
    """
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="--prompt")
    if raw and system is not None:
        raise click.UsageError("--system needs the chat template: drop --raw or --system")
    params, config, tokenizer = load_model(model, dtype)
    if raw:
        ids = tokenizer.encode(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        ids = tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}],
                                            add_generation_prompt=True)
    mx.random.seed(o["seed"])
    report = {}
    try:
        for segment in generate(params, config, tokenizer, ids, report=report, kernels=kernels,
                                sampling=sampling_from(o), max_tokens=o["max_tokens"],
                                max_kv_size=o["max_kv_size"]):
            sys.stdout.write(segment)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except BrokenPipeError:
        quiet_broken_pipe()
    if report.get("finish_reason") == "context":
        click.echo(f"notice: stopped at --max-kv-size {o['max_kv_size'] or config.max_position_embeddings}",
                   err=True)
    click.echo(stats_line(report), err=True)


@cli.command("perplexity")
@model_options
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False), help="A UTF-8 text file.")
@click.option("--context", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Tokens per window; the file is split into consecutive windows of this many.")
@click.option("--json", "as_json", is_flag=True, help='Print only {"tokens", "nll", "perplexity"} as JSON.')
def perplexity_command(model, dtype, kernels, path, context, as_json):
    """Perplexity of a text file: mean negative log-likelihood per token, in nats, and its exp.

    The file is tokenized as it is (no BOS, no template) and split into consecutive windows
    of --context tokens (default 1024); every token after the first of each window is scored.

    \b
    Example:
      python qwen2_scratch.py perplexity --file README.md --json
    """
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise click.BadParameter(f"{path} does not exist", param_hint="--file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{path} is not a readable UTF-8 file ({e})", param_hint="--file") from None
    params, config, tokenizer = load_model(model, dtype)
    try:
        result = perplexity(params, config, tokenizer.encode(text), context, kernels)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{result['tokens']} tokens, nll {result['nll']:.4f} nats/token, "
                   f"perplexity {result['perplexity']:.3f}")


@cli.command("pull")
@click.option("--model", "-m", default=None, metavar="M",
              help="Folder, .gguf file, alias or hub id [default: the packaged model].")
def pull_command(model):
    """Prepare a model and print the folder it loads from (the only line on stdout).

    \b
    Example:
      mlx_lm.generate --model "$(python qwen2_scratch.py pull)" --prompt hi
    """
    import weights

    try:
        click.echo(weights.resolve(model))
    except weights.ModelError as e:
        raise click.ClickException(str(e)) from None

# ---------------------------------------------------------------------------------------------
# bench: ours and mlx_lm side by side, on the same weights, in one process
# ---------------------------------------------------------------------------------------------

SHAPES = {  # the real Qwen2 shapes, for random-weight benchmarks (--shape)
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-7b": dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def bench_weights(model: str | None, shape: str | None, dtype: str):
    """(params, config, mlx_lm model sharing those very arrays, what was loaded)."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import qwen2 as ref

    if shape:
        raw = {"model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1e6, **SHAPES[shape]}
        reference = ref.Model(ref.ModelArgs.from_dict(raw))
        reference.set_dtype(getattr(mx, dtype))
        mx.eval(reference.parameters())
        params = tree_unflatten(tree_flatten(reference.parameters()))
        return params, config_from_dict(raw), reference, f"random weights, {shape} shape"
    import weights

    folder = weights.resolve(model)
    params, config = weights.load_params(folder, getattr(mx, dtype))
    raw = weights.read_config(folder)
    reference = ref.Model(ref.ModelArgs.from_dict(raw))
    reference.update(params)  # the same arrays: no second copy of the weights
    return params, config, reference, str(folder)


def timed(tokens) -> tuple[float, float, int]:
    """Run a token generator: (seconds to the first token, seconds from the first to the last, count)."""
    tic = time.perf_counter()
    next(tokens)
    first = time.perf_counter()
    n = 1 + sum(1 for _ in tokens)
    return first - tic, time.perf_counter() - first, n


def run_ours(params, config, kernels):
    def run(prompt, n):
        return generate_tokens(params, config, prompt, new_cache(config, dtype=params["model"]["norm"]["weight"].dtype),
                               max_tokens=n, kernels=kernels)
    return run


def run_mlx_lm(model):
    from mlx_lm.generate import generate_step

    def run(prompt, n):
        return (t for t, _ in generate_step(mx.array(prompt), model, max_tokens=n))
    return run


def measure(run, prompts: dict, gen_tokens: int) -> dict:
    """Prefill tok/s at each prompt length; decode tok/s after the shortest prompt (mlx_lm's definitions)."""
    out = {}
    for i, (length, prompt) in enumerate(prompts.items()):
        to_first, rest, n = timed(run(prompt, gen_tokens if i == 0 else 1))
        out[f"prefill_{length}"] = length / to_first
        if i == 0:
            out["decode"] = (n - 1) / rest
    return out


def read_bandwidth_gbs() -> float:
    """The machine's read bandwidth: best of 5 numpy float32 matrix-vector products over 1 GiB."""
    import numpy as np

    if mx.default_device() == mx.gpu:  # best of 5 sums over a 4 GiB bfloat16 array
        a = mx.ones((32768, 65536), mx.bfloat16)
        mx.eval(a)
        best = min(timed_eval(lambda: mx.sum(a)) for _ in range(5))
        return a.nbytes / best / 1e9
    a = np.ones((16384, 16384), np.float32)
    x = np.ones(16384, np.float32)
    best = float("inf")
    for _ in range(5):
        tic = time.perf_counter()
        a @ x
        best = min(best, time.perf_counter() - tic)
    return a.nbytes / best / 1e9


def warm_up_gpu(seconds: float = 5.0) -> None:
    """A few seconds of matmuls, so that a GPU reaches its working clock before anything is timed."""
    if mx.default_device() != mx.gpu:
        return
    a = mx.random.normal((8192, 8192)).astype(mx.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        mx.eval(a @ a)


def timed_eval(f) -> float:
    tic = time.perf_counter()
    mx.eval(f())
    return time.perf_counter() - tic


def bytes_per_token(params: dict, config: Config) -> int:
    """Bytes a decoded token reads: every weight, but only one row of an untied embedding table."""
    from mlx.utils import tree_flatten

    total = sum(v.nbytes for _, v in tree_flatten(params))
    if not config.tie_word_embeddings:
        table = params["model"]["embed_tokens"]["weight"]
        total -= table.nbytes - table.nbytes // table.shape[0]
    return total


def kv_cache_bytes(config: Config, tokens: int, itemsize: int) -> int:
    capacity = -(-tokens // CACHE_BLOCK) * CACHE_BLOCK
    return 2 * config.num_hidden_layers * config.num_key_value_heads * capacity * config.head_dim * itemsize


def probe_memory(contender: str, model, shape, dtype, prompt_tokens: int, gen_tokens: int) -> dict:
    """Peak memory of one contender, in a subprocess of its own: loading, prefill and decoding."""
    import subprocess

    command = [sys.executable, os.path.abspath(__file__), "bench", "--probe", contender, "--dtype", dtype,
               "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens)]
    command += ["--shape", shape] if shape else (["--model", model] if model else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"the memory probe of {contender} failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_probe(contender, model, shape, dtype, prompt_tokens, gen_tokens):
    """One contender alone in this process: load, generate, print its peak memory as JSON."""
    kernels = contender.removeprefix("ours-")
    if contender == "mlx_lm":
        if shape:
            _, config, reference, _ = bench_weights(None, shape, dtype)
        else:
            import mlx_lm

            import weights

            reference, _ = mlx_lm.load(str(weights.resolve(model)))
            reference.set_dtype(getattr(mx, dtype))
            config = config_from_dict(weights.read_config(weights.resolve(model)))
        run = run_mlx_lm(reference)
    elif shape:
        params, config, _, _ = bench_weights(None, shape, dtype)
        run = run_ours(params, config, kernels)
    else:
        import weights

        params, config = weights.load_params(weights.resolve(model), getattr(mx, dtype))
        run = run_ours(params, config, kernels)
    prompt = mx.random.randint(0, config.vocab_size, (prompt_tokens,), key=mx.random.key(0)).tolist()
    timed(run(prompt, gen_tokens))
    click.echo(json.dumps({"peak_gb": mx.get_peak_memory() / 1e9}))


@cli.command("bench")
@model_options
@click.option("--shape", type=click.Choice(list(SHAPES)), default=None,
              help="Random weights of a real Qwen2 shape instead of --model (sizing hardware).")
@click.option("--prompt-tokens", default="128,512", show_default=True, help="Prompt lengths, comma-separated.")
@click.option("--gen-tokens", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens decoded after the shortest prompt.")
@click.option("--trials", type=click.IntRange(min=1), default=3, show_default=True,
              help="Trials; each figure is the median.")
@click.option("--int4/--no-int4", default=True, show_default=True,
              help="Also time what mlx_lm gives by default: the int4 (group 64) model, one short run.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write every number, versions, device and BLAS here.")
@click.option("--probe", default=None, hidden=True)
@click.option("--both-kernels/--one-kernel", default=True, show_default=True,
              help="Run ours with both --kernels (reference and fast), or only the one given.")
def bench_command(model, dtype, kernels, shape, prompt_tokens, gen_tokens, trials, int4, json_path, probe,
                  both_kernels):
    """Benchmark ours against mlx_lm on the same weights, dtype and BLAS, in one process.

    Contenders run alternately, trial by trial, after one warm-up run of each; each figure is
    the median. Peak memory is measured for each contender in a subprocess of its own. The
    roofline is bytes read per decoded token x decode tok/s / the machine's read bandwidth,
    measured in the same run.

    \b
    Examples:
      python qwen2_scratch.py bench --json bench.json
      python qwen2_scratch.py bench --shape qwen2-7b --prompt-tokens 128,2048 --no-int4
    """
    import statistics

    dtype = dtype or ("bfloat16" if mx.default_device() == mx.gpu else "float32")
    try:
        lengths = sorted({int(n) for n in prompt_tokens.split(",")})
    except ValueError:
        raise click.BadParameter("give whole numbers separated by commas, like 128,512",
                                 param_hint="--prompt-tokens") from None
    if not lengths or lengths[0] < 1:
        raise click.BadParameter("prompt lengths must be at least 1", param_hint="--prompt-tokens")
    if probe:
        return run_probe(probe, model, shape, dtype, lengths[-1], gen_tokens)
    try:
        params, config, reference, source = bench_weights(model, shape, dtype)
    except Exception as e:
        import weights

        if isinstance(e, weights.ModelError):
            raise click.ClickException(str(e)) from None
        raise
    log = lambda text: click.echo(text, err=True)  # noqa: E731
    ours = ["reference", "fast"] if both_kernels else [kernels]
    runs = {f"ours-{k}": run_ours(params, config, k) for k in ours} | {"mlx_lm": run_mlx_lm(reference)}
    key = mx.random.key(0)
    prompts = {n: mx.random.randint(0, config.vocab_size, (n,), key=key).tolist() for n in lengths}
    log(f"bench: {source}, {dtype}, {mx.default_device()}, BLAS {blas_in_use()}")
    warm_up_gpu()
    for run in runs.values():  # warm-up: compile and trace every shape the trials use
        measure(run, prompts, min(gen_tokens, 16))
    figures = {name: [] for name in runs}
    for trial in range(trials):
        for name, run in runs.items():
            figures[name].append(measure(run, prompts, gen_tokens))
            numbers = ", ".join(f"{k} {v:.2f}" for k, v in figures[name][-1].items())
            log(f"  trial {trial + 1}/{trials} {name}: {numbers}")
    bandwidth = read_bandwidth_gbs()
    per_token = bytes_per_token(params, config)
    results = {}
    for name, rows in figures.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        med["roofline"] = per_token * med["decode"] / (bandwidth * 1e9)
        results[name] = med
    for name in results:
        results[name]["decode_vs_mlx_lm"] = results[name]["decode"] / results["mlx_lm"]["decode"]
        for n in lengths:
            results[name][f"prefill_{n}_vs_mlx_lm"] = results[name][f"prefill_{n}"] / results["mlx_lm"][f"prefill_{n}"]
    del params, reference, runs
    mx.clear_cache()
    weights_bytes = per_token if config.tie_word_embeddings else per_token + (
        config.vocab_size - 1) * config.hidden_size * mx.array(0, getattr(mx, dtype)).itemsize
    floor = weights_bytes + kv_cache_bytes(config, lengths[-1] + 16, mx.array(0, getattr(mx, dtype)).itemsize)
    for name in results:
        peak = probe_memory(name, model, shape, dtype, lengths[-1], 16)["peak_gb"]
        results[name]["peak_gb"] = peak
        results[name]["peak_vs_weights_and_kv"] = peak * 1e9 / floor
    default_run = bench_int4(model, shape, dtype) if int4 else None
    report = {
        "command": " ".join(sys.orig_argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "source": source, "dtype": dtype, "device": device_name(), "blas": blas_in_use(),
        "mlx": mx.__version__, "mlx_lm": package_version("mlx-lm"),
        "prompt_tokens": lengths, "gen_tokens": gen_tokens, "trials": trials,
        "read_bandwidth_gbs": bandwidth, "bytes_per_token": per_token,
        "weights_and_kv_bytes": floor, "results": results, "mlx_lm_default_int4": default_run,
    }
    click.echo(bench_table(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {json_path}")


def bench_int4(model, shape, dtype) -> dict:
    """What a user gets from mlx_lm by default: the int4 (group 64) model, 32-token prompt, 16 tokens."""
    from mlx_lm.utils import quantize_model

    _, config, reference, _ = bench_weights(model, shape, "bfloat16")
    quantize_model(reference, {}, group_size=64, bits=4)
    mx.eval(reference.parameters())
    prompt = mx.random.randint(0, config.vocab_size, (32,), key=mx.random.key(1)).tolist()
    to_first, rest, n = timed(run_mlx_lm(reference)(prompt, 16))
    return {"prefill_32": 32 / to_first, "decode": (n - 1) / rest}


def package_version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


def device_name() -> str:
    import platform

    if mx.default_device() == mx.gpu:
        info = mx.device_info() if hasattr(mx, "device_info") else {}
        return f"gpu: {info.get('device_name', 'unknown')}"
    return f"cpu: {platform.machine()}, {os.cpu_count()} cores"


def bench_table(r: dict) -> str:
    names = list(r["results"])
    rows = [("", names)]
    fmt = lambda v: f"{v:.2f}"  # noqa: E731
    for n in r["prompt_tokens"]:
        rows.append((f"prefill {n} tok/s", [fmt(r["results"][k][f"prefill_{n}"]) for k in names]))
        rows.append(("  x mlx_lm", [fmt(r["results"][k][f"prefill_{n}_vs_mlx_lm"]) for k in names]))
    rows.append((f"decode tok/s ({r['gen_tokens']} tokens)", [fmt(r["results"][k]["decode"]) for k in names]))
    rows.append(("  x mlx_lm", [fmt(r["results"][k]["decode_vs_mlx_lm"]) for k in names]))
    rows.append(("  % of roofline", [f"{100 * r['results'][k]['roofline']:.0f}%" for k in names]))
    rows.append(("peak memory GB", [fmt(r["results"][k]["peak_gb"]) for k in names]))
    rows.append(("  x (weights + KV)", [fmt(r["results"][k]["peak_vs_weights_and_kv"]) for k in names]))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}" + "".join(f"{c:>16}" for c in cells) for label, cells in rows]
    lines.append(f"roofline: {r['bytes_per_token'] / 1e9:.3f} GB read per token at {r['read_bandwidth_gbs']:.1f} GB/s "
                 f"= {r['read_bandwidth_gbs'] * 1e9 / r['bytes_per_token']:.2f} tok/s")
    if r["mlx_lm_default_int4"]:
        d = r["mlx_lm_default_int4"]
        lines.append(f"mlx_lm default (int4, group 64; 32-token prompt, 16 tokens): prefill {d['prefill_32']:.2f} "
                     f"tok/s, decode {d['decode']:.2f} tok/s")
    lines.append(f"{r['source']} | {r['dtype']} | {r['device']} | BLAS {r['blas']} | MLX {r['mlx']} | "
                 f"mlx_lm {r['mlx_lm']} | {r['date']}")
    return "\n".join(lines)


CHAT_HELP = """Commands:
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message and forget the conversation (/system alone: the default)
  /help           this help
  /quit           leave (so do Ctrl-D, and Ctrl-C at the prompt)
Ctrl-C during an answer stops it; the cut answer and its question are dropped from the history,
which keeps every complete turn before it."""


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Chat:
    """A conversation: the turns so far, and the KV cache of the tokens last run through the model."""

    def __init__(self, params, config, tokenizer, system, options, kernels):
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.system, self.options, self.kernels = system, options, kernels
        self.max_kv = options["max_kv_size"] or config.max_position_embeddings
        self.turns: list[tuple[str, str]] = []  # (user, assistant), complete turns only
        self.cache = new_cache(config, dtype=params["model"]["norm"]["weight"].dtype)
        self.cached: list[int] = []  # the token ids whose keys and values the cache holds

    def prompt_ids(self, user: str) -> list[int]:
        """The whole history re-templated: one system message, the turns in order, the new message."""
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        for u, a in self.turns:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": user})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def fit(self, user: str, notice) -> list[int] | None:
        """The prompt ids, dropping the oldest turns until they fit the cache, or None."""
        ids = self.prompt_ids(user)
        while len(ids) >= self.max_kv and self.turns:
            self.turns.pop(0)
            notice(f"notice: dropped the oldest turn to fit --max-kv-size {self.max_kv}")
            ids = self.prompt_ids(user)
        if len(ids) >= self.max_kv:
            notice(f"error: this message needs {len(ids)} tokens of context, more than --max-kv-size "
                   f"{self.max_kv}; it was not sent")
            return None
        return ids

    def command(self, line: str) -> str:
        """Carry out a /command; its notice, or "quit"."""
        command, _, rest = line.partition(" ")
        if command == "/quit":
            return "quit"
        if command == "/help":
            return CHAT_HELP
        if command == "/reset":
            self.turns = []
            return "notice: the conversation was forgotten"
        if command == "/system":
            self.system, self.turns = (rest.strip() or None), []
            return "notice: new system message; the conversation was forgotten"
        return f"unknown command {command}: /help lists the commands"

    def reply(self, user: str, ids: list[int], notice):
        """Yield the answer's text segments; the turn joins the history only once it completes."""
        # reuse the cached keys and values of the prefix this prompt shares with the last one
        reuse = min(common_prefix(self.cached, ids), len(ids) - 1)
        cache = {"layers": self.cache["layers"], "offset": mx.array(reuse)}
        report, answer = {}, []
        o = self.options
        for segment in generate(self.params, self.config, self.tokenizer, ids[reuse:], cache, report,
                                sampling=sampling_from(o), max_tokens=o["max_tokens"],
                                max_kv_size=self.max_kv, kernels=self.kernels):
            answer.append(segment)
            yield segment
        self.turns.append((user, "".join(answer)))
        self.cache = report["cache"]
        self.cached = (ids + report["generated"])[: len(ids) + report["cached_new"]]
        if report["finish_reason"] == "context":
            notice(f"notice: the answer stopped at --max-kv-size {self.max_kv}")
        self.last_report = report


@cli.command("chat")
@model_options
@click.option("--system", default=None, help="System message [default: the chat template's].")
@sampling_options(temp=0.7, top_p=0.8, rep=1.05, max_tokens=512)
def chat_command(model, dtype, kernels, system, **o):
    """Chat with the model: answers stream as they are generated, and the history is kept.

    Defaults follow Qwen's guidance for its chat models (temperature 0.7, top-p 0.8,
    repetition penalty 1.05). In a terminal: a prompt, streamed answers and a stats line
    after each. With stdin not a terminal: one user turn per line, and stdout holds only the
    answers, each followed by an empty line; everything else goes to stderr. Type /help for
    the commands.

    \b
    Examples:
      python qwen2_scratch.py chat
      printf 'My name is Ada.\nWhat is my name?\n' | python qwen2_scratch.py chat --temp 0
    """
    interactive = sys.stdin.isatty()
    params, config, tokenizer = load_model(model, dtype)
    mx.random.seed(o["seed"])
    chat = Chat(params, config, tokenizer, system, o, kernels)

    def notice(text):
        click.echo(text, err=True)

    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    notice(f"qwen2-scratch chat ({config.num_hidden_layers} layers, {len(tokenizer.vocab)} tokens); "
           "/help for commands, Ctrl-D or /quit to leave")
    lines = iter(sys.stdin) if not interactive else None
    while True:
        try:
            line = input("> ") if interactive else next(lines, None)
        except (EOFError, KeyboardInterrupt):
            line = None
        if line is None:
            if interactive:
                notice("")
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            said = chat.command(line)
            if said == "quit":
                return
            notice(said)
            continue
        ids = chat.fit(line, notice)
        if ids is None:
            continue
        try:
            for segment in chat.reply(line, ids, notice):
                sys.stdout.write(segment)
                sys.stdout.flush()
            sys.stdout.write("\n" if interactive else "\n\n")
            sys.stdout.flush()
            notice(stats_line(chat.last_report))
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            sys.stdout.flush()
            notice("[interrupted: this question and its answer were dropped from the history]")
        except BrokenPipeError:
            quiet_broken_pipe()


def main():
    use_openblas()
    try:
        cli(standalone_mode=False)
    except click.ClickException as e:  # bad input: one line, exit 1 (usage errors: 2)
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):  # Ctrl-C outside the chat's own handling
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
