"""Where one CPU decode step's time goes: each part of a step of the packaged model, timed alone.

    python tools/decode_profile.py [--model M] [--context 128] [--reps 40] [--json out.json]

One row, float32, our reference kernels, a cache holding --context tokens. Each part is every
layer's share of it at once (24 layers' q/k/v/o products, ...), compiled as the decode step is and
evaluated alone, --reps times, alternated with the others; each figure is the median. The parts:
the attention projections (q, k, v, o with biases), the MLP projections (gate, up, down), attention
over the cache (writing the new key and value, the mask, softmax(q k^T) v), norms + RoPE + the
element-wise rest (SiLU * up, residuals, the embedding row), the lm_head, and the sampler (what the
engine's greedy draw evaluates). Then the whole compiled step with the sampler, and the engine's
time per token (as `bench` decodes): what the parts leave of them is graph dispatch and Python.
Each part's weight bytes over its time, against the machine's best read bandwidth (bench's probe),
and what the part would take at llama.cpp's F32 speed (--llama-gbs, its bytes per token x tok/s).
Last, a few alternatives on the same shapes (fused products, the mx.fast kernels), to size changes
before making them.
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import ctypes
import json
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx

from qwen2s import bench, weights


class Part(NamedTuple):
    """One part of a decode step: prepare(*inputs) sets it up and returns what computes it (the timed call),
    and the weight bytes it reads."""

    name: str
    prepare: Callable[..., Callable[[], object]]
    inputs: tuple
    weight_bytes: int


class Timing(NamedTuple):
    name: str
    ms: float  # median over the repetitions
    spread: float  # (max - min) / median
    weight_bytes: int


def nbytes(*arrays) -> int:
    return sum(a.nbytes for a in arrays)


def layer_bytes(params: dict, group: str, names) -> int:
    return sum(nbytes(*layer[group][n].values()) for layer in params["model"]["layers"] for n in names)


# ---- the parts, each a pure function of the params and one step's inputs --------------------


def attention_projections(params, x):
    """q, k, v (with biases) and o of every layer on one row x [1, 1, E] (o's input has that shape too)."""
    return [q.linear(x, **layer["self_attn"][n]) for layer in params["model"]["layers"]
            for n in ("q_proj", "k_proj", "v_proj", "o_proj")]


def mlp_projections(params, x, h):
    """gate and up of every layer on x [1, 1, E], down on h [1, 1, F]."""
    out = []
    for layer in params["model"]["layers"]:
        m = layer["mlp"]
        out += [q.linear(x, **m["gate_proj"]), q.linear(x, **m["up_proj"]), q.linear(h, **m["down_proj"])]
    return out


def attention(params, config, queries, keys, values, cache, attend=q.scaled_dot_product_attention):
    """Every layer's cache write, mask and grouped attention: [1, H, 1, D] queries over [1, K, S, D] caches."""
    offset = cache["offset"]
    mask = q.causal_mask(1, q.cache_capacity(cache), offset)  # once a step, as hidden_states builds it
    out = []
    for (kc, vc), query in zip(cache["layers"], queries, strict=True):
        slots = q.cache_slots(offset, keys.shape)
        kc, vc = q.write_cache(kc, keys, slots), q.write_cache(vc, values, slots)
        out += [attend(query, kc, vc, scale=config.head_dim**-0.5, mask=mask), kc, vc]
    return out


def elementwise(params, config, tokens, x, qkv, gate, up, offset):
    """Every layer's two norms, RoPE on q and k, the transposes, SiLU * up and the residual adds; the embedding row
    and the final norm: what a step computes besides products and attention."""
    B, H, K, D, eps = 1, config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.rms_norm_eps
    out = [params["model"]["embed_tokens"]["weight"][tokens]]
    for layer in params["model"]["layers"]:
        n1 = q.rms_norm(x, layer["input_layernorm"]["weight"], eps)
        qh = q.rope(qkv[0].reshape(B, 1, H, D).transpose(0, 2, 1, 3), config.rope_theta, offset)
        kh = q.rope(qkv[1].reshape(B, 1, K, D).transpose(0, 2, 1, 3), config.rope_theta, offset)
        vh = qkv[2].reshape(B, 1, K, D).transpose(0, 2, 1, 3)
        h = x + qh.transpose(0, 2, 1, 3).reshape(B, 1, H * D)  # the attention output's transpose and residual
        n2 = q.rms_norm(h, layer["post_attention_layernorm"]["weight"], eps)
        out += [n1, kh, vh, n2, h + x, q.silu(gate) * up]  # h + x: the MLP's residual's shape
    return out + [q.rms_norm(x, params["model"]["norm"]["weight"], eps)]


def lm_head(params, h):
    return [q.output_logits(params, h)]


def sampler(logits, key):
    """The engine's greedy draw (engine.draw): the sampler, the drawn token's log-probability."""
    logits = logits.astype(mx.float32)
    token = q.compiled_sample(logits, q.Sampling(temp=0.0), key)
    return [token, mx.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - q.logsumexp(logits)[:, 0]]


def argmax_only(logits, key):
    """The greedy token without its log-probability (no log-softmax over the vocabulary)."""
    return [q.compiled_sample(logits, q.Sampling(temp=0.0), key)]


def step_and_sampler(params, config, tokens, cache, key, kernels="reference"):
    logits, cache = q.compiled_decode_step(params, config, tokens, cache, kernels)
    return [*sampler(logits[:, -1], key), cache]


def adapter_products(params) -> Callable[[], None]:
    """The step's products (each layer's q, k, v, o, gate, up, down, then the lm_head) straight on the BLAS
    adapter's cblas_sgemm through ctypes, one row each, on MLX's own weight buffers: our kernel and its threads
    without MLX (and with ctypes' calls, about a microsecond each)."""
    import numpy as np

    sgemm = q.blas.load().library.cblas_sgemm
    sgemm.restype = None
    sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                           ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    names = [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        ("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]
    ws = [np.asarray(layer[g][n]["weight"]) for layer in params["model"]["layers"] for g, n in names]
    ws.append(np.asarray((params["lm_head"] if "lm_head" in params else params["model"]["embed_tokens"])["weight"]))
    calls = []
    for w in ws:  # C [1, N] = A [1, K] @ W [N, K].T, as MLX calls it for x @ w.T
        a, c = np.ones(w.shape[1], np.float32), np.zeros(w.shape[0], np.float32)
        calls.append((101, 111, 112, 1, w.shape[0], w.shape[1], 1.0, a.ctypes.data, w.shape[1], w.ctypes.data,
                      w.shape[1], 0.0, c.ctypes.data, w.shape[0], a, c))  # a, c kept alive with the call

    def run():
        for call in calls:
            sgemm(*call[:14])
    return run


# ---- the alternatives: the same products, fused ----------------------------------------------


def fused_qkv(params, x):
    """One [q; k; v] product a layer (weights concatenated once, outside the timing), o as it is."""
    return [q.linear(x, w, b) for w, b, o in params["fused_qkv"]] + [q.linear(x, o) for _, _, o in params["fused_qkv"]]


def fused_gate_up(params, x, h):
    """One [gate; up] product a layer, down as it is."""
    return [q.linear(x, w) for w, _ in params["fused_gate_up"]] + [q.linear(h, d) for _, d in params["fused_gate_up"]]


def fused_weights(params) -> dict:
    layers = params["model"]["layers"]
    qkv = [(mx.concatenate([a[n]["weight"] for n in ("q_proj", "k_proj", "v_proj")]),
            mx.concatenate([a[n]["bias"] for n in ("q_proj", "k_proj", "v_proj")]), a["o_proj"]["weight"])
           for a in (layer["self_attn"] for layer in layers)]
    gate_up = [(mx.concatenate([m["gate_proj"]["weight"], m["up_proj"]["weight"]]), m["down_proj"]["weight"])
               for m in (layer["mlp"] for layer in layers)]
    mx.eval(qkv, gate_up)
    return {"fused_qkv": qkv, "fused_gate_up": gate_up}


# ---- timing -----------------------------------------------------------------------------------


def graph(f) -> Callable[..., Callable[[], object]]:
    """A part MLX computes: f's lazy graph is built before the clock starts, then evaluated."""
    def prepare(*inputs):
        out = f(*inputs)
        return lambda: mx.eval(out)
    return prepare


def timed(part: Part) -> float:
    """Seconds one part takes, set up (an MLX graph built) before the clock starts."""
    compute = part.prepare(*part.inputs)
    tic = time.perf_counter()
    compute()
    return time.perf_counter() - tic


def time_parts(parts: list[Part], reps: int) -> list[Timing]:
    """Each part reps times, alternated part by part (a warm-up round first): medians and spreads in ms."""
    for part in parts:
        timed(part)
    seconds = {part.name: [] for part in parts}
    for _ in range(reps):
        for part in parts:
            seconds[part.name].append(timed(part))
    return [Timing(p.name, 1e3 * statistics.median(seconds[p.name]), bench.spread(seconds[p.name]), p.weight_bytes)
            for p in parts]


def engine_ms_per_token(params, config, context: int, tokens: int, reps: int) -> list[float]:
    """The engine's decode, as bench times it: ms per token after a prompt of `context` tokens, reps runs."""
    run = bench.run_ours(params, config, "reference")
    prompt = mx.random.randint(0, config.vocab_size, (context,), key=mx.random.key(3)).tolist()
    bench.timed(run(prompt, 8))
    out = []
    for _ in range(reps):
        _, rest, n = bench.timed(run(prompt, tokens))
        out.append(1e3 * rest / (n - 1))
    return out


def step_inputs(params, config, context: int) -> dict:
    """One step's inputs at `context` cached tokens: random activations of the right shapes, a filled cache."""
    E, F, H, K, D = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                     config.num_key_value_heads, config.head_dim)
    r = mx.random.normal
    cache = q.reserve(q.new_cache(config, 1), context + 1)
    cache = {"layers": [(r(k.shape, key=mx.random.key(i)), r(k.shape, key=mx.random.key(100 + i)))
                        for i, (k, _) in enumerate(cache["layers"])],
             "offset": mx.array([context], mx.int32)}
    inputs = {"x": r((1, 1, E)), "h": r((1, 1, F)), "tokens": mx.array([[42]]), "cache": cache,
              "queries": [r((1, H, 1, D), key=mx.random.key(200 + i)) for i in range(config.num_hidden_layers)],
              "keys": r((1, K, 1, D)), "values": r((1, K, 1, D)),
              "qkv": (r((1, 1, H * D)), r((1, 1, K * D)), r((1, 1, K * D))), "gate": r((1, 1, F)), "up": r((1, 1, F)),
              "logits": r((1, config.vocab_size)), "key": q.sampling_key(0, context)}
    mx.eval(inputs)
    return inputs


def parts_of(params, config, i: dict) -> list[Part]:
    head = params["lm_head"] if "lm_head" in params else params["model"]["embed_tokens"]
    norms = [layer[n]["weight"] for layer in params["model"]["layers"]
             for n in ("input_layernorm", "post_attention_layernorm")] + [params["model"]["norm"]["weight"]]
    return [
        Part("attention projections (q, k, v, o)", graph(mx.compile(attention_projections)), (params, i["x"]),
             layer_bytes(params, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))),
        Part("MLP projections (gate, up, down)", graph(mx.compile(mlp_projections)), (params, i["x"], i["h"]),
             layer_bytes(params, "mlp", ("gate_proj", "up_proj", "down_proj"))),
        Part("attention over the cache", graph(mx.compile(lambda p, *a: attention(p, config, *a))),
             (params, i["queries"], i["keys"], i["values"], i["cache"]), nbytes(*(a for kv in i["cache"]["layers"]
                                                                                 for a in kv))),
        Part("norms, RoPE, element-wise", graph(mx.compile(lambda p, *a: elementwise(p, config, *a))),
             (params, i["tokens"], i["x"], i["qkv"], i["gate"], i["up"], i["cache"]["offset"]), nbytes(*norms)),
        Part("lm_head", graph(mx.compile(lm_head)), (params, i["x"]), head["weight"].nbytes),
        Part("sampler (greedy draw)", graph(sampler), (i["logits"], i["key"]), 0),
    ]


def whole_of(params, config, i: dict) -> Part:
    cache = {"layers": i["cache"]["layers"], "offset": i["cache"]["offset"]}
    return Part("whole step + sampler", graph(lambda *a: step_and_sampler(params, config, *a)),
                (i["tokens"], cache, i["key"]), bench.bytes_per_token(params, config))


def alternatives_of(params, config, i: dict, parts: list[Part]) -> list[Part]:
    fused = fused_weights(params)
    cache = {"layers": i["cache"]["layers"], "offset": i["cache"]["offset"]}
    products = parts[0].weight_bytes + parts[1].weight_bytes + parts[4].weight_bytes
    return [Part("the products alone (adapter, no MLX)", lambda run: run, (adapter_products(params),), products),
            Part("fused q|k|v, then o", graph(mx.compile(fused_qkv)), (fused, i["x"]), parts[0].weight_bytes),
            Part("fused gate|up, then down", graph(mx.compile(fused_gate_up)), (fused, i["x"], i["h"]),
                 parts[1].weight_bytes),
            Part("attention over the cache, mx.fast sdpa",
                 graph(mx.compile(lambda p, *a: attention(p, config, *a, attend=q.fast_attention))),
                 parts[2].inputs, parts[2].weight_bytes),
            Part("sampler, argmax only", graph(argmax_only), parts[5].inputs, 0),
            Part("whole step + sampler, mx.fast kernels",
                 graph(lambda *a: step_and_sampler(params, config, *a, "fast")), (i["tokens"], cache, i["key"]),
                 bench.bytes_per_token(params, config))]


HEADER = f"{'part':<38}{'ms':>8}{'spread':>8}{'MB read':>9}{'GB/s':>7}{'% best':>7}{'at llama':>9}{'gap ms':>8}"


def part_line(t: Timing, gbs: float, llama_gbs: float) -> str:
    """A part's time, its weights' read rate (of the best reader's), its time at llama.cpp's rate and the gap."""
    rate = t.weight_bytes / t.ms / 1e6
    at_llama = t.weight_bytes / llama_gbs / 1e6
    return (f"{t.name:<38}{t.ms:8.2f}{100 * t.spread:7.0f}%{t.weight_bytes / 1e6:9.1f}{rate:7.1f}"
            f"{100 * rate / gbs:6.0f}%{at_llama:9.2f}{t.ms - at_llama:8.2f}")


def summary_lines(parts: list[Timing], whole: Timing, engine: list[float], llama_gbs: float) -> list[str]:
    """The parts' sum, and what the whole step and the engine's token take beyond it."""
    parts_ms, engine_ms = sum(t.ms for t in parts), statistics.median(engine)
    at_llama = whole.weight_bytes / llama_gbs / 1e6
    return [f"{'sum of the parts':<38}{parts_ms:8.2f}",
            f"{'  dispatch (whole step - parts)':<38}{whole.ms - parts_ms:8.2f}",
            f"{'engine, per token':<38}{engine_ms:8.2f}{100 * bench.spread(engine):7.0f}%{'':<23}{at_llama:9.2f}"
            f"{engine_ms - at_llama:8.2f}",
            f"{'  Python (engine - whole step)':<38}{engine_ms - whole.ms:8.2f}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=64, help="Tokens a run of the engine decodes.")
    parser.add_argument("--llama-gbs", type=float, default=28.0,
                        help="llama.cpp's F32 decode in GB/s of weights (its bytes per token x tok/s).")
    parser.add_argument("--json", default=None)
    a = parser.parse_args()
    params, config = weights.load_params(weights.resolve(a.model), mx.float32)
    inputs = step_inputs(params, config, a.context)
    bandwidth = bench.read_bandwidth()
    parts = parts_of(params, config, inputs)
    alternatives = alternatives_of(params, config, inputs, parts)
    timings = time_parts([*parts, whole_of(params, config, inputs), *alternatives], a.reps)
    engine = engine_ms_per_token(params, config, a.context, a.tokens, max(3, a.reps // 10))
    after = bench.read_bandwidth()
    gbs = max(bandwidth.gbs, after.gbs)
    n = len(parts)
    parts_t, whole, others = timings[:n], timings[n], timings[n + 1 :]
    lines = [HEADER, *(part_line(t, gbs, a.llama_gbs) for t in [*parts_t, whole])]
    lines += summary_lines(parts_t, whole, engine, a.llama_gbs)
    lines += ["alternatives (same shapes):", *(part_line(t, gbs, a.llama_gbs) for t in others)]
    readers = ", ".join(f"{k} {v:.1f}" for k, v in bandwidth.readers.items())
    lines.append(f"best read bandwidth {gbs:.1f} GB/s (before: {readers})"
                 f"{'; the machine was busy' if bandwidth.busy or after.busy else ''}; context {a.context}, "
                 f"{a.reps} repetitions, MLX {mx.__version__}, BLAS {q.blas.describe()}")
    print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"context": a.context, "reps": a.reps, "read_bandwidth_gbs": gbs, "llama_gbs": a.llama_gbs,
                       "machine_busy": bandwidth.busy or after.busy, "bandwidth_probes": [bandwidth._asdict(),
                                                                                          after._asdict()],
                       "parts": [t._asdict() for t in timings], "engine_ms_per_token": engine,
                       "mlx": mx.__version__, "blas": q.blas.describe()}, f, indent=2)


if __name__ == "__main__":
    main()
