"""Qwen2 from scratch in pure MLX: the forward pass, a KV cache, sampling, perplexity.

The model is a set of pure functions over one nested parameter dict that keeps the
checkpoint's own key names: params["model"]["layers"][i]["self_attn"]["q_proj"]["weight"].
It follows week 1 of the tiny-llm course: softmax and linear, attention, RoPE, grouped-query
attention, RMSNorm and the SwiGLU MLP, the transformer block, the whole model, then text.
A batch is one more axis: its rows may hold sequences of different lengths, each at its own
offset. Generating text from it (many requests at once) is engine.py's work.

Map of this file, top to bottom:
    Config                    the checkpoint's hyper-parameters, Hugging Face names
    Day 1                     softmax, linear, causal mask, grouped-query attention
    Day 2                     RoPE
    Day 4                     RMSNorm, SiLU, the SwiGLU MLP
    The kernels               ours, or mx.fast at the same call sites, chosen once per forward
    Day 3                     the attention layer, writing its keys and values into the cache
    Day 5                     the block, hidden states, logits, forward
    The KV cache              plain data: per-layer arrays and one offset per row
    Days 6 and 7              prefill in chunks, the compiled decode step, samplers, seeded keys
    Evaluation                perplexity

Shape legend, used in every comment below:
    B batch          L query length (new tokens)     S key length (cached + new tokens)
    E hidden size    H query heads                   K key/value heads
    G = H // K       D head dim (E // H)             F MLP hidden size
    V vocabulary size
"""

from qwen2s import blas

blas.load()  # first: a real BLAS into the process, before MLX loads its own (see blas.py)

# isort: split
import functools
import hashlib
import math
from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx

from qwen2s import cpu_attention, gpu_products

__all__ = [
    "Config", "config_from_dict", "forward", "new_cache", "prefill", "decode_step", "Sampling", "sample",
    "perplexity",
]

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
    e = exp_of_nonpositive(x, shift=row_max(x, axis))
    return e / mx.sum(e, axis=axis, keepdims=True)


MAX_BLOCK = 64  # row_max's first step: the maximum of each column of [S / 64, 64]


def row_max(x: mx.array, axis: int = -1) -> mx.array:
    """The maximum along axis, kept as an axis of 1. A long last axis [..., S] in two steps, over [..., S / 64, 64]
    then across the 64: the same value (a maximum has no rounding), 3x faster on the CPU, whose reduction of a
    contiguous row goes one element at a time (attention's softmax over a 20k-position cache: 1.8 -> 0.5 ns a score)."""
    S = x.shape[axis]
    if axis in (-1, x.ndim - 1) and S > MAX_BLOCK and S % MAX_BLOCK == 0:
        return mx.max(mx.max(x.reshape(*x.shape[:-1], S // MAX_BLOCK, MAX_BLOCK), axis=-2), axis=-1, keepdims=True)
    return mx.max(x, axis=axis, keepdims=True)


def exp_of_nonpositive(x: mx.array, shift: mx.array | None = None) -> mx.array:
    """exp(x - shift) for x - shift <= 0 (-inf too), computed in float32 to 1e-7 relative (Cephes' expf):
    x = n ln 2 + r with |r| <= ln 2 / 2, exp(r) by a polynomial, 2^n put in the exponent bits. The same as mx.exp
    but 3-6x faster on the CPU (MLX's own exp there is scalar, 14 ns an element), where attention's softmax over a
    long cache is a large part of a step. A float32 shift is subtracted inside the same kernel (one pass fewer)."""
    if shift is not None and x.dtype == mx.float32:
        exp_r, two_n_bits = shifted_exp_parts(x, shift)
    else:
        exp_r, two_n_bits = exp_parts((x if shift is None else x - shift).astype(mx.float32))
    return (exp_r * two_n_bits.view(mx.float32)).astype(x.dtype)  # a view cannot be compiled shapeless


def exp_parts_of(x: mx.array) -> tuple[mx.array, mx.array]:
    """x (float32, <= 0) -> (exp(r), the bits of the float 2^n): exp_of_nonpositive's arithmetic."""
    x = mx.maximum(x, -88.0)  # exp(-88) is 6e-39: below it, 0
    # round(x / ln 2): past 1.5 * 2^23 a float's step is 1, so the addition rounds (no floor, which the CPU's
    # kernels, built for any x86-64, call one element at a time; MLX compiles without fast math: kept as written)
    n = (x * 1.4426950408889634 + 12582912.0) - 12582912.0
    r = x - n * 0.693359375 + n * 2.12194440e-4  # x - n ln 2, ln 2 in two parts
    p = 1.9875691500e-4
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + c
    return p * (r * r) + r + 1.0, mx.left_shift(n.astype(mx.int32) + 127, 23)  # 0 for n = -127


# One fused kernel for any shape: a prefill runs eagerly (only the decode step is compiled), where these
# twenty elementwise ops were twenty passes over a chunk's scores.
exp_parts = mx.compile(exp_parts_of, shapeless=True)
shifted_exp_parts = mx.compile(lambda x, shift: exp_parts_of(x - shift), shapeless=True)  # shift broadcast


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None, residual: mx.array | None = None) -> mx.array:
    """[..., in] @ [out, in].T (+ [out]) -> [..., out], added to the residual stream [..., out] when one is given"""
    y = x @ weight.T
    y = y if bias is None else y + bias
    return y if residual is None else residual + y


def qkv_projections(x: mx.array, q_proj: dict, k_proj: dict, v_proj: dict,
                    product: Callable = linear) -> tuple[mx.array, mx.array, mx.array]:
    """Attention's queries, keys and values, each a linear with its bias: [B, L, E] -> [B, L, H * D],
    [B, L, K * D], [B, L, K * D]."""
    return product(x, **q_proj), product(x, **k_proj), product(x, **v_proj)


def causal_mask(L: int, S: int, offset: mx.array | int | None = None) -> mx.array:
    """[L, S] boolean, True where query i may see key j, aligned bottom-right; [B, 1, L, S] for offsets [B].

    Query i sits at position offset + i, so it sees keys j <= offset + i; the default
    offset S - L is tril(k=S-L), right for a query shorter than the keys (decode).
    Keys past offset + L (unfilled cache slots) are never seen.
    """
    offset = S - L if offset is None else offset
    if isinstance(offset, mx.array) and offset.ndim == 1:  # one offset per row of a batch
        return (mx.arange(S) <= mx.arange(L)[:, None] + offset[:, None, None])[:, None]  # [B, 1, L, S]
    return mx.arange(S)[None, :] <= (mx.arange(L) + offset)[:, None]


def scaled_dot_product_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float | None = None,
    mask: mx.array | str | None = None,
) -> mx.array:
    """softmax(q @ k.T * scale + mask) @ v, grouped: [B, H, L, D], [B, K, S, D] -> [B, H, L, D].

    Each of the K key/value heads serves G = H // K query heads: their G * L queries are the rows of
    one product against its keys and one against its values (each read once, not G times).
    mask: None, "causal", a boolean array (True = attend) or an additive array,
    broadcastable to [B, H, L, S].
    """
    B, H, L, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    scale = D**-0.5 if scale is None else scale
    q = q.reshape(B, K, G * L, D)  # [B, K, G*L, D]
    scores = ((q * scale) @ k.swapaxes(-1, -2)).reshape(B, K, G, L, S)  # [B, K, G, L, S]
    scores = scores.astype(mx.float32)  # softmax in float32, as mx.fast does
    if isinstance(mask, str):
        mask = causal_mask(L, S)
    if mask is not None:
        if mask.ndim == 4:  # [B or 1, H or 1, L, S] -> [B or 1, K or 1, G or 1, L, S]
            mask = mask.reshape(mask.shape[0], -1, 1 if mask.shape[1] == 1 else G, L, S)
        if mask.dtype == mx.bool_:  # as an addition (0 or -inf): the same scores as mx.where, a pass over
            mask = mx.where(mask, 0.0, -mx.inf)  # the mask's [L, S] (shared by the heads), not the where's 4 inputs
        scores = scores + mask
    out = softmax(scores).astype(v.dtype).reshape(B, K, G * L, S) @ v  # [B, K, G*L, D]
    return out.reshape(B, H, L, D)


# ---------------------------------------------------------------------------------------------
# Day 2: rotary position embedding
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def arange_constant(stop: int, step: int = 1, dtype=mx.float32) -> mx.array:
    """mx.arange(0, stop, step) computed once, a constant: mx.compile merges nodes that compute the same thing from
    the same inputs, and an arange node has no inputs, so each layer's RoPE angles and cache slots were computed
    again from its own; from a constant they are computed once a step (a layer's graph: 81 -> 58 nodes)."""
    r = mx.arange(0, stop, step, dtype=dtype)
    mx.eval(r)
    return r


def rope(x: mx.array, theta: float, offset: mx.array | int = 0, traditional: bool = False) -> mx.array:
    """Rotate each pair of features by position * theta^(-2i/D): [B, H, L, D] -> [B, H, L, D].

    Qwen2 pairs feature i with i + D/2 (split halves); the traditional form pairs 2i with 2i+1.
    offset is the position of the first query: a number, or one per row [B] (an mx.array, so a
    compiled step traces once).
    """
    L, D = x.shape[-2], x.shape[-1]
    inv_freq = theta ** (-arange_constant(D, 2) / D)  # [D/2]
    positions = arange_constant(L) + mx.expand_dims(mx.array(offset, mx.float32), -1)  # [L] or [B, L]
    angles = positions[..., None] * inv_freq  # [L, D/2], or [B, L, D/2]
    if angles.ndim == 3:
        angles = angles[:, None]  # [B, 1, L, D/2]: each row at its own positions
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


def silu_gate(x: mx.array, gate_proj: dict, up_proj: dict, product: Callable = linear) -> mx.array:
    """SwiGLU's hidden layer, silu(gate(x)) * up(x): [B, L, E] -> [B, L, F]."""
    return silu(product(x, **gate_proj)) * product(x, **up_proj)


def mlp(
    x: mx.array, gate_proj: dict, up_proj: dict, down_proj: dict, product: Callable = linear,
    gate: Callable = silu_gate, residual: mx.array | None = None,
) -> mx.array:
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases: [B, L, E] -> [B, L, F] -> [B, L, E], added to the residual
    stream [B, L, E] when one is given (by the product, in its kernel where one does it)."""
    return product(gate(x, gate_proj, up_proj, product), **down_proj, residual=residual)


# ---------------------------------------------------------------------------------------------
# The kernels: ours, or mx.fast at the same call sites (--kernels fast), chosen once
# ---------------------------------------------------------------------------------------------


def fast_rms_norm(x, weight, eps):
    return mx.fast.rms_norm(x, weight, eps)


def fast_rope(x, theta, offset=0, traditional=False):
    return mx.fast.rope(x, x.shape[-1], traditional=traditional, base=theta, scale=1.0, offset=offset)


def fast_attention(q, k, v, scale=None, mask=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


class Kernels(NamedTuple):
    """The functions a layer can take from mx.fast instead of ours (norm, rope, attention), how it
    multiplies by its weights (linear and SwiGLU's gate; `rows_alone` and `gate_alone` in a fixed-shape step),
    and attention over a cache in one kernel where one runs (cached_attention, see `in_one_kernel`)."""

    norm: Callable
    rope: Callable
    attention: Callable
    linear: Callable = linear
    cached_attention: Callable | None = None
    gate: Callable = silu_gate
    qkv: Callable = qkv_projections


KERNELS = {
    "reference": Kernels(rms_norm, rope, scaled_dot_product_attention, cached_attention=cpu_attention.attention),
    "fast": Kernels(fast_rms_norm, fast_rope, fast_attention),
}


def in_one_kernel(kernels: Kernels, dtype, head_dim: int) -> Kernels:
    """kernels, keeping cached_attention only where it runs: our CPU kernel (cpu_attention.py), in float32.

    It computes the same softmax(q k^T * scale + causal mask) v as scaled_dot_product_attention, each query
    alone over the keys up to its position, without the passes of MLX's ops over all of [G * L, S]: over a
    long cache on the CPU, 4-5x faster (benchmarks/README.md, "Attention in one kernel on the CPU")."""
    if kernels.cached_attention is cpu_attention.attention and not cpu_attention.runs_here(dtype, head_dim):
        return kernels._replace(cached_attention=None)
    return kernels


# ---------------------------------------------------------------------------------------------
# Day 3: the Qwen2 attention layer, with a KV cache that is plain data
# ---------------------------------------------------------------------------------------------


def cache_slots(offset: mx.array, shape: tuple) -> mx.array:
    """Where new keys (or values) of shape [B, K, L, D] go, from each row's offset [B] on: [B, K, L, D] positions."""
    slots = offset[:, None, None, None] + arange_constant(shape[2], dtype=mx.int32)[:, None]  # [B, 1, L, 1]
    return mx.broadcast_to(slots, shape)


def write_cache(cached: mx.array, new: mx.array, slots: mx.array) -> mx.array:
    """[B, K, S, D] with new [B, K, L, D] written at slots [B, K, L, D] (`cache_slots`) -> [B, K, S, D]."""
    return mx.put_along_axis(cached, slots, new, axis=2)


def self_attention(
    x: mx.array,
    q_proj: dict,
    k_proj: dict,
    v_proj: dict,
    o_proj: dict,
    config: Config,
    kv: tuple | None = None,
    offset: mx.array | int = 0,
    mask: mx.array | str | None = "causal",
    kernels: Kernels = KERNELS["reference"],
    filled: int | None = None,
    residual: mx.array | None = None,
) -> tuple[mx.array, tuple | None]:
    """Grouped-query attention: [B, L, E] -> [B, L, E] (added to the residual stream [B, L, E] when one is given,
    by o_proj's product), and the layer's updated (keys, values).

    kv is this layer's cache, ([B, K, S, D], [B, K, S, D]) preallocated to capacity S, of which
    the first offset[b] positions of row b hold earlier tokens; None attends to x alone.
    mask: "causal" (the model's), None (every key; the course's full attention) or an array.
    filled: when every row's keys end at the same known position (a prefill of one row), how many
    there are with these: attention reads only those, under the "causal" mask string (aligned
    bottom-right), which mx.fast's kernel applies without a mask array of [L, S] scores.
    Over a cache on the CPU in float32, attention is one kernel of ours (`in_one_kernel`).
    """
    B, L, _ = x.shape
    H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    # Qwen2 gives q, k and v a bias (o_proj has none)
    q, k, v = kernels.qkv(x, q_proj, k_proj, v_proj, kernels.linear)
    q = q.reshape(B, L, H, D).transpose(0, 2, 1, 3)  # [B, H, L, D]
    k = k.reshape(B, L, K, D).transpose(0, 2, 1, 3)  # [B, K, L, D]
    v = v.reshape(B, L, K, D).transpose(0, 2, 1, 3)  # [B, K, L, D]
    q = kernels.rope(q, config.rope_theta, offset)
    k = kernels.rope(k, config.rope_theta, offset)
    out = None
    if kv is not None:
        slots = cache_slots(offset, k.shape)  # [B, K, L, D]: the keys' and the values' alike
        kv = (write_cache(kv[0], k, slots), write_cache(kv[1], v, slots))  # [B, K, S, D] each
        k, v = kv
        attend = in_one_kernel(kernels, q.dtype, D).cached_attention
        if attend is not None and isinstance(mask, str):  # one kernel, causal from each row's offset: no mask
            start = mx.broadcast_to(offset if filled is None else filled - L, (B,)).astype(mx.int32)  # [B]
            out = attend(q, k, v, start, D**-0.5)  # [B, H, L, D]: query i of row b at position start[b] + i
        elif filled is not None and isinstance(mask, str):
            k, v = k[:, :, :filled], v[:, :, :filled]  # [B, K, filled, D]
        elif isinstance(mask, str):  # each row's own positions; hides the unfilled slots too
            mask = causal_mask(L, k.shape[2], offset)  # [B, 1, L, S]
    elif isinstance(mask, str) and L == 1:
        mask = None  # one query sees every key
    if out is None:
        out = kernels.attention(q, k, v, scale=D**-0.5, mask=mask)  # [B, H, L, D]
    out = out.transpose(0, 2, 1, 3).reshape(B, L, H * D)  # [B, L, E]
    return kernels.linear(out, **o_proj, residual=residual), kv


# ---------------------------------------------------------------------------------------------
# Day 5: the block and the whole model
# ---------------------------------------------------------------------------------------------


def block(
    x: mx.array,
    layer: dict,
    config: Config,
    kv: tuple | None = None,
    offset: mx.array | int = 0,
    mask: mx.array | str | None = "causal",
    kernels: Kernels = KERNELS["reference"],
    filled: int | None = None,
) -> tuple[mx.array, tuple | None]:
    """Pre-norm transformer block: [B, L, E] -> [B, L, E], and the layer's updated cache."""
    eps = config.rms_norm_eps
    h, kv = self_attention(  # x + attention(norm(x)): the residual added by o_proj's product
        kernels.norm(x, layer["input_layernorm"]["weight"], eps), **layer["self_attn"],
        config=config, kv=kv, offset=offset, mask=mask, kernels=kernels, filled=filled, residual=x,
    )
    out = mlp(kernels.norm(h, layer["post_attention_layernorm"]["weight"], eps), **layer["mlp"],  # h + mlp(norm(h))
              product=kernels.linear, gate=kernels.gate, residual=h)
    return out, kv


def hidden_states(
    params: dict, config: Config, tokens: mx.array, cache: dict | None = None, kernels: str | Kernels = "reference",
    filled: int | None = None,
) -> tuple[mx.array, dict | None]:
    """Token ids [B, L] -> final-normed hidden states [B, L, E], and the cache with them added (filled: see
    self_attention)."""
    model = params["model"]
    x = model["embed_tokens"]["weight"][tokens]  # [B, L, E]
    kernels = in_one_kernel(KERNELS[kernels] if isinstance(kernels, str) else kernels, x.dtype, config.head_dim)
    offset = mx.array(0) if cache is None else cache["offset"]  # [B]: each row's next position
    mask = "causal"
    if cache is not None and filled is None and kernels.cached_attention is None:  # each row's own positions, the
        # same in every layer: built once
        mask = causal_mask(tokens.shape[1], cache_capacity(cache), offset)  # [B, 1, L, S]
    new_kv = []
    for i, layer in enumerate(model["layers"]):
        kv = None if cache is None else cache["layers"][i]
        x, kv = block(x, layer, config, kv, offset, mask, kernels=kernels, filled=filled)
        new_kv.append(kv)
    x = kernels.norm(x, model["norm"]["weight"], config.rms_norm_eps)
    if cache is not None:
        cache = {"layers": new_kv, "offset": offset + tokens.shape[1]}
    return x, cache


def output_logits(params: dict, h: mx.array, product: Callable = linear) -> mx.array:
    """[..., E] -> [..., V] through lm_head, or the embedding matrix when embeddings are tied."""
    head = params["lm_head"] if "lm_head" in params else params["model"]["embed_tokens"]
    return product(h, head["weight"])


def forward(
    params: dict, config: Config, tokens: mx.array, cache: dict | None = None, kernels: str | Kernels = "reference"
) -> tuple[mx.array, dict | None]:
    """Token ids [B, L] -> logits [B, L, V], and the cache with these L tokens added."""
    kernels = KERNELS[kernels] if isinstance(kernels, str) else kernels
    h, cache = hidden_states(params, config, tokens, cache, kernels)
    return output_logits(params, h, kernels.linear), cache


# ---------------------------------------------------------------------------------------------
# The KV cache: preallocated per-layer arrays, one offset per row, grown in blocks
# ---------------------------------------------------------------------------------------------
#
# A batch holds sequences of different lengths. Row b's tokens sit at positions 0 .. offset[b] - 1
# of its own row, as they would alone (tiny-llm's per-request offsets, not mlx_lm's left padding):
# RoPE, the causal mask and the cache writes read each row's offset, so a row's arithmetic is the
# same alone and in any batch, and a row joins or leaves without moving the others.

CACHE_BLOCK = 256  # positions added at a time; the compiled step traces once per capacity


def new_cache(config: Config, batch: int = 1, dtype=mx.float32) -> dict:
    """An empty cache: per layer (keys, values) of [B, K, 0, D], and offsets [B] of 0."""
    shape = (batch, config.num_key_value_heads, 0, config.head_dim)
    layers = [(mx.zeros(shape, dtype), mx.zeros(shape, dtype)) for _ in range(config.num_hidden_layers)]
    return {"layers": layers, "offset": mx.zeros((batch,), mx.int32)}


def cache_capacity(cache: dict) -> int:
    return cache["layers"][0][0].shape[2]


def take_rows(cache: dict, index) -> dict:
    """The rows `index` (a slice or an index array) of every layer and of the offsets."""
    return {"layers": [(k[index], v[index]) for k, v in cache["layers"]], "offset": cache["offset"][index]}


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading token ids a and b share: the cached positions a new prompt can reuse.

    A binary search over slices, which Python compares in C: a prompt cache of long conversations
    looks up tens of thousands of tokens per entry."""
    if type(a) is not type(b):  # a tuple's slice never equals a list's
        a, b = list(a), list(b)
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:  # one is a prefix of the other (a chat's next turn): one comparison
        return high
    while low < high:  # a[:low] == b[:low], and they differ somewhere before high + 1 (or high is the end)
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def reserve(cache: dict, length: int, block_size: int | None = None) -> dict:
    """Grow every layer's arrays to hold `length` positions, rounded up to whole blocks (CACHE_BLOCK)."""
    have = cache_capacity(cache)
    if length <= have:
        return cache
    block_size = block_size or CACHE_BLOCK
    want = -(-length // block_size) * block_size

    def grow(a):  # [B, K, have, D] -> [B, K, want, D]
        pad = mx.zeros((*a.shape[:2], want - have, a.shape[3]), a.dtype)
        return mx.concatenate([a, pad], axis=2)

    return {"layers": [(grow(k), grow(v)) for k, v in cache["layers"]], "offset": cache["offset"]}


# ---------------------------------------------------------------------------------------------
# Days 6 and 7: prefill, one compiled decode step, sampling
# ---------------------------------------------------------------------------------------------

# Prompt tokens per forward call. On the CPU the most rows our BLAS kernel takes (rows_exact); a GPU
# wants long chunks, as mlx_lm's 2048.
EXACT_ROWS = 64  # KERNEL_ROWS in blas_adapter.c
PREFILL_CHUNK = {"cpu": EXACT_ROWS, "gpu": 2048}


def prefill_chunk() -> int:
    return PREFILL_CHUNK["gpu" if mx.default_device() == mx.gpu else "cpu"]


def rows_exact(dtype, kernels="reference", chunk: int = EXACT_ROWS) -> bool:
    """Whether each row of a step comes out the same bits whatever the rows beside it and however the
    prompt was cut: on the CPU in float32 with our functions and our BLAS adapter, whose kernels
    compute every product of up to 64 rows against the weights, and attention's scores and values
    for any number of queries, one row at a time in a fixed order (blas_adapter.c); the norms, RoPE
    and the softmax are row by row (the softmax over whole cache blocks either way). A prompt then
    leaves the same keys and values in the cache prefilled in chunks of at most EXACT_ROWS tokens, in
    any pieces, or token by token by decode steps."""
    return (mx.default_device() == mx.cpu and dtype == mx.float32 and kernels == "reference"
            and chunk <= EXACT_ROWS and blas.load().kind == "openblas")


def prefill(params, config, tokens, cache, kernels="reference", chunk=None, aligned=True):
    """Run the prompt [B, L] into the cache in chunks -> (logits of its last token [B, V], cache).

    aligned: chunks start at multiples of `chunk` from position 0 (the first one may be shorter when
    the cache holds a prefix), so a prompt is cut the same way whatever the cache holds; where rows
    are exact (rows_exact) any cut gives the same bits, and chunks may start where the cache ends.
    Aligned chunks of one row attend over the keys filled so far only (`filled`), a length fixed by
    the chunk's place; unaligned ones over the whole capacity, as a decode step does (the same bits).
    """
    chunk = chunk or prefill_chunk()
    first = start = int(cache["offset"].max().item())
    end = first + tokens.shape[1]
    while start < end:
        stop = min((start // chunk + 1) * chunk if aligned else start + chunk, end)
        # grown in whole blocks, as for decoding: a query's softmax runs over as many slots either way
        cache = reserve(cache, stop)
        filled = stop if aligned and tokens.shape[0] == 1 else None
        h, cache = hidden_states(params, config, tokens[:, start - first : stop - first], cache, kernels, filled)
        if stop < end:
            mx.eval(cache)  # only the cache: no logits for the prompt's inner tokens
        start = stop
    return output_logits(params, h[:, -1]), cache


def decode_step(params, config, tokens, cache, kernels="reference", rows=None):
    """One or more tokens per sequence [B, L] -> (logits of each [B, L, V], cache).

    L = 1 decodes; L = k + 1 verifies k speculative proposals. Compiled below: positions are
    arrays, so it traces once per (B, L, cache capacity), never per token.
    rows: None computes the step as it comes; a number runs it at one fixed shape, that many query
    rows of one token each (`fixed_shape_step`), so that every step runs the same kernels (a GPU's need).
    """
    if rows is not None:
        return fixed_shape_step(params, config, tokens, cache, kernels, rows)
    return forward(params, config, tokens, cache, kernels)


# On a GPU the kernel that computes a product depends on its shape: MLX's CUDA backend takes its
# own gemv for one row and, for more, a cuBLAS algorithm chosen by the shape (for the 7B's down_proj
# a different one at 2, 15, 31 and 64 rows); attention over one query or over several takes
# different kernels again. Each rounds differently, so a row's logits would depend on how many rows
# stand beside it, and a verifier step's on its length. A fixed-shape step computes every row of a
# product alone: on CUDA with a kernel of ours (gpu_products.py), elsewhere (Metal) as a product of
# one number of rows, the B * L real ones padded with zero rows, so that one algorithm, which does
# not look at the data, computes each row; and attention takes each query as a row of its own over
# its row's cache. Attention, RMSNorm, RoPE and the rest work row by row, whatever the number of
# rows or the cache's capacity. Measured on the H200 (benchmarks/README.md, tools/step_shapes.py):
# the same bits alone, in a batch, and in a verifier step. On CUDA that kernel also adds the biases and the residual
# stream, and computes SwiGLU's gate from both weights (`gate_alone`): fewer nodes for the host to send off.


def rows_of_products(rows: int) -> Callable:
    """linear, computed as a product of `rows` rows: [..., in] (at most `rows` of them) -> [..., out]."""
    def product(x, weight, bias=None, residual=None):
        *lead, E = x.shape
        n = math.prod(lead)
        padded = mx.concatenate([x.reshape(n, E), mx.zeros((rows - n, E), x.dtype)])  # [rows, E]
        y = linear(padded, weight, bias)[:n].reshape(*lead, -1)
        return y if residual is None else residual + y
    return product


def rows_alone(rows: int) -> Callable:
    """linear with each row computed alone: gpu_products' kernel where it runs (CUDA), else `rows_of_products`."""
    padded = rows_of_products(rows)

    def product(x, weight, bias=None, residual=None):
        return (gpu_products.product if gpu_products.takes(x, weight) else padded)(x, weight, bias, residual)
    return product


def gate_alone(x, gate_proj: dict, up_proj: dict, product: Callable) -> mx.array:
    """silu_gate with each row computed alone: in one kernel of gpu_products' where it runs (CUDA), else by the
    step's product (`rows_alone`)."""
    if gpu_products.takes(x, gate_proj["weight"]) and "bias" not in gate_proj and "bias" not in up_proj:
        return gpu_products.gated(x, gate_proj["weight"], up_proj["weight"])
    return silu_gate(x, gate_proj, up_proj, product)


def qkv_alone(x, q_proj: dict, k_proj: dict, v_proj: dict, product: Callable) -> tuple[mx.array, mx.array, mx.array]:
    """qkv_projections with each row computed alone: in one kernel of gpu_products' where it runs (CUDA), else by the
    step's product (`rows_alone`)."""
    projections = (q_proj, k_proj, v_proj)
    if gpu_products.takes(x, q_proj["weight"]) and all("bias" in p for p in projections):
        return gpu_products.qkv(x, *(p["weight"] for p in projections), *(p["bias"] for p in projections))
    return qkv_projections(x, q_proj, k_proj, v_proj, product)


def one_query_per_row(attention: Callable) -> Callable:
    """Attention with each of a row's L queries as a row of its own: [B, H, L, D] -> [B, H, L, D].

    Query i of row b becomes row b * L + i, over a copy of row b's keys and values, masked at its
    own position: the arithmetic of a one-token decode step, whatever L.
    """
    def attend(q, k, v, scale=None, mask=None):
        B, H, L, D = q.shape
        if L == 1:
            return attention(q, k, v, scale=scale, mask=mask)
        q = q.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)  # [B*L, H, 1, D]
        k, v = mx.repeat(k, L, axis=0), mx.repeat(v, L, axis=0)  # [B*L, K, S, D]
        mask = mask.transpose(0, 2, 1, 3).reshape(B * L, 1, 1, -1)  # [B, 1, L, S] -> [B*L, 1, 1, S]
        out = attention(q, k, v, scale=scale, mask=mask)  # [B*L, H, 1, D]
        return out.reshape(B, L, H, D).transpose(0, 2, 1, 3)
    return attend


def fixed_shape_step(params, config, tokens, cache, kernels, rows):
    """decode_step with each row of a product computed alone and one query per attention row: -> (logits [B, L, V],
    cache).

    tokens [B, L] with B * L <= rows: a decode step of B rows (L = 1) or a verifier step (B = 1). The cache
    holds the B real rows only; any padding lives inside the products (`rows_alone`).
    """
    kern = KERNELS[kernels] if isinstance(kernels, str) else kernels
    kern = kern._replace(linear=rows_alone(rows), gate=gate_alone, qkv=qkv_alone,
                         attention=one_query_per_row(kern.attention))
    return forward(params, config, tokens, cache, kern)


compiled_decode_step = mx.compile(decode_step)

# Most rows of a fixed-shape step (None: steps as they come), padded to it where products are padded (not on
# CUDA). Measured on the H200 (benchmarks/README.md): without it, one request's greedy tokens changed with the
# batch and with speculation in bfloat16. Up to 64 rows decode at once (--parallel).
# The CPU needs none: its BLAS adapter computes each row of a product alone (blas_adapter.c).
STEP_ROWS = {"cpu": None, "gpu": 64}


def step_rows() -> int | None:
    return STEP_ROWS["gpu" if mx.default_device() == mx.gpu else "cpu"]


class Sampling(NamedTuple):
    """How the next token is drawn; each default turns its filter off (temp 0 is greedy)."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 20  # recent tokens the penalties look at
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each recent token's logit
    frequency_penalty: float = 0.0  # and this, once per time it occurred


def apply_repetition_penalty(logits: mx.array, recent: mx.array, penalty: float | mx.array) -> mx.array:
    """Make recently seen tokens less likely: [B, V], each row's recent ids [B, N], a penalty (or one per row,
    [B, 1] in logits' dtype) -> [B, V] (positive / p, negative * p; an id seen twice is penalized once)."""
    seen = mx.take_along_axis(logits, recent, axis=-1)  # [B, N]
    penalized = mx.where(seen < 0, seen * penalty, seen / penalty)
    # a huge penalty (1e300: inf in float32) took a finite logit to -inf; were they every token a grammar allows, the
    # draw was from no token at all: any token (a 400 mid-answer). A masked token (-inf) stays out.
    penalized = mx.where(seen == -mx.inf, seen, mx.maximum(penalized, mx.finfo(logits.dtype).min))
    return mx.put_along_axis(logits, recent, penalized, axis=-1)


def apply_presence_and_frequency(logits: mx.array, recent: mx.array, presence: float, frequency: float) -> mx.array:
    """OpenAI's additive penalties: [B, V], recent ids [N] -> [B, V] minus presence (if seen) + frequency * count."""
    counts = mx.zeros((logits.shape[-1],), mx.float32).at[recent].add(1)  # [V]: how often each token occurred
    return logits - (presence * (counts > 0) + frequency * counts).astype(logits.dtype)


def top_k_ids(logprobs: mx.array, k: int) -> mx.array:
    """The k most likely tokens of each row, in vocabulary order: [B, V] -> ids [B, k] (ties: argpartition's pick)."""
    return mx.sort(mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k], axis=-1)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches p: log-probabilities [B, N] -> [B, N]
    with the rest at -inf. The mass is measured against 1 (the log-probabilities are normalized), so N may be the
    vocabulary or its k likeliest tokens alone: the likeliest tokens' sums are the same either way."""
    ascending = mx.sort(logprobs, axis=-1)
    mass_above = mx.cumsum(mx.exp(ascending.astype(mx.float32)), axis=-1, reverse=True, inclusive=False)  # likelier
    # [B, 1], the likeliest token kept whatever p: one under float32's range (1e-50) is 0 there, every token was
    # dropped, and the draw was from all -inf: any token, a masked one too (a grammar's answer broken)
    dropped = mx.minimum((mass_above >= p).sum(axis=-1, keepdims=True), logprobs.shape[-1] - 1)
    threshold = mx.take_along_axis(ascending, dropped, axis=-1)
    return mx.where(logprobs < threshold, -mx.inf, logprobs)


def apply_min_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep tokens at least p times as likely as the most likely one: [B, N] -> [B, N]."""
    floor = mx.max(logprobs, axis=-1, keepdims=True) + math.log(p)
    return mx.where(logprobs < floor, -mx.inf, logprobs)


FLOAT32_TINY = 1.2e-38  # the smallest normal float32 (about): a factor that is not 0 there
GREEDY_BELOW = 1e-5  # a temperature this small draws the argmax anyway (1 / temp would overflow)


def log_softmax(logits: mx.array) -> mx.array:
    """[..., V] -> log-probabilities [..., V], in float32."""
    logits = logits.astype(mx.float32)
    return logits - logsumexp(logits)


def logsumexp(x: mx.array) -> mx.array:
    """log(sum(exp(x))) over the last axis, stable: [..., V] -> [..., 1], in float32 (by exp_of_nonpositive:
    mx.logsumexp's exp took 2 ms of a CPU decode step over the packaged model's 151,936 logits)."""
    x = x.astype(mx.float32)
    m = mx.max(x, axis=-1, keepdims=True)
    return m + mx.log(mx.sum(exp_of_nonpositive(x - m), axis=-1, keepdims=True))


def tempered_logprobs(logprobs: mx.array, s: Sampling) -> mx.array:
    """Log-probabilities [B, N] -> the unnormalized log-probabilities a sampler draws from: filtered, then / temp."""
    if 0 < s.top_p < 1:
        logprobs = apply_top_p(logprobs, s.top_p)
    if s.min_p > 0:
        logprobs = apply_min_p(logprobs, s.min_p)
    return logprobs * max(1 / s.temp, FLOAT32_TINY)  # past 1e38, 1 / temp is 0 in float32, and -inf * 0 NaN


def sample(logits: mx.array, s: Sampling, key: mx.array | None = None) -> mx.array:
    """Logits [B, V] -> next token ids [B], after the filters that s turns on; key: the random key.

    With top-k on, the draw is among the k likeliest tokens alone: top-p and min-p keep a run of the likeliest
    tokens, so among the k they keep what they keep of the whole vocabulary, and a row's draw is the one
    categorical makes over the vocabulary with the rest at -inf, without sorting the vocabulary (151,936 floats:
    about 30 ms on the CPU, a third of a decode step of the packaged model)."""
    if s.temp < GREEDY_BELOW:
        return mx.argmax(logits, axis=-1)
    logprobs = log_softmax(logits)  # [B, V]
    if not 0 < s.top_k < logprobs.shape[-1]:  # k at least the vocabulary keeps every token
        return mx.random.categorical(tempered_logprobs(logprobs, s), key=key)
    ids = top_k_ids(logprobs, s.top_k)  # [B, k]
    drawn = mx.random.categorical(tempered_logprobs(mx.take_along_axis(logprobs, ids, axis=-1), s), key=key)
    return mx.take_along_axis(ids, drawn[:, None], axis=-1)[:, 0]


compiled_sample = mx.compile(sample)


def sampling_key(seed: int, position: int) -> mx.array:
    """The random key of the token at `position` of a request seeded `seed`: a hash of the two, so
    that nothing else (the process, other requests, what ran before) moves a request's draws."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return mx.random.key(int.from_bytes(digest, "little"))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


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


class Perplexity(NamedTuple):
    tokens: int  # in the text
    nll: float  # mean negative log-likelihood per scored token, in nats
    perplexity: float  # exp(nll)


def perplexity(params, config, tokens: list[int], context: int = 1024, kernels="reference") -> Perplexity:
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
    return Perplexity(len(tokens), mean, math.exp(mean))
