"""The GPU's row-alone products (gpu_products.py) against MLX's: bits, and time per product and per step.

    python tools/gpu_rows.py    (on a CUDA GPU)

For each product of the Qwen2 0.5B and 7B shapes (random bfloat16 weights): whether each row of the kernel's
product is the same bits for 1 to 64 rows, its largest difference from a float32 product, and the median time
(50 calls, each evaluated) of the kernel, MLX's gemv (one row) and cuBLAS (8 and 64 rows). Then a compiled
decode step of the 0.5B shape for 1, 8, 32 and 64 rows: products by the kernel against products padded to 64
rows for cuBLAS (what a fixed-shape step did before, `rows_of_products`).
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import statistics
import time

import mlx.core as mx

from qwen2s import bench, gpu_products

SHAPES = {"q_proj": (896, 896), "k_proj": (128, 896), "gate_proj": (4864, 896), "down_proj": (896, 4864),
          "lm_head": (151936, 896), "7b down_proj": (3584, 18944), "7b gate_proj": (18944, 3584)}


def median_us(f, *args, n=50) -> float:
    """Median microseconds of f(*args), evaluated, over n calls after five."""
    for _ in range(5):
        mx.eval(f(*args))
    times = []
    for _ in range(n):
        tic = time.perf_counter()
        mx.eval(f(*args))
        times.append(time.perf_counter() - tic)
    return statistics.median(times) * 1e6


def products():
    for name, (N, K) in SHAPES.items():
        w = (mx.random.normal((N, K)) * 0.02).astype(mx.bfloat16)
        x = mx.random.normal((64, K)).astype(mx.bfloat16)
        full = gpu_products.product(x, w)
        same = all(mx.array_equal(gpu_products.product(x[:r], w), full[:r]).item() for r in (1, 2, 3, 8, 9, 33))
        error = mx.abs(full.astype(mx.float32) - x.astype(mx.float32) @ w.astype(mx.float32).T).max().item()
        us = {}
        for rows in (1, 8, 64):
            us[f"kernel {rows}"] = median_us(gpu_products.product, x[:rows], w)
            us[f"{'gemv' if rows == 1 else 'cuBLAS'} {rows}"] = median_us(mx.matmul, x[:rows], w.T)
        print(f"{name:<13} rows same bits: {same}, max diff from float32 {error:.3g}; us: "
              + ", ".join(f"{k} {v:.1f}" for k, v in us.items()), flush=True)


def steps():
    params, config, _, _ = bench.bench_weights(None, "qwen2-0.5b", "bfloat16")
    one = q.reserve(q.new_cache(config, 1, mx.bfloat16), 512)
    _, one = q.prefill(params, config, mx.array([list(range(1, 301))]), one, "fast")
    kernel_rows = q.rows_alone
    for B in (1, 8, 32, 64):
        cache = q.take_rows(one, mx.zeros((B,), mx.int32))
        mx.eval(cache)
        tokens = mx.ones((B, 1), mx.int32)
        times = {}
        for name, products_of in (("padded to 64 rows", q.rows_of_products), ("kernel", kernel_rows)):
            q.rows_alone = products_of
            step = mx.compile(q.decode_step)  # traced anew with this product
            times[name] = median_us(step, params, config, tokens, cache, "fast", 64, n=20) / 1e3
        q.rows_alone = kernel_rows
        print(f"decode step of {B:>2} rows: " + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    if not gpu_products.cuda():
        raise SystemExit("tools/gpu_rows.py measures a CUDA GPU's kernels: this machine has none")
    products()
    steps()
