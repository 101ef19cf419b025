"""Time the parts of one layer's attention over a long cache (MLX's ops), and the whole in our one kernel: the tiny
test model's shape, or the packaged one's.

    python tools/attention_parts.py [--slots 30208] [--queries 1] [--packaged-shape] [--eager]

Each figure: the mean of 100 compiled calls after 5 warm-up calls, in ms (--eager: not compiled, as a prefill
chunk runs). 2 key heads of 2 query heads, head
dimension 32 (--packaged-shape: of 7, dimension 64); --queries 1 is a decode step, more a prefill chunk.
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import functools
import time

import mlx.core as mx

from qwen2s import cpu_attention


def timed(fn, *args, n=100, eager=False) -> float:
    f = fn if eager else mx.compile(fn)
    for _ in range(5):
        mx.eval(f(*args))
    start = time.perf_counter()
    for _ in range(n):
        mx.eval(f(*args))
    return (time.perf_counter() - start) / n * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=30208)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--packaged-shape", action="store_true")
    parser.add_argument("--eager", action="store_true", help="Time the calls uncompiled, as a prefill runs them.")
    args = parser.parse_args()
    measure = functools.partial(timed, eager=args.eager)
    S, L = args.slots, args.queries
    B, K, G, D = (1, 2, 7, 64) if args.packaged_shape else (1, 2, 2, 32)
    x, k, v = mx.random.normal((B, K, G * L, D)), mx.random.normal((B, K, S, D)), mx.random.normal((B, K, S, D))
    s = mx.random.normal((B, K, G, L, S))
    p = mx.softmax(s, axis=-1).reshape(B, K, G * L, S)
    mask = q.causal_mask(L, S, mx.array([S - 100 - L], mx.int32))
    mx.eval(x, k, v, s, p, mask)
    print(f"scores {measure(lambda a, b: a @ b.swapaxes(-1, -2), x, k):.3f} ms")
    print(f"values {measure(lambda a, b: a @ b, p, v):.3f} ms")
    print(f"softmax {measure(q.softmax, s):.3f} ms")
    attention = lambda a, b, c, m: q.scaled_dot_product_attention(a.reshape(B, K * G, L, D), b, c, mask=m)  # noqa: E731
    print(f"whole attention {measure(attention, x, k, v, mask):.3f} ms")
    start = mx.array([S - 100 - L], mx.int32)  # the mask's positions
    in_one = lambda a, b, c, s: cpu_attention.attention(a.reshape(B, K * G, L, D), b, c, s, D**-0.5)  # noqa: E731
    print(f"attention in one kernel (cpu_attention) {measure(in_one, x, k, v, start):.3f} ms")


if __name__ == "__main__":
    main()
