"""Read bandwidth of one-row products through our kernel: x [1, K] @ W.T for 24 layers' gate (4864 x 896) and
down (896 x 4864) weights of the packaged model's shape, random, float32 (836 MB: far past any cache).

    python tools/one_row_products.py NAME

Prints NAME, then the median GB/s of 7 rounds of 5 passes (and their min and max). Alternate checkouts run in
fresh processes (PYTHONPATH=...) to compare kernels.
"""

import sys
import time

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import mlx.core as mx


def main():
    weights = [mx.random.normal((4864, 896)) for _ in range(24)] + [mx.random.normal((896, 4864)) for _ in range(24)]
    rows = [mx.random.normal((1, w.shape[1])) for w in weights]
    mx.eval(weights, rows)
    nbytes = sum(w.nbytes for w in weights)

    def products():
        return [x @ w.T for x, w in zip(rows, weights, strict=True)]

    for _ in range(3):
        mx.eval(products())
    rates = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(5):
            mx.eval(products())
        rates.append(nbytes / ((time.perf_counter() - start) / 5) / 1e9)
    rates.sort()
    name = sys.argv[1] if len(sys.argv) > 1 else "ours"
    print(f"{name} median {rates[3]:.1f} GB/s  (min {rates[0]:.1f}, max {rates[-1]:.1f})")


if __name__ == "__main__":
    main()
