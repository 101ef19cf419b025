"""The model's pieces against a reference: MLX's own ops and mx.fast kernels, mlx_lm's Qwen2
modules, samplers, generation and perplexity, with fixed seeds and named tolerances."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from conftest import (
    DTYPES,
    HERE,
    LAYER_TOL,
    LOGITS_ATOL_F32,
    LOGITS_TOL,
    ROPE_TOL,
    SMALL,
    TOL,
    assert_close,
    log_softmax,
    rand,
    reference_model,
)
from qwen2s import cpu_attention, weights
from qwen2s.engine import Engine, Request

# ---------------------------------------------------------------------------------------------
# Day 1: softmax, linear, silu, attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax(dtype):
    x = rand((3, 5, 40), dtype, scale=10)
    for axis in (-1, 1):
        assert_close(q.softmax(x, axis), mx.softmax(x, axis=axis), *TOL[dtype], f"softmax axis {axis}")


def test_exp_of_nonpositive_is_exp_to_float32_precision():
    """The softmax's exp (a polynomial: MLX's CPU exp is scalar): within 2e-7 relative of exp down to 1e-37, exactly
    1 at 0, 0 at -inf and at the bottom of float32's range."""
    x = mx.concatenate([mx.array([0.0, -1e-8, -88.0, -200.0, -mx.inf]),
                        -mx.random.uniform(0, 87, (20000,), key=mx.random.key(3))])
    ours, exact = np.array(q.exp_of_nonpositive(x), np.float64), np.exp(np.array(x, np.float64))
    big = exact > 1e-37
    assert np.all(np.abs(ours - exact)[big] <= 2e-7 * exact[big]) and np.all(np.abs(ours - exact)[~big] < 1e-37)
    assert ours[0] == 1.0 and ours[3] == ours[4] == 0.0
    again = q.exp_of_nonpositive(x.reshape(5, 1, -1))  # compiled shapeless: any shape, the same kernel
    assert again.shape == (5, 1, 4001) and np.array_equal(np.array(again).ravel(), np.array(q.exp_of_nonpositive(x)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_over_long_masked_rows_takes_the_maximum_in_two_steps_and_the_same_bits(dtype):
    """Attention's softmax over a long cache: the maximum of [..., S] as [..., S / 64, 64] (3x faster on the CPU) is
    mx.max's, masked (-inf) keys and rows of one key included; the shift subtracted inside the exp's kernel and a
    boolean mask added as 0 / -inf give the bits of the subtraction and of mx.where they stand for."""
    x = rand((2, 3, 4, 1024), dtype, scale=10)
    x = mx.where(mx.arange(1024) < mx.array([1, 300, 1024])[:, None, None], x, -mx.inf)  # filled: 1, 300, all
    assert q.row_max(x).shape == (2, 3, 4, 1)
    assert np.array_equal(np.array(q.row_max(x).astype(mx.float32)), np.array(mx.max(x, -1, keepdims=True)
                                                                             .astype(mx.float32)))
    m = mx.max(x, axis=-1, keepdims=True)
    e = q.exp_of_nonpositive(x - m)
    expected = e / mx.sum(e, axis=-1, keepdims=True)
    assert np.array_equal(np.array(q.softmax(x).astype(mx.float32)), np.array(expected.astype(mx.float32))), dtype
    scores, mask = rand((1, 2, 3, 1, 512), mx.float32), mx.arange(512) < 200
    assert mx.array_equal(scores + mx.where(mask, 0.0, -mx.inf), mx.where(mask, scores, -mx.inf)).item()


def test_softmax_is_stable_for_large_inputs():
    x = mx.array([[1000.0, 1001.0, 999.0]])
    assert_close(q.softmax(x), mx.softmax(x, axis=-1), *TOL[mx.float32], "softmax of large values")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(dtype):
    x, w, b = rand((2, 7, 24), dtype, 1), rand((16, 24), dtype, 2), rand((16,), dtype, 3)
    assert_close(q.linear(x, w, b), mx.addmm(b, x, w.T), *TOL[dtype], "linear with bias")
    assert_close(q.linear(x, w), x @ w.T, *TOL[dtype], "linear without bias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu(dtype):
    x = rand((4, 64), dtype, scale=5)
    assert_close(q.silu(x), nn.silu(x), *TOL[dtype], "silu")


ATTENTION_CASES = [  # (B, H, K, L, S)
    (1, 4, 4, 6, 6),  # multi-head
    (2, 4, 2, 6, 6),  # grouped, G = 2
    (2, 6, 3, 5, 9),  # grouped, L < S
    (1, 14, 2, 3, 11),  # Qwen2-0.5B's ratio, G = 7
    (2, 8, 1, 4, 4),  # multi-query
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,K,L,S", ATTENTION_CASES)
def test_attention_plain_scaled_and_masked(B, H, K, L, S, dtype):
    D = 16
    qs, ks, vs = rand((B, H, L, D), dtype, 1), rand((B, K, S, D), dtype, 2), rand((B, K, S, D), dtype, 3)
    fast = mx.fast.scaled_dot_product_attention
    tol = LAYER_TOL[dtype]
    assert_close(q.scaled_dot_product_attention(qs, ks, vs), fast(qs, ks, vs, scale=D**-0.5), *tol, "plain")
    assert_close(q.scaled_dot_product_attention(qs, ks, vs, scale=0.3), fast(qs, ks, vs, scale=0.3), *tol, "scaled")
    additive = rand((B, 1, L, S), dtype, 4)
    assert_close(q.scaled_dot_product_attention(qs, ks, vs, 0.3, additive),
                 fast(qs, ks, vs, scale=0.3, mask=additive), *tol, "additive mask")
    boolean = mx.random.uniform(shape=(1, H, L, S), key=mx.random.key(5)) > 0.3
    boolean[..., 0] = True  # every query sees at least one key
    assert_close(q.scaled_dot_product_attention(qs, ks, vs, 0.3, boolean),
                 fast(qs, ks, vs, scale=0.3, mask=boolean), *tol, "boolean mask")
    assert_close(q.scaled_dot_product_attention(qs, ks, vs, 0.3, "causal"),
                 fast(qs, ks, vs, scale=0.3, mask="causal"), *tol, "causal, bottom-right")
    assert_close(q.scaled_dot_product_attention(qs, ks, vs, 0.3, q.causal_mask(L, S)),
                 fast(qs, ks, vs, scale=0.3, mask="causal"), *tol, "causal_mask array")


def test_causal_mask_is_bottom_right_aligned():
    expected = np.tril(np.ones((3, 5), dtype=bool), k=2)
    assert (np.array(q.causal_mask(3, 5)) == expected).all()
    # with an explicit offset, slots past offset + L (unfilled cache) stay hidden
    assert (np.array(q.causal_mask(2, 8, mx.array(3))) == np.tril(np.ones((2, 8), dtype=bool), k=3)).all()


# ---------------------------------------------------------------------------------------------
# Day 2: RoPE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("offset", [0, 7, mx.array(13)])
def test_rope(traditional, offset, dtype):
    x = rand((2, 4, 9, 32), dtype)
    ours = q.rope(x, 1e6 if not traditional else 1e4, offset, traditional)
    theirs = mx.fast.rope(x, 32, traditional=traditional, base=1e6 if not traditional else 1e4,
                          scale=1.0, offset=offset)
    assert_close(ours, theirs, *ROPE_TOL[dtype], f"rope traditional={traditional} offset={offset}")


# ---------------------------------------------------------------------------------------------
# Day 4: RMSNorm and the MLP
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    x, w = rand((2, 5, 64), dtype, 1, scale=3), rand((64,), dtype, 2)
    assert_close(q.rms_norm(x, w, 1e-6), mx.fast.rms_norm(x, w, 1e-6), *LAYER_TOL[dtype], "rms_norm")
    assert q.rms_norm(x, w, 1e-6).dtype == dtype


# ---------------------------------------------------------------------------------------------
# Layers, block and whole model against mlx_lm's Qwen2
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 2])
def test_attention_layer_mlp_and_block(B, dtype):
    model, params, config, _ = reference_model(dtype=dtype)
    layer_ref, layer = model.model.layers[0], params["model"]["layers"][0]
    x = rand((B, 7, 64), dtype, 3)
    ours, _ = q.self_attention(x, **layer["self_attn"], config=config, kv=None, offset=mx.array(0))
    assert_close(ours, layer_ref.self_attn(x, mask="causal"), *LAYER_TOL[dtype], "attention layer")
    assert_close(q.mlp(x, **layer["mlp"]), layer_ref.mlp(x), *LAYER_TOL[dtype], "mlp")
    ours, _ = q.block(x, layer, config, None, mx.array(0))
    assert_close(ours, layer_ref(x, mask="causal"), *LAYER_TOL[dtype], "block")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("B", [1, 2])
def test_whole_model_against_mlx_lm(B, tie, dtype):
    model, params, config, _ = reference_model(tie, dtype)
    assert ("lm_head" in params) == (not tie)
    tokens = mx.random.randint(0, 300, (B, 11), key=mx.random.key(4))
    ours, _ = q.forward(params, config, tokens)
    theirs = model(tokens)
    if dtype == mx.float32:
        assert_close(ours, theirs, 0, LOGITS_ATOL_F32, "whole-model logits, float32")
    else:
        assert_close(log_softmax(ours), log_softmax(theirs), *LOGITS_TOL[dtype], f"log-softmax, {dtype}")


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 64)])
def test_quantized_model_dequantized_matches_mlx_lm(bits, group_size):
    model, _, config, raw = reference_model(tie=False)
    nn.quantize(model, group_size=group_size, bits=bits)
    flat = dict(tree_flatten(model.parameters()))
    assert "model.embed_tokens.scales" in flat and "lm_head.scales" in flat  # embeddings quantized too
    dense = weights.dequantize(flat, {"group_size": group_size, "bits": bits}, Path("test"))
    tokens = mx.random.randint(0, 300, (1, 9), key=mx.random.key(5))
    ours, _ = q.forward(tree_unflatten(list(dense.items())), config, tokens)
    with mx.stream(mx.cpu):  # mlx_lm's quantized matmul is wrong on MLX 0.32.4's CUDA backend (max diff 1.9)
        theirs = model(tokens)
    assert_close(ours, theirs, 0, LOGITS_ATOL_F32, f"quantized {bits}-bit g{group_size}")


def test_config_from_dict_ignores_unknown_keys_and_derives_head_dim():
    config = q.config_from_dict({**SMALL, "tie_word_embeddings": False, "rope_theta": 1e4, "foo": 1})
    assert config.tie_word_embeddings is False and config.rope_theta == 1e4 and config.head_dim == 16
    with pytest.raises(AttributeError):
        config.hidden_size = 3  # immutable


# ---------------------------------------------------------------------------------------------
# The KV cache and the compiled decode step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", ["reference", "fast"])
def test_cached_decoding_equals_full_forward(kernels):
    _, params, config, _ = reference_model(tie=False)
    tokens = mx.random.randint(0, 300, (2, 12), key=mx.random.key(6))
    full, _ = q.forward(params, config, tokens, kernels=kernels)
    cache = q.reserve(q.new_cache(config, batch=2), 12, block_size=8)  # capacity 16: unfilled slots
    prompt_logits, cache = q.forward(params, config, tokens[:, :5], cache, kernels)
    steps = [prompt_logits]
    for i in range(5, 12):
        logits, cache = q.forward(params, config, tokens[:, i : i + 1], cache, kernels)
        steps.append(logits)
    assert cache["offset"].tolist() == [12, 12]
    assert_close(mx.concatenate(steps, axis=1), full, 0, LOGITS_ATOL_F32, "prompt then token by token")


@pytest.mark.parametrize("kernels", ["reference", "fast"])
@pytest.mark.parametrize("aligned", [True, False])
def test_prefill_in_chunks_equals_one_call(kernels, aligned):
    """Aligned chunks attend over the filled keys only, under the "causal" string (which must align the mask
    bottom-right: a chunk's queries come after the keys before it); unaligned ones over the whole capacity."""
    _, params, config, _ = reference_model()
    tokens = mx.random.randint(0, 300, (1, 23), key=mx.random.key(7))
    full, _ = q.forward(params, config, tokens, kernels=kernels)
    last, cache = q.prefill(params, config, tokens, q.new_cache(config), kernels, chunk=5, aligned=aligned)
    assert cache["offset"].item() == 23 and q.cache_capacity(cache) == q.CACHE_BLOCK  # whole blocks, as decoding's
    assert_close(last, full[:, -1], 0, LOGITS_ATOL_F32, f"chunked prefill, {kernels} kernels")


def test_a_prompt_leaves_the_same_bits_prefilled_in_any_pieces_or_decoded_token_by_token(on_cpu):
    """One request, one answer, at its root: on the CPU in float32 (q.rows_exact) every row is computed alone, so
    a prompt's keys, values and last logits are the same bits cut into chunks of 64, split anywhere (a prompt cache
    holding any prefix), or run token by token through the compiled decode step (an answer's tokens), and in a
    cache of any capacity. The model is wide enough (hidden 384) that its products take the few-row kernel."""
    _, params, config, _ = reference_model(hidden_size=384, intermediate_size=768, num_attention_heads=6,
                                           num_key_value_heads=2, vocab_size=300)
    assert q.rows_exact(mx.float32)
    tokens = [(7 * i) % 290 + 3 for i in range(150)]

    def prefill(pieces, cache=None, aligned=True):
        cache = cache or q.new_cache(config)
        for piece in pieces:
            logits, cache = q.prefill(params, config, mx.array([piece]), cache, chunk=q.EXACT_ROWS, aligned=aligned)
        return logits, cache

    def same(a, b):
        (la, ca), (lb, cb) = a, b
        n = len(tokens)
        return np.array_equal(np.array(la), np.array(lb)) and all(
            np.array_equal(np.array(x[:, :, :n]), np.array(y[:, :, :n]))
            for kx, ky in zip(ca["layers"], cb["layers"], strict=True) for x, y in zip(kx, ky, strict=True))

    whole = prefill([tokens])
    for cut in (1, 37, 64, 65, 130, 149):
        assert same(prefill([tokens[:cut], tokens[cut:]]), whole), f"split at {cut}"
    assert same(prefill([tokens[:37], tokens[37:]], aligned=False), whole), "chunks from where the cache ends"
    _, cache = prefill([tokens[:140]])
    cache = q.reserve(cache, 1000)  # a larger cache than the prefill's, as a batch's
    for t in tokens[140:]:
        logits, cache = q.compiled_decode_step(params, config, mx.array([[t]]), cache)
    assert same((logits[:, -1], cache), whole), "token by token"


def test_compiled_step_equals_eager_step():
    _, params, config, _ = reference_model()
    _, cache = q.prefill(params, config, mx.array([[1, 2, 3, 4]]), q.new_cache(config))
    cache = q.reserve(cache, 5)
    token = mx.array([[5]])
    eager, c1 = q.decode_step(params, config, token, cache)
    compiled, c2 = q.compiled_decode_step(params, config, token, cache)
    assert_close(compiled, eager, 0, 1e-5, "compiled step logits")
    assert_close(c2["layers"][1][0], c1["layers"][1][0], 0, 1e-6, "compiled step keys")
    assert c2["offset"].item() == c1["offset"].item() == 5


def step_nodes(layers: int, tmp_path) -> list[str]:
    """The primitives of a compiled decode step of a `layers`-layer model over a computed cache of 4 rows."""
    _, params, config, _ = reference_model(num_hidden_layers=layers)
    cache = q.reserve(q.new_cache(config, 4), 64)
    cache = {"layers": cache["layers"], "offset": mx.array([3, 9, 20, 40], mx.int32)}
    mx.eval(cache)
    logits, cache = q.compiled_decode_step(params, config, mx.full((4, 1), 5, mx.int32), cache)
    path = tmp_path / f"step-{layers}.dot"
    mx.export_to_dot(str(path), logits, cache)
    return re.findall(r'label ="([A-Za-z]+)"', path.read_text())


def test_a_compiled_step_computes_ropes_angles_and_the_cache_slots_once(on_cpu, tmp_path):
    """Each layer's RoPE (on q and on k) and cache writes compute the same angles and slots from the same offsets:
    from constant ranges (arange_constant) mx.compile merges them into one computation a step, not one a call."""
    two, three = step_nodes(2, tmp_path), step_nodes(3, tmp_path)
    for primitive in ("Arange", "Cos", "Sin"):
        assert three.count(primitive) == two.count(primitive) <= 1, (primitive, two.count(primitive))
    assert 0 < len(three) - len(two) <= 60, "a layer's nodes"  # 58 at arange_constant's commit (81 before)


def test_decoding_three_blocks_traces_once_per_block(monkeypatch):
    # a config no other test uses, so every trace of the compiled step is counted here
    _, params, config, _ = reference_model(hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                                           intermediate_size=96, vocab_size=150)
    traces = []
    original = q.hidden_states

    def counting(params, config, tokens, cache=None, kernels="reference"):
        traces.append(q.cache_capacity(cache))  # runs only while the compiled step traces
        return original(params, config, tokens, cache, kernels)

    monkeypatch.setattr(q, "hidden_states", counting)
    block = 32
    cache = q.reserve(q.new_cache(config), 3, block_size=block)
    _, cache = q.forward(params, config, mx.array([[1, 2, 3]]), cache)
    traces.clear()
    token = mx.array([[4]])
    for pos in range(3, 3 * block):
        cache = q.reserve(cache, pos + 1, block_size=block)
        logits, cache = q.compiled_decode_step(params, config, token, cache)
        token = mx.argmax(logits[:, -1], axis=-1).astype(mx.int32)[:, None]
        mx.eval(token, cache)
    assert traces == [block, 2 * block, 3 * block], f"traces at capacities {traces}"


# ---------------------------------------------------------------------------------------------
# A batch is one more axis: rows of different lengths, each at its own offset
# ---------------------------------------------------------------------------------------------


def test_rows_of_a_batch_are_computed_as_they_would_be_alone(on_cpu):
    """Three prompts of different lengths decoded together equal each decoded alone, bit for bit (on the CPU,
    whose products blas_adapter.c computes row by row; a GPU's kernels round a batch's rows otherwise)."""
    _, params, config, _ = reference_model()
    prompts = [[5, 6, 7], list(range(10, 30)), [40, 41, 42, 43, 44, 45, 46, 47, 48, 49]]
    alone, caches, last = [], [], []
    for p in prompts:
        logits, cache = q.prefill(params, config, mx.array([p]), q.new_cache(config))
        cache = q.reserve(cache, len(p) + 1)
        step, cache = q.compiled_decode_step(params, config, mx.argmax(logits, -1)[:, None], cache)
        alone.append(np.array(step[0, -1]))
        caches.append(cache)
        last.append(mx.argmax(logits, -1))
    capacity = max(q.cache_capacity(c) for c in caches)
    caches = [q.reserve(c, capacity, block_size=1) for c in caches]
    batch = {"layers": [(mx.concatenate([c["layers"][i][0] for c in caches]),
                         mx.concatenate([c["layers"][i][1] for c in caches])) for i in range(config.num_hidden_layers)],
             "offset": mx.array([len(p) for p in prompts], mx.int32)}
    batch = q.reserve(batch, capacity + q.CACHE_BLOCK)  # a larger capacity than any row had alone
    together, _ = q.compiled_decode_step(params, config, mx.concatenate(last)[:, None], batch)
    for i in range(len(prompts)):
        assert np.array_equal(np.array(together[i, -1]), alone[i]), f"row {i} differs in the batch"


def test_a_fixed_shape_step_is_a_decode_step_with_its_products_padded(on_cpu):
    """A GPU's fixed-shape step (every product at `rows` rows, each query a row of its own in attention) gives a
    decode step's and a verifier step's logits and cache bit for bit (on the CPU, whose rows are computed alone);
    the padding lives inside the products: the cache keeps the real rows only."""
    _, params, config, _ = reference_model()
    x = rand((2, 3, config.hidden_size))
    w = params["model"]["layers"][0]["self_attn"]["q_proj"]
    assert np.array_equal(np.array(q.rows_of_products(8)(x, **w)), np.array(q.linear(x, **w)))  # [2, 3, E]: 6 rows
    residual = rand((2, 3, w["weight"].shape[0]), seed=5)  # o_proj and down_proj add theirs to the residual stream
    assert np.array_equal(np.array(q.rows_of_products(8)(x, **w, residual=residual)),
                          np.array(q.linear(x, **w, residual=residual)))
    _, cache = q.prefill(params, config, mx.array([[5, 6, 7, 8], [9, 10, 11, 12]]), q.new_cache(config, 2))
    cache = q.reserve(cache, 8)
    for tokens in (mx.array([[3], [4]]), mx.array([[3, 4, 5]])):  # a decode step of two rows; a verifier step of one
        rows = cache if tokens.shape[0] == 2 else q.take_rows(cache, slice(0, 1))
        plain, plain_cache = q.decode_step(params, config, tokens, rows)
        fixed, fixed_cache = q.compiled_decode_step(params, config, tokens, rows, "reference", 8)
        assert fixed.shape == plain.shape and np.array_equal(np.array(fixed), np.array(plain))
        assert fixed_cache["offset"].tolist() == plain_cache["offset"].tolist()
        for (k1, v1), (k2, v2) in zip(fixed_cache["layers"], plain_cache["layers"], strict=True):
            assert k1.shape == k2.shape and np.array_equal(np.array(k1), np.array(k2))
            assert np.array_equal(np.array(v1), np.array(v2))


def test_offsets_per_row_rotate_and_mask_each_row_at_its_own_positions():
    x = rand((2, 4, 3, 16))
    both = q.rope(x, 1e4, mx.array([0, 9]))
    assert_close(both[0:1], q.rope(x[0:1], 1e4, 0), 0, 0, "row 0 at offset 0")
    assert_close(both[1:2], q.rope(x[1:2], 1e4, 9), 0, 0, "row 1 at offset 9")
    mask = q.causal_mask(2, 8, mx.array([1, 5]))  # [B, 1, L, S]
    assert mask.shape == (2, 1, 2, 8)
    assert np.array_equal(np.array(mask[1, 0]), np.array(q.causal_mask(2, 8, 5)))


@pytest.mark.parametrize("mask", [None, "causal", "array"])
def test_attention_layer_takes_the_course_masks(mask):
    """mask=None is full attention, "causal" the model's, an array is added to the scores: as mlx_lm's
    Attention computes with the same mask."""
    model, params, config, _ = reference_model()
    layer = params["model"]["layers"][0]
    x = rand((2, 6, config.hidden_size), seed=4)
    given = rand((6, 6), seed=5) if mask == "array" else mask
    ours, _ = q.self_attention(x, **layer["self_attn"], config=config, mask=given)
    theirs = model.model.layers[0].self_attn(x, mask=given)
    assert_close(ours, theirs, *LAYER_TOL[mx.float32], f"attention, mask {mask}")
    ours_block, _ = q.block(x, layer, config, mask=given)
    assert_close(ours_block, model.model.layers[0](x, mask=given), *LAYER_TOL[mx.float32], f"block, mask {mask}")


# ---------------------------------------------------------------------------------------------
# Attention over a cache in one kernel on the CPU (attention.cpp through cpu_attention.py)
# ---------------------------------------------------------------------------------------------

CACHED_ATTENTION_CASES = [  # B, H, K, L, S, D, each row's first query's position
    (1, 4, 2, 1, 300, 32, [250]),  # a decode step of the tests' tiny shape
    (1, 14, 2, 1, 520, 64, [519]),  # Qwen2-0.5B's heads, the cache full
    (1, 4, 2, 30, 512, 32, [100]),  # a prefill chunk over a cache
    (2, 14, 2, 5, 256, 64, [10, 200]),  # a batch's rows at their own positions (a verifier step's shape)
    (1, 28, 4, 9, 64, 128, [0]),  # Qwen2-7B's heads, a prompt's first chunk
    (3, 8, 8, 1, 24, 16, [0, 5, 23]),  # one key seen, some, all; no grouping
]


@pytest.mark.parametrize("B,H,K,L,S,D,start", CACHED_ATTENTION_CASES)
def test_attention_in_one_kernel_is_the_models_attention(on_cpu, B, H, K, L, S, D, start):
    """cpu_attention.attention computes scaled_dot_product_attention under the causal mask of each row's offset."""
    assert cpu_attention.runs_here(mx.float32, D), cpu_attention.describe()
    qs, ks, vs = rand((B, H, L, D), seed=1), rand((B, K, S, D), seed=2), rand((B, K, S, D), seed=3)
    offsets = mx.array(start, mx.int32)
    ours = cpu_attention.attention(qs, ks, vs, offsets, 0.3)
    reference = q.scaled_dot_product_attention(qs, ks, vs, 0.3, q.causal_mask(L, S, offsets))
    assert ours.shape == (B, H, L, D) and ours.dtype == mx.float32
    assert_close(ours, reference, *LAYER_TOL[mx.float32], "attention in one kernel")


def test_attention_in_one_kernel_reads_views_as_their_copies(on_cpu):
    """Queries transposed from [B, L, H, D], keys and values sliced from a longer cache, one position broadcast to
    every row: the kernel reads each view's elements as a row-contiguous copy of it gives them, the same bits."""
    qs = rand((2, 3, 4, 32), seed=1).transpose(0, 2, 1, 3)  # [B, H, L, D], not row-contiguous
    ks, vs = rand((2, 2, 700, 32), seed=2)[:, :, :600], rand((2, 2, 700, 32), seed=3)[:, :, :600]
    start = mx.broadcast_to(mx.array(400, mx.int32), (2,))  # a stride of 0
    views = cpu_attention.attention(qs, ks, vs, start, 0.2)
    copies = cpu_attention.attention(*(mx.array(np.array(a)) for a in (qs, ks, vs, start)), 0.2)
    assert np.array_equal(np.array(views), np.array(copies))


def test_attention_in_one_kernel_gives_a_query_the_same_bits_wherever_it_is_computed(on_cpu):
    """A query's output depends on its position only: the same bits computed in a chunk of 40 or alone, in a
    cache of any capacity, beside other rows or not, eagerly or in a compiled step, with any number of threads."""
    qs, ks, vs = rand((1, 4, 40, 32), seed=1), rand((1, 2, 1024, 32), seed=2), rand((1, 2, 1024, 32), seed=3)
    chunk = np.array(cpu_attention.attention(qs, ks, vs, mx.array([500], mx.int32), 0.2))
    for i in (0, 7, 39):
        alone = cpu_attention.attention(qs[:, :, i : i + 1], ks[:, :, :544], vs[:, :, :544],
                                        mx.array([500 + i], mx.int32), 0.2)
        assert np.array_equal(np.array(alone)[:, :, 0], chunk[:, :, i]), f"query {i} alone, a smaller cache"
    other = rand((1, 4, 1, 32), seed=4), rand((1, 2, 1024, 32), seed=5), rand((1, 2, 1024, 32), seed=6)
    batch = [mx.concatenate([a[:, :, :1] if a.shape[2] == 40 else a, b]) for a, b in zip((qs, ks, vs), other,
                                                                                       strict=True)]
    together = cpu_attention.attention(*batch, mx.array([500, 90], mx.int32), 0.2)
    assert np.array_equal(np.array(together)[0, :, 0], chunk[0, :, 0]), "beside another row"
    compiled = mx.compile(lambda a, b, c, s: cpu_attention.attention(a, b, c, s, 0.2))
    assert np.array_equal(np.array(compiled(qs, ks, vs, mx.array([500], mx.int32))), chunk), "compiled"
    probe = """
from qwen2s import qwen2_scratch as q
import mlx.core as mx, numpy as np
from qwen2s import cpu_attention
mx.set_default_device(mx.cpu)
mx.random.seed(0)
x, k, v = mx.random.normal((1, 4, 40, 32)), mx.random.normal((1, 2, 1024, 32)), mx.random.normal((1, 2, 1024, 32))
print(np.array(cpu_attention.attention(x, k, v, mx.array([500], mx.int32), 0.2)).tobytes().hex()[:4000])
"""
    runs = {threads: subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=HERE,
                                    env={**os.environ, "QWEN2_SCRATCH_THREADS": threads}) for threads in "13"}
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr[-1000:] for r in runs.values()]
    assert runs["1"].stdout == runs["3"].stdout and len(runs["1"].stdout) > 1000, "one thread against three"


def test_the_model_takes_the_kernel_in_float32_on_the_cpu_and_mlx_ops_elsewhere(on_cpu):
    """Where the kernel runs (float32 on the CPU) the model's attention over a cache is it, and gives its
    reference's logits; in bfloat16, or opted out (QWEN2_SCRATCH_ATTENTION=mlx), MLX's ops compute attention."""
    kernels = q.KERNELS["reference"]
    assert q.in_one_kernel(kernels, mx.float32, 64).cached_attention is cpu_attention.attention
    assert q.in_one_kernel(kernels, mx.bfloat16, 64).cached_attention is None
    assert q.in_one_kernel(kernels, mx.float32, 12).cached_attention is None  # not a multiple of 8
    assert q.in_one_kernel(q.KERNELS["fast"], mx.float32, 64).cached_attention is None
    _, params, config, _ = reference_model()
    tokens = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    full, _ = q.forward(params, config, tokens)  # no cache: MLX's ops
    step, _ = q.forward(params, config, tokens, q.reserve(q.new_cache(config), 8))  # the kernel over the cache
    assert_close(step, full, 0, LOGITS_ATOL_F32, "the kernel over a cache against MLX's ops")
    opted_out = subprocess.run([sys.executable, "-c", "from qwen2s import qwen2_scratch as q, cpu_attention; "
                                "import mlx.core as mx; print(cpu_attention.runs_here(mx.float32, 64), "
                                "cpu_attention.describe())"], capture_output=True, text=True, cwd=HERE,
                               env={**os.environ, "QWEN2_SCRATCH_ATTENTION": "mlx"})
    assert opted_out.stdout.split() == ["False", "MLX's", "ops"] and opted_out.stderr == "", opted_out


# ---------------------------------------------------------------------------------------------
# Sampling against mlx_lm's samplers
# ---------------------------------------------------------------------------------------------


def logprobs_for_sampling(seed=0, V=300):
    logits = rand((1, V), seed=seed, scale=3)
    return logits, logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_filters_match_mlx_lm():
    from mlx_lm import sample_utils as su

    _, lp = logprobs_for_sampling()
    for k in (1, 5, 50):
        kept = np.flatnonzero(np.isfinite(np.array(su.apply_top_k(lp, k))[0]))
        assert np.array(q.top_k_ids(lp, k))[0].tolist() == kept.tolist(), f"top-k {k}"
    for p in (0.1, 0.5, 0.9):
        assert (np.array(q.apply_top_p(lp, p)) == np.array(su.apply_top_p(lp, p))).all(), f"top-p {p}"
    for p in (0.05, 0.2):
        assert (np.array(q.apply_min_p(lp, p)) == np.array(su.apply_min_p(lp, p))).all(), f"min-p {p}"


def test_extreme_top_p_and_temperature_keep_the_draw_among_the_kept_tokens():
    """top_p past float32's range (1e-50: 0 there) dropped every token, and a temperature past 1e38 made the dropped
    tokens' -inf * (1 / temp) NaN: the draw was any token, one a grammar masked too (a 400 mid-answer, or garbage)."""
    logits, _ = logprobs_for_sampling(2)
    masked = mx.where(mx.arange(300) % 7 == 0, logits, -mx.inf)  # as a grammar's mask leaves it
    for i in range(20):
        key = q.sampling_key(3, i)
        assert q.sample(logits, q.Sampling(temp=1.0, top_p=1e-50), key).item() == mx.argmax(logits).item()
        assert q.sample(masked, q.Sampling(temp=1.0, top_p=1e-300), key).item() == mx.argmax(masked).item()
        for temp in (1e39, 1e300):
            assert q.sample(masked, q.Sampling(temp=temp), key).item() % 7 == 0, temp
    # a penalty past float32's range took every token the mask allows (all seen, negative) to -inf
    allowed = mx.arange(0, 300, 7)
    seen = mx.where(mx.arange(300) % 7 == 0, -1 - mx.abs(logits), -mx.inf)
    penalized = q.apply_repetition_penalty(seen, allowed[None], 1e300)
    assert mx.all(mx.isfinite(penalized[0, allowed])).item() and (penalized[0] == -mx.inf).sum().item() == 300 - 43
    assert q.sample(penalized, q.Sampling(temp=1.0), q.sampling_key(3, 0)).item() % 7 == 0


@pytest.mark.parametrize("V", [300, 151_936])  # the tests' vocabulary and Qwen2's
def test_a_draw_among_the_k_likeliest_is_the_draw_over_the_whole_vocabulary(V):
    """With top-k on, `sample` draws among the k likeliest tokens alone (no sort of the vocabulary): a row gets the
    token that categorical draws over the whole vocabulary with every token the filters drop at -inf (top-p and
    min-p applied to the whole vocabulary). On the CPU, whose sums run in order: the same bits."""
    settings = [q.Sampling(temp=0.7, top_p=0.8, top_k=20), q.Sampling(temp=1.0, top_k=5),
                q.Sampling(temp=0.9, top_k=50, min_p=0.05), q.Sampling(temp=0.7, top_p=0.95, top_k=40, min_p=0.02),
                q.Sampling(temp=1.3, top_p=0.5, top_k=3)]
    with mx.stream(mx.cpu):
        for s in settings:
            draws, whole = [], []
            for i in range(40):
                logits = mx.random.normal((1, V), key=mx.random.key(100 + i)) * (1 + i % 6)
                lp, key = q.log_softmax(logits), q.sampling_key(5, i)
                kept = mx.put_along_axis(mx.zeros(lp.shape, mx.bool_), q.top_k_ids(lp, s.top_k), mx.array(True), -1)
                if 0 < s.top_p < 1:
                    kept = kept & (q.apply_top_p(lp, s.top_p) > -mx.inf)
                if s.min_p > 0:
                    kept = kept & (q.apply_min_p(lp, s.min_p) > -mx.inf)
                whole.append(mx.random.categorical(mx.where(kept, lp, -mx.inf) * (1 / s.temp), key=key).item())
                draws.append(q.compiled_sample(logits, s, key).item())
            assert draws == whole, s
            assert len(set(draws)) > 1, s


def test_repetition_penalty_matches_mlx_lm():
    from mlx_lm.sample_utils import make_repetition_penalty

    logits, _ = logprobs_for_sampling(1)
    recent = [3, 7, 7, 250, 11]
    ours = q.apply_repetition_penalty(mx.array(logits), mx.array([recent]), 1.3)
    theirs = make_repetition_penalty(1.3, context_size=20)(mx.array(recent), mx.array(logits))
    assert_close(ours, theirs, 0, 0, "repetition penalty")


def test_repetition_penalties_of_a_batch_give_each_row_its_own():
    """Rows with their own windows and penalties ([B, N], [B, 1]) get the bits each gets alone with its penalty as a
    number; a penalty of 1 leaves a row as it is (the engine draws penalized and plain greedy rows together)."""
    logits = mx.random.normal((3, 300), key=mx.random.key(3)).astype(mx.bfloat16) * 4
    recent = mx.array([[3, 7, 7, 250], [5, 5, 5, 5], [9, 1, 2, 3]])
    penalties = (1.05, 1.3, 1.0)
    together = q.apply_repetition_penalty(logits, recent, mx.array([[p] for p in penalties], logits.dtype))
    for i, p in enumerate(penalties):
        alone = q.apply_repetition_penalty(logits[i : i + 1], recent[i : i + 1], p)
        assert mx.array_equal(together[i : i + 1], alone), f"row {i}"
    assert mx.array_equal(together[2], logits[2]) and not mx.array_equal(together[0], logits[0])


def test_presence_and_frequency_penalties_match_mlx_lm():
    from mlx_lm.sample_utils import make_frequency_penalty, make_presence_penalty

    logits, _ = logprobs_for_sampling(4)
    recent = [3, 7, 7, 250, 11, 7]
    ours = q.apply_presence_and_frequency(mx.array(logits), mx.array(recent), 0.5, 0.0)
    assert_close(ours, make_presence_penalty(0.5, 20)(mx.array(recent), mx.array(logits)), 0, 1e-6, "presence")
    ours = q.apply_presence_and_frequency(mx.array(logits), mx.array(recent), 0.0, 0.3)
    assert_close(ours, make_frequency_penalty(0.3, 20)(mx.array(recent), mx.array(logits)), 0, 1e-6, "frequency")


@pytest.mark.parametrize("s", [q.Sampling(), q.Sampling(temp=0.7), q.Sampling(temp=0.7, top_p=0.8),
                               q.Sampling(temp=1.0, top_k=20), q.Sampling(temp=0.9, min_p=0.1),
                               q.Sampling(temp=0.7, top_p=0.9, top_k=40, min_p=0.05)])
def test_sampler_draws_what_mlx_lm_draws_with_the_same_seed(s):
    from mlx_lm.sample_utils import make_sampler

    logits, lp = logprobs_for_sampling(2)
    theirs_sampler = make_sampler(temp=s.temp, top_p=s.top_p if s.top_p < 1 else 0.0, min_p=s.min_p, top_k=s.top_k)
    ours, theirs = [], []
    mx.random.seed(11)
    for _ in range(20):
        ours.append(q.sample(logits, s).item())
    mx.random.seed(11)
    for _ in range(20):
        theirs.append(theirs_sampler(lp).item())
    assert ours == theirs
    if s.temp > 0:
        assert len(set(ours)) > 1, "sampling at temperature > 0 should not be constant here"


def test_a_draw_depends_on_the_seed_and_the_position_only():
    logits, _ = logprobs_for_sampling(3)
    s = q.Sampling(temp=1.0)
    draws = [q.compiled_sample(logits, s, q.sampling_key(7, pos)).item() for pos in range(30)]
    mx.random.seed(123)  # the process-wide generator moves nothing
    again = [q.sample(logits, s, q.sampling_key(7, pos)).item() for pos in range(30)]
    assert draws == again
    assert len(set(draws)) > 1
    assert draws != [q.sample(logits, s, q.sampling_key(8, pos)).item() for pos in range(30)]


GREEDY_PROMPTS = [  # (text, chat-templated)
    ("Write a haiku about the sea.", True),
    ("What is the capital of France? Answer in one sentence.", True),
    ("def fibonacci(n):", False),
    ("The three primary colors are", False),
]


@pytest.mark.packaged_model
@pytest.mark.parametrize("text,templated", GREEDY_PROMPTS)
def test_greedy_generation_equals_mlx_lm_token_for_token(packaged, packaged_mlx_lm, text, templated):
    from mlx_lm.generate import generate_step

    _, params, config, tokenizer = packaged
    if templated:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    else:
        prompt = tokenizer.encode(text)
    runner = Engine(params, config, tokenizer)
    ours = [e.token for e in runner.generate(Request(tuple(prompt), max_tokens=32)) if e.token is not None]
    theirs = [t for t, _ in generate_step(mx.array(prompt), packaged_mlx_lm[0], max_tokens=32)]
    theirs = theirs[: next((i + 1 for i, t in enumerate(theirs) if t in tokenizer.eos_token_ids), len(theirs))]
    assert ours == theirs, f"ours: {tokenizer.decode(ours)!r}\ntheirs: {tokenizer.decode(theirs)!r}"


def reference_perplexity(model, tokens, context):
    """The same windows scored with mlx_lm's model: mean cross-entropy over all but each first token."""
    total, count = 0.0, 0
    for start in range(0, len(tokens), context):
        window = mx.array(tokens[start : start + context])
        if window.size < 2:
            continue
        logits = model(window[None, :-1])[0].astype(mx.float32)
        total += nn.losses.cross_entropy(logits, window[1:], reduction="sum").item()
        count += window.size - 1
    return total / count


@pytest.mark.packaged_model
def test_perplexity_equals_mlx_lm(packaged, packaged_mlx_lm):
    _, params, config, tokenizer = packaged
    tokens = tokenizer.encode((HERE / "testdata" / "perplexity.txt").read_text(encoding="utf-8"))
    ours = q.perplexity(params, config, tokens, context=128)
    nll = reference_perplexity(packaged_mlx_lm[0], tokens, 128)
    assert ours.tokens == len(tokens) > 300
    assert abs(ours.nll - nll) / nll < 1e-3, (ours, nll)
    assert abs(ours.perplexity - np.exp(nll)) / np.exp(nll) < 1e-3
    assert 1 < ours.perplexity < 100  # a uniform guess over the vocabulary would score 151936
