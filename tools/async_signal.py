"""When an array sent off with mx.async_eval can be read, with more work sent off after it on the same stream.

    python tools/async_signal.py

Two 2000 x 2000 products sent off ("a prefill"), then thirty that need them ("the next step"): how long the first
two's `.item()` takes against their time alone. On this project's CPU (MLX 0.32.4) the first two were readable
only after 1.1-1.6 s, where alone they take 0.19-0.27 s: a token sent off before a step is handed out after much
of that step (the engine's pipelined admission, tried and left on a branch: benchmarks/README.md).
"""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import time

import mlx.core as mx


def chain(x, a, n):
    for _ in range(n):
        x = (x @ a) * 1e-3
    return x


def main():
    a = mx.random.normal((2000, 2000))
    mx.eval(a)
    for _ in range(3):
        tic = time.perf_counter()
        chain(a, a, 2)[0, 0].item()
        alone = time.perf_counter() - tic
        tic = time.perf_counter()
        first = chain(a, a, 2)[0, 0]
        mx.async_eval(first)
        after = chain(a + first, a, 30)
        mx.async_eval(after)
        first.item()
        readable = time.perf_counter() - tic
        mx.eval(after)
        print(f"two products alone {alone * 1e3:.0f} ms; sent off before thirty more: readable after "
              f"{readable * 1e3:.0f} ms, all done after {(time.perf_counter() - tic) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
