"""What one compiled step over L tokens of one row costs against a one-token step (a verifier step's price), and
what its first call at a new L costs (a trace): the packaged model, float32, 512 cached tokens, on this machine.

    python tools/step_cost.py [L ...]      (default: 1 5 9)

Prints each L's first call, then the medians of 9 alternated rounds and their ratio to L = 1.
"""

import statistics
import sys
import time

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import mlx.core as mx

from qwen2s import weights


def main():
    lengths = [int(a) for a in sys.argv[1:]] or [1, 5, 9]
    params, config, _ = weights.load(None)
    cache = q.reserve(q.new_cache(config), 700)
    _, cache = q.prefill(params, config, mx.array([list(range(100, 612))]), cache)
    mx.eval(cache)

    def step(n):
        tic = time.perf_counter()
        mx.eval(q.compiled_decode_step(params, config, mx.array([[5] * n]), cache))
        return time.perf_counter() - tic

    for n in lengths:
        print(f"L={n}: first call {step(n) * 1000:.0f} ms", flush=True)
    times = {n: [] for n in lengths}
    for _ in range(9):
        for n in lengths:
            times[n].append(step(n))
    base = statistics.median(times[lengths[0]])
    for n in lengths:
        m = statistics.median(times[n])
        print(f"L={n}: median {m * 1000:.1f} ms, {m / base:.2f}x L={lengths[0]}")


if __name__ == "__main__":
    main()
