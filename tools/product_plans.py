"""How to cut our GPU products kernel (gpu_products.Plan) for each product of the Qwen2 0.5B and 7B: every plan's
bits against the default's, and each plan's device time under Nsight Compute.

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file k.csv \
        python tools/product_plans.py --order order.json
    python tools/product_plans.py --summary k.csv --order order.json

For one row (a one-stream decode step) and 32 rows (32 streams), random bfloat16 weights: rows of J (1 for one
row; 8, 16 or 32), weight rows (gated: output pairs) a warp, loads in flight and warps a block. Each plan's output
must be the same bits as the default plan's (each output is one dot product in one order, whatever the plan):
the run stops otherwise. Then each plan is launched REPEATS times between cudaProfilerStart and Stop, in the
order written to --order; --summary prints each product's plans by median device time, the default's first, and
--best keeps each product's fastest plan, for `tools/step_kernels.py --plans`.
"""

from qwen2s import qwen2_scratch as q  # noqa: F401  first: the fast BLAS before MLX

# isort: split
import argparse
import collections
import concurrent.futures
import csv
import itertools
import json
import statistics

import mlx.core as mx
from step_kernels import cuda_runtime  # tools/, this script's folder

from qwen2s import gpu_products

REPEATS = 3
PRODUCTS = {"0.5b q_proj": (896, 896, ""), "0.5b k_proj": (128, 896, ""), "0.5b down_proj": (896, 4864, ""),
            "0.5b gated": (4864, 896, "gated"), "0.5b lm_head": (151936, 896, ""),
            "7b q_proj": (3584, 3584, ""), "7b k_proj": (512, 3584, ""), "7b down_proj": (3584, 18944, ""),
            "7b gated": (18944, 3584, "gated"), "7b lm_head": (152064, 3584, "")}
ROWS = {"0.5b": (1, 32), "7b": (1,)}


def plans(rows: int, kind: str) -> list[gpu_products.Plan]:
    """The plans tried for rows: a few of each knob, at most 64 sums and 16 loads in flight a lane."""
    weights = 2 if kind == "gated" else 1  # weight rows an output
    if rows == 1:
        grid = itertools.product([1], [1, 2, 4], [2, 4, 8, 16], [4, 8])
    else:
        grid = itertools.product([8, 16, 32], [1, 2, 4], [1, 2, 4], [4, 8])
    return [gpu_products.Plan(*p) for p in grid if p[0] * p[1] * weights <= 64 and p[1] * p[2] * weights <= 16]


def cases() -> list[tuple[str, int, str, mx.array, list[mx.array]]]:
    out = []
    for name, (N, K, kind) in PRODUCTS.items():
        weights = [(mx.random.normal((N, K), key=mx.random.key(i)) * 0.02).astype(mx.bfloat16)
                   for i in range(2 if kind == "gated" else 1)]
        for rows in ROWS[name.split()[0]]:
            x = mx.random.normal((rows, K), key=mx.random.key(9)).astype(mx.bfloat16)
            out.append((name, rows, kind, x, weights))
    return out


def run(kernel: str, kind: str, x: mx.array, weights: list[mx.array], plan: gpu_products.Plan) -> mx.array:
    return gpu_products.launch(kernel, kind, x, weights, [], plan)[0]


def measure(order_path: str) -> None:
    every = cases()
    mx.eval([c[3] for c in every], [c[4] for c in every])
    sources = {(x.dtype, plan, kind) for _, rows, kind, x, _ in every for plan in plans(rows, kind)}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # NVRTC in parallel; each cubin kept in the cache folder
        list(pool.map(lambda s: gpu_products.machine_code(*s), sources))
    order = []
    for name, rows, kind, x, weights in every:
        kernel = "few_rows_gated" if kind == "gated" else "few_rows_product"
        default = run(kernel, kind, x, weights, gpu_products.plan_for(rows, *weights[0].shape, kind))
        for plan in plans(rows, kind):
            if not mx.array_equal(run(kernel, kind, x, weights, plan), default).item():
                raise SystemExit(f"{name}, {rows} rows, {plan}: not the default plan's bits")
            order.append([name, rows, list(plan)])
    print(f"{len(order)} plans: every one the same bits as its product's default plan", flush=True)
    json.dump(order, open(order_path, "w"))
    runtime = cuda_runtime()
    if runtime is None:
        raise SystemExit("no CUDA runtime library found: nothing profiled")
    launches = [(c, plan) for c in every for plan in plans(c[1], c[2])]
    mx.synchronize()
    runtime.cudaProfilerStart()
    for _ in range(REPEATS):
        for (_, _, kind, x, weights), plan in launches:
            mx.eval(run("few_rows_gated" if kind == "gated" else "few_rows_product", kind, x, weights, plan))
    mx.synchronize()
    runtime.cudaProfilerStop()


def summary(csv_path: str, order_path: str, best_path: str | None) -> None:
    order = json.load(open(order_path))
    lines = list(csv.reader(open(csv_path)))
    header = next(i for i, row in enumerate(lines) if row and row[0] == "ID")
    names = lines[header]
    kernel, value = names.index("Kernel Name"), names.index("Metric Value")
    us = [float(r[value].replace(",", "")) / 1e3 for r in lines[header + 1 :]
          if len(r) > value and r[kernel].startswith("few_rows")]
    if len(us) != REPEATS * len(order):
        raise SystemExit(f"{len(us)} kernels timed, {REPEATS * len(order)} launched")
    times = collections.defaultdict(list)
    for i, t in enumerate(us):
        name, rows, plan = order[i % len(order)]
        times[(name, rows, tuple(plan))].append(t)
    by_product, best = collections.defaultdict(list), {}
    for (name, rows, plan), ts in times.items():
        by_product[(name, rows)].append((statistics.median(ts), plan, min(ts), max(ts)))
    for (name, rows), rows_plans in by_product.items():
        N, K, kind = PRODUCTS[name]
        default = tuple(gpu_products.plan_for(rows, N, K, kind))
        base = next(t for t, plan, _, _ in rows_plans if plan == default)
        gigabytes = N * K * 2 * (2 if kind == "gated" else 1) / 1e9
        print(f"{name}, {rows} rows: default {default} {base:.1f} us ({gigabytes / base * 1e6 / 1e3:.2f} TB/s)")
        best[f"{N},{K},{kind},{rows}"] = min(rows_plans)[1]
        for t, plan, lo, hi in sorted(rows_plans)[:5]:
            print(f"    {plan} {t:8.1f} us ({lo:.1f}-{hi:.1f}), {base / t:.2f}x the default,"
                  f" {gigabytes / t * 1e6 / 1e3:.2f} TB/s")
    if best_path:
        json.dump(best, open(best_path, "w"))


def plans_from(path: str):
    """A plan_for that takes each product's best plan from --best's JSON (rows 1 or 32), else the default's."""
    best, default = json.load(open(path)), gpu_products.plan_for

    def plan_for(rows: int, N: int, K: int, kind: str) -> gpu_products.Plan:
        plan = best.get(f"{N},{K},{kind},{1 if rows == 1 else 32}")
        return gpu_products.Plan(*plan) if plan else default(rows, N, K, kind)
    return plan_for


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", required=True, metavar="JSON")
    parser.add_argument("--summary", metavar="CSV", default=None)
    parser.add_argument("--best", metavar="JSON", default=None, help="with --summary: each product's fastest plan")
    a = parser.parse_args()
    if a.summary:
        summary(a.summary, a.order, a.best)
    else:
        if not gpu_products.cuda():
            raise SystemExit("tools/product_plans.py measures a CUDA GPU's kernel: this machine has none")
        measure(a.order)


if __name__ == "__main__":
    main()
