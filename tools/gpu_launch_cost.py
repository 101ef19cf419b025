"""What launching our products kernel costs on a CUDA GPU: `mx.fast.precompiled_cuda_kernel` (gpu_products.py now)
against `mx.fast.cuda_kernel` (the same kernel as launched before commit ea089e6) and MLX's own product.

    python tools/gpu_launch_cost.py    (on a CUDA GPU, in a git checkout: the old module is read from git)

Per product: a compiled chain of 200 independent one-row products of one weight, evaluated at once (the median of 7
evaluations, divided by 200). Per step: the 0.5B shape's compiled decode step (random weights, `fast` kernels, the
engine's fixed shape of 64 rows) for 1 and 32 rows with each launch, three rounds alternated, medians of 40.
Measured 2026-12-02 on the H200 (benchmarks/README.md): 17.5-19 us a product precompiled against 6.8-9 us, a one-row
step 7.4-9.8 ms against 4.8-5.2 ms.
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import statistics
import subprocess
import time
import types
from pathlib import Path

import mlx.core as mx

from qwen2s import bench, gpu_products

BEFORE = "ea089e6^"  # the last commit whose kernel went through mx.fast.cuda_kernel


def module_at(commit: str) -> types.ModuleType:
    """gpu_products.py as it was at commit, as a module."""
    source = subprocess.run(["git", "show", f"{commit}:gpu_products.py"], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent).stdout
    module = types.ModuleType("gpu_products_before")
    exec(compile(source, f"gpu_products.py@{commit}", "exec"), module.__dict__)
    return module


def per_product(product, x, w, n=200) -> float:
    """Microseconds a product, n of them in one compiled graph."""
    chain = mx.compile(lambda w, *xs: [product(xi, w) for xi in xs])
    xs = [x + i for i in range(n)]
    mx.eval(xs)
    mx.eval(chain(w, *xs))
    times = []
    for _ in range(7):
        tic = time.perf_counter()
        mx.eval(chain(w, *xs))
        times.append(time.perf_counter() - tic)
    return 1e6 * statistics.median(times) / n


def step_ms(product, params, config, rows: int, reps=40) -> float:
    """Milliseconds of one compiled fixed-shape decode step of `rows` rows, each evaluated alone."""
    gpu_products.product = product  # q.rows_alone looks it up at each trace
    step = mx.compile(q.decode_step)
    cache = q.reserve(q.new_cache(config, rows, mx.bfloat16), 256)
    cache = {"layers": cache["layers"], "offset": mx.array([40] * rows, mx.int32)}
    tokens = mx.full((rows, 1), 5, mx.int32)
    mx.eval(cache)
    for _ in range(5):
        mx.eval(step(params, config, tokens, cache, "fast", 64))
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(step(params, config, tokens, cache, "fast", 64))
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times)


def main():
    if not gpu_products.cuda():
        raise SystemExit("gpu_launch_cost: needs a CUDA GPU")
    now, before = gpu_products.product, module_at(BEFORE).product
    launches = {"precompiled": now, "cuda_kernel": before, "MLX": lambda x, w: x @ w.T}
    for name, (N, K) in {"q_proj": (896, 896), "down_proj": (896, 4864), "lm_head": (151936, 896)}.items():
        w = (mx.random.normal((N, K)) * 0.02).astype(mx.bfloat16)
        x = mx.random.normal((1, K)).astype(mx.bfloat16)
        mx.eval(w, x)
        n = 50 if N > 100_000 else 200
        print(f"{name} {N}x{K}, one row: " + ", ".join(
            f"{launch} {per_product(p, x, w, n):.1f} us" for launch, p in launches.items()))
    params, config, _, _ = bench.bench_weights(None, "qwen2-0.5b", "bfloat16")
    for round_ in range(3):
        for rows in (1, 32):
            print(f"round {round_ + 1}, a {rows}-row step: precompiled {step_ms(now, params, config, rows):.2f} ms, "
                  f"cuda_kernel {step_ms(before, params, config, rows):.2f} ms")
    gpu_products.product = now


if __name__ == "__main__":
    main()
