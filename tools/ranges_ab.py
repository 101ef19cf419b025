"""The decode step with its ranges as graph nodes (before `arange_constant`) against as it is, steps alternated in one
process: a machine whose speed drifts by 2x within minutes still compares them fairly.

    python tools/ranges_ab.py --model M [--context 2000] [--steps 400]

One row, float32, our reference kernels, greedy; each variant compiled once (the old ranges patched in while it
traces) and stepping its own cache; prints the median milliseconds a step of each and their ratio.
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from qwen2s import cli

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import ranges_as_nodes  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--context", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    params, config, _ = cli.load_model(args.model, None)
    rope, old_slots = ranges_as_nodes()
    kernels = {"before": q.KERNELS["reference"]._replace(rope=rope), "after": q.KERNELS["reference"]}
    steps = {name: mx.compile(functools.partial(q.decode_step, kernels=k)) for name, k in kernels.items()}
    caches, tokens, times = {}, {}, {name: [] for name in kernels}
    for name in kernels:
        cache = q.reserve(q.new_cache(config, 1), args.context + args.steps + 8)
        caches[name] = {"layers": cache["layers"], "offset": mx.array([args.context], mx.int32)}
        tokens[name] = mx.array([[5]], mx.uint32)
        mx.eval(caches[name])

    def step(name: str) -> float:
        tic = time.perf_counter()
        logits, caches[name] = steps[name](params, config, tokens[name], caches[name])
        tokens[name] = mx.argmax(logits[:, -1], axis=-1)[:, None].astype(mx.uint32)
        mx.eval(tokens[name], caches[name])
        return time.perf_counter() - tic

    slots, q.cache_slots = q.cache_slots, old_slots
    step("before")  # traced with the old slots
    q.cache_slots = slots
    step("after")
    for i in range(args.steps):
        for name in ("before", "after") if i % 2 else ("after", "before"):
            times[name].append(step(name))
    before, after = (1e3 * statistics.median(times[n]) for n in ("before", "after"))
    print(f"context {args.context}: before {before:.3f} ms, after {after:.3f} ms a step, "
          f"after / before {after / before:.3f}")


if __name__ == "__main__":
    main()
