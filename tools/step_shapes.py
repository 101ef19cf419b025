"""Does a row's result depend on the step's shape? One row's logits, bit for bit, in steps of other shapes.

    python tools/step_shapes.py [--shape qwen2-0.5b] [--dtype bfloat16] [--context 300] [--json out.json]

Random weights of a real shape (the question is the kernels', not the weights'). Row 0 holds a
context of random tokens; its next logits are computed alone, among 2, 3 and 8 rows, in caches of
other capacities, and position by position against a verifier step over k + 1 tokens: each as the
step comes (rows None) and at a fixed shape (products at 64 rows, `qwen2_scratch.fixed_shape_step`).
Prints, per check, whether the logits are the same bits and the largest difference; then the time
of a one-row decode step, as it comes and at the fixed shape.
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import json
import statistics
import time

import mlx.core as mx

from qwen2s import bench


def context_cache(params, config, tokens: list[int], capacity: int, kernels) -> dict:
    """A one-row cache holding `tokens`, grown to `capacity` slots."""
    cache = q.new_cache(config, 1, params["model"]["norm"]["weight"].dtype)
    _, cache = q.prefill(params, config, mx.array(tokens)[None], cache, kernels, chunk=256)
    return q.reserve(cache, capacity, block_size=1)


def batch_of(caches: list[dict]) -> dict:
    """Row caches of one capacity -> one batch cache."""
    return {"layers": [tuple(mx.concatenate([c["layers"][i][j] for c in caches]) for j in (0, 1))
                       for i in range(len(caches[0]["layers"]))],
            "offset": mx.concatenate([c["offset"] for c in caches])}


def differ(a: mx.array, b: mx.array) -> dict:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return {"same_bits": bool(mx.array_equal(a, b).item()), "max_diff": mx.abs(a - b).max().item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(bench.SHAPES), default="qwen2-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kernels", default="fast" if mx.default_device() == mx.gpu else "reference")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--json", default=None)
    a = parser.parse_args()
    params, config, _, _ = bench.bench_weights(None, a.shape, a.dtype)
    kernels, n = a.kernels, a.context
    rng = mx.random.randint(0, config.vocab_size, (8, n + 16), key=mx.random.key(1)).tolist()
    base = 512 * (-(-(n + 16) // 512))  # a capacity that holds a verifier step
    step = q.compiled_decode_step
    report = {"device": str(mx.default_device()), "dtype": a.dtype, "kernels": kernels, "mlx": mx.__version__,
              "shape": a.shape, "context": n, "checks": []}

    def check(name, ours, theirs, rows):
        line = {"check": name, "rows": rows, **differ(ours, theirs)}
        report["checks"].append(line)
        print(f"{name:<44} rows {rows!s:>4}: {'same bits' if line['same_bits'] else 'DIFFER'}"
              f" (max diff {line['max_diff']:.3g})")

    row0 = [context_cache(params, config, rng[0][:n], cap, kernels) for cap in (base, base + 256, 2 * base)]
    others = [context_cache(params, config, rng[i][: n - 7 * i], base, kernels) for i in range(1, 8)]
    token = mx.array([[rng[0][n]]])
    for rows in (None, a.rows):
        alone, _ = step(params, config, token, row0[0], kernels, rows)
        for size in (2, 3, 8):
            tokens = mx.concatenate([token, mx.array([[rng[i][n]] for i in range(1, size)])])
            batch = batch_of([row0[0], *others[: size - 1]])
            together, _ = step(params, config, tokens, batch, kernels, rows)
            check(f"alone vs in a batch of {size}", alone[0], together[0], rows)
        for cache in row0[1:]:
            other, _ = step(params, config, token, cache, kernels, rows)
            check(f"capacity {base} vs {q.cache_capacity(cache)}", alone[0], other[0], rows)
        for k in (1, 4, 8):  # a verifier step over k + 1 tokens against k + 1 decode steps
            proposal = mx.array([rng[0][n : n + k + 1]])
            verified, _ = step(params, config, proposal, row0[0], kernels, rows)
            cache, plain = row0[0], []
            for i in range(k + 1):
                logits, cache = step(params, config, proposal[:, i : i + 1], cache, kernels, rows)
                plain.append(logits[:, 0])
            check(f"verifier k={k} vs decode steps", verified[0], mx.concatenate(plain), rows)
    times = {None: [], a.rows: []}
    caches = {rows: row0[0] for rows in times}
    mx.eval(caches)
    for _ in range(7):  # alternated, each the median of 20 evaluated steps
        for rows in times:
            t = []
            for _ in range(20):
                tic = time.perf_counter()
                mx.eval(step(params, config, token, caches[rows], kernels, rows))
                t.append(time.perf_counter() - tic)
            times[rows].append(statistics.median(t))
    report["decode_step_ms"] = {str(r): [x * 1e3 for x in t] for r, t in times.items()}
    for rows, t in times.items():
        print(f"one-row decode step, rows {rows!s:>4}: median {statistics.median(t) * 1e3:.2f} ms "
              f"(min {min(t) * 1e3:.2f}, max {max(t) * 1e3:.2f}, 7 trials)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
