"""One compiled decode step's kernels on a CUDA GPU, for Nsight Compute: what each costs the device.

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        python tools/step_kernels.py ROWS [--shape qwen2-0.5b] > kernels.csv
    python tools/step_kernels.py --summary kernels.csv

The shape's random weights in bfloat16, `fast` kernels, the engine's fixed-shape step (64 rows) for ROWS rows at
300, 307, ... cached tokens, and the greedy draw (an argmax): ten steps to warm up, thirty timed (the median
printed), then two between cudaProfilerStart and cudaProfilerStop, which ncu, started with --profile-from-start
off, times kernel by kernel (each alone: the sum is the device's work without overlap). --summary prints a CSV's
kernels grouped by name and grid, per step. Results: benchmarks/README.md, "The H200 at efaaae2".
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import collections
import csv
import ctypes
import glob
import statistics
import time

import mlx.core as mx

from qwen2s import bench, gpu_products

PROFILED_STEPS = 2


def cuda_runtime():
    """libcudart, for cudaProfilerStart/Stop; None where none loads."""
    names = ["libcudart.so", "libcudart.so.13", "libcudart.so.12", *glob.glob("/usr/local/cuda*/lib64/libcudart.so*")]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    return None


def profile(rows: int, shape: str) -> None:
    params, config, _, _ = bench.bench_weights(None, shape, "bfloat16")
    cache = q.reserve(q.new_cache(config, rows, mx.bfloat16), 512)
    cache = {"layers": cache["layers"], "offset": mx.array([300 + 7 * i for i in range(rows)], mx.int32)}
    tokens = mx.full((rows, 1), 5, mx.uint32)
    mx.eval(cache)

    def step():
        logits, _ = q.compiled_decode_step(params, config, tokens, cache, "fast", 64)
        return mx.argmax(logits[:, -1], axis=-1)

    for _ in range(10):
        mx.eval(step())
    seconds = []
    for _ in range(30):
        tic = time.perf_counter()
        mx.eval(step())
        seconds.append(time.perf_counter() - tic)
    print(f"{shape}, {rows} rows: a step waited for {1e3 * statistics.median(seconds):.3f} ms (median of 30)")
    runtime = cuda_runtime()
    if runtime is None:
        raise SystemExit("no CUDA runtime library found: nothing profiled")
    runtime.cudaProfilerStart()
    for _ in range(PROFILED_STEPS):
        mx.eval(step())
    mx.synchronize()
    runtime.cudaProfilerStop()


def summary(path: str) -> None:
    """Kernels of an ncu CSV grouped by name and grid: microseconds and launches per step, the largest first."""
    lines = list(csv.reader(open(path)))
    header = next(i for i, row in enumerate(lines) if row and row[0] == "ID")
    names = lines[header]
    kernel, grid, value = names.index("Kernel Name"), names.index("Grid Size"), names.index("Metric Value")
    groups = collections.defaultdict(lambda: [0, 0.0])
    for row in lines[header + 1 :]:
        if len(row) > value:
            group = groups[(row[kernel][:70], row[grid])]
            group[0] += 1
            group[1] += float(row[value].replace(",", "")) / 1e3
    total = sum(us for _, us in groups.values())
    print(f"{sum(n for n, _ in groups.values()) / PROFILED_STEPS:.0f} kernels, {total / PROFILED_STEPS:.1f} us a step")
    for (name, size), (n, us) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"{us / PROFILED_STEPS:10.1f} us {n / PROFILED_STEPS:5.0f}x  {name} {size}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", type=int, default=1)
    parser.add_argument("--shape", default="qwen2-0.5b", choices=list(bench.SHAPES))
    parser.add_argument("--summary", metavar="CSV", default=None)
    parser.add_argument("--plans", metavar="JSON", default=None,
                        help="each product's plan from `tools/product_plans.py --best`, not gpu_products.plan_for's")
    a = parser.parse_args()
    if a.plans:
        from product_plans import plans_from  # tools/, this script's folder

        gpu_products.plan_for = plans_from(a.plans)
    if a.summary:
        summary(a.summary)
    else:
        profile(a.rows, a.shape)


if __name__ == "__main__":
    main()
