"""What launching our products kernel costs on a CUDA GPU: gpu_products.py now against earlier versions of it and
MLX's own product.

    python tools/gpu_launch_cost.py [FILE ...]    (on a CUDA GPU; FILEs: earlier gpu_products.py to compare, by
                                                   default read from git: 2fe0ef4's and ea089e6^'s)

2fe0ef4's: one cubin of three kernels through `mx.fast.precompiled_cuda_kernel`; ea089e6^'s: the kernel compiled by
MLX in each process through `mx.fast.cuda_kernel`. Per product: a compiled chain of 200 independent one-row products
of one weight, evaluated at once (the median of 7 evaluations, divided by 200). Per step: the 0.5B shape's compiled
decode step (random weights, `fast` kernels, the engine's fixed shape of 64 rows) for 1 and 32 rows with each
version, three rounds alternated, medians of 40. Results: benchmarks/README.md, "Our kernel's launch".
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import mlx.core as mx

from qwen2s import bench, gpu_products

BEFORE = ("2fe0ef4", "ea089e6^")  # one cubin of three kernels; the last kernel through mx.fast.cuda_kernel


def module_from(name: str, source: str) -> types.ModuleType:
    """An earlier gpu_products.py's source, as a module."""
    module = types.ModuleType(f"gpu_products_{name}")
    exec(compile(source, name, "exec"), module.__dict__)
    return module


def at_commit(commit: str) -> str:
    return subprocess.run(["git", "show", f"{commit}:gpu_products.py"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent).stdout


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
    now = gpu_products.product
    files = sys.argv[1:]
    earlier = ({Path(f).name: Path(f).read_text() for f in files} if files
               else {commit: at_commit(commit) for commit in BEFORE})
    versions = {"now": now} | {name: module_from(name, source).product for name, source in earlier.items()}
    launches = versions | {"MLX": lambda x, w: x @ w.T}
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
            print(f"round {round_ + 1}, a {rows}-row step: " + ", ".join(
                f"{name} {step_ms(p, params, config, rows):.2f} ms" for name, p in versions.items()), flush=True)
    gpu_products.product = now


if __name__ == "__main__":
    main()
