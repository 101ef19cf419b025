"""A step's greedy draws compiled (`engine.compiled_greedy_draws`) against the same function run op by op, alternated
in one process, on random logits with each row's repetition penalty.

    python tools/greedy_draws_ab.py [--vocab 300] [--rows 1]

Checks that both give the same tokens and log-probabilities, then prints the median milliseconds of each (5 rounds
of 200 draws after one uncounted).
"""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import argparse
import statistics
import time

import mlx.core as mx

from qwen2s import engine


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=300)
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    logits = mx.random.normal((args.rows, args.vocab), key=mx.random.key(0)) * 3
    windows = mx.random.randint(0, args.vocab, (args.rows, 21), key=mx.random.key(1)).astype(mx.int32)
    penalties = mx.full((args.rows, 1), 1.05)
    variants = {"eager": engine.greedy_draws, "compiled": engine.compiled_greedy_draws}
    drawn = [variants[name](logits, windows, penalties) for name in variants]
    assert all(mx.array_equal(a, b) for a, b in zip(*drawn, strict=True)), "not the same draws"
    times = {name: [] for name in variants}
    for r in range(6):
        for name, draws in variants.items():
            tic = time.perf_counter()
            for _ in range(200):
                mx.eval(draws(logits, windows, penalties))
            if r:
                times[name].append((time.perf_counter() - tic) / 200 * 1e3)
    print(f"{args.rows} rows of {args.vocab} logits: " +
          ", ".join(f"{name} {statistics.median(t):.3f} ms" for name, t in times.items()) + "; the same draws")


if __name__ == "__main__":
    main()
