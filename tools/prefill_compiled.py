"""What a short prompt's prefill costs as it runs now (op by op) and compiled, padded to a length bucket.

    python tools/prefill_compiled.py [--model M] [--dtype bfloat16] [--kernels fast] [--tokens 39] [--bucket 64]

One row, one chunk, an empty cache (an admission in the server). Alternated, --reps times each: the eager prefill
(`q.prefill`, as the engine admits a prompt), and the same forward pass compiled (`mx.compile`) for a piece padded to
--bucket tokens, the last real token's logits taken by an index array (one trace per bucket). Per case, medians:
the time to build the graph (the call) and to the result (call and eval), and for scale, one compiled decode step
of the engine's fixed shape. Last: how far the two logits are apart (padding changes the products' shapes).
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import statistics
import time

import mlx.core as mx

from qwen2s import weights


def last_logits(params, config, tokens, cache, kernels, filled, last):
    """Padded piece [1, L] -> (logits of its token `last` [1, V], cache)."""
    h, cache = q.hidden_states(params, config, tokens, cache, kernels, filled)
    return q.output_logits(params, mx.take(h, last, axis=1)[:, 0]), cache


compiled_last_logits = mx.compile(last_logits)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--dtype")
    ap.add_argument("--kernels", default="fast" if mx.default_device() == mx.gpu else "reference")
    ap.add_argument("--tokens", type=int, default=39)
    ap.add_argument("--bucket", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    params, config, _ = weights.load(a.model, a.dtype)
    dtype = params["model"]["norm"]["weight"].dtype
    ids = [(7 * i + 11) % 1000 + 100 for i in range(a.tokens)]
    piece = mx.array(ids)[None]
    padded = mx.array(ids + [ids[-1]] * (a.bucket - a.tokens))[None]
    last = mx.array([a.tokens - 1])
    times = {"eager": ([], []), "compiled": ([], []), "decode step": ([], [])}

    def eager():
        cache = q.new_cache(config, 1, dtype)
        mx.eval(cache)
        t0 = time.perf_counter()
        logits, cache = q.prefill(params, config, piece, cache, a.kernels)
        t1 = time.perf_counter()
        mx.eval(logits, cache)
        return logits, t1 - t0, time.perf_counter() - t0

    def compiled():
        cache = q.reserve(q.new_cache(config, 1, dtype), a.bucket)
        mx.eval(cache)
        t0 = time.perf_counter()
        logits, cache = compiled_last_logits(params, config, padded, cache, a.kernels, a.bucket, last)
        cache = {"layers": cache["layers"], "offset": mx.array([a.tokens], mx.int32)}
        t1 = time.perf_counter()
        mx.eval(logits, cache)
        return logits, t1 - t0, time.perf_counter() - t0

    rows = q.step_rows()
    batch = q.reserve(q.new_cache(config, 32, dtype), 256)
    batch = {"layers": batch["layers"], "offset": mx.array([40 + i for i in range(32)], mx.int32)}
    mx.eval(batch)

    def step():
        t0 = time.perf_counter()
        logits, _ = q.compiled_decode_step(params, config, mx.full((32, 1), 5, mx.int32), batch, a.kernels, rows)
        t1 = time.perf_counter()
        mx.eval(logits)
        return logits, t1 - t0, time.perf_counter() - t0

    cases = {"eager": eager, "compiled": compiled, "decode step": step}
    outs = {}
    for rep in range(a.reps + 2):
        for name, f in cases.items():
            out, build, total = f()
            outs[name] = out
            if rep >= 2:  # the first two: traces, kernel builds
                times[name][0].append(build)
                times[name][1].append(total)
    print(f"device {mx.default_device()}, {dtype}, kernels {a.kernels}, {a.tokens} tokens (bucket {a.bucket}), "
          f"decode step: 32 rows at shape {rows}; medians of {a.reps}, ms")
    for name, (build, total) in times.items():
        print(f"  {name:12s} build {1e3 * statistics.median(build):7.2f}   result {1e3 * statistics.median(total):7.2f}"
              f"   (min {1e3 * min(total):.2f}, max {1e3 * max(total):.2f})")
    e, c = outs["eager"].astype(mx.float32), outs["compiled"].astype(mx.float32)
    print(f"  logits eager vs compiled: max |diff| {mx.abs(e - c).max().item():.4g}, "
          f"same argmax {bool(mx.argmax(e).item() == mx.argmax(c).item())}")


if __name__ == "__main__":
    main()
