"""What a decode step of a shape not seen before costs, against the same step again: the packaged model's compiled
step at [1, 1] (plain decoding) and [1, k + 1] (a verifier step), at one cache capacity and at the next block's.

    python tools/first_shapes.py [--model M] [--dtype D] [--num-draft 8]

For each call: the seconds of the call itself (a first call traces and compiles) and of its evaluation (where a
GPU loads or builds its kernels), the first time and the second; then the greedy draws of k + 1 positions.
Prints one JSON line.
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import json
import time

import mlx.core as mx

from qwen2s import cli, engine


def timed(step):
    """(seconds of the call, seconds of its evaluation)"""
    tic = time.perf_counter()
    out = step()
    called = time.perf_counter()
    mx.eval(out)
    return round((called - tic) * 1e3, 1), round((time.perf_counter() - called) * 1e3, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--num-draft", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=365, help="positions already in the cache")
    a = parser.parse_args()
    params, config, _ = cli.load_model(a.model, a.dtype)
    kernels, rows = cli.default_kernels(), q.step_rows()
    dtype = params["model"]["norm"]["weight"].dtype
    cache = q.new_cache(config, 1, dtype)
    out = {"device": str(mx.default_device()), "rows": rows}
    for capacity in (a.prompt + 1, a.prompt + 1 + q.CACHE_BLOCK):
        cache = q.reserve(cache, capacity)
        mx.eval(cache)
        at = {"layers": cache["layers"], "offset": mx.array([capacity - a.num_draft - 1], mx.int32)}
        for n in (1, a.num_draft + 1):
            tokens = mx.zeros((1, n), mx.uint32)
            width = None if rows is None else -(-n // rows) * rows

            def step(tokens=tokens, width=width, at=at):
                return q.compiled_decode_step(params, config, tokens, at, kernels, width)

            out[f"capacity {q.cache_capacity(cache)}, [1, {n}]"] = [timed(step), timed(step)]
    logits = mx.zeros((a.num_draft + 1, config.vocab_size), dtype)
    out[f"greedy draws [{a.num_draft + 1}, V]"] = [timed(lambda: engine.greedy_draws(logits)) for _ in range(2)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
