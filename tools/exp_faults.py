"""Time exp_of_nonpositive over arrays of growing size, with the page faults each call takes.

    python tools/exp_faults.py [--default-malloc]

--default-malloc skips blas.keep_freed_memory's settings (glibc hands large freed buffers back to the kernel),
to see what they change. Each figure: the mean of 20 compiled calls after 3 warm-up calls.
"""

import sys

if "--default-malloc" in sys.argv:  # before the model module's blas.load() applies the settings
    from qwen2s import blas

    blas.keep_freed_memory = lambda: False

from qwen2s import qwen2_scratch as q  # the fast BLAS before MLX

# isort: split
import resource
import time

import mlx.core as mx


def main():
    exp = mx.compile(lambda x: q.exp_of_nonpositive(x - 10.0))
    for n in (250_000, 500_000, 1_000_000, 1_100_000, 2_000_000, 4_000_000):
        x = mx.random.normal((n,))
        for _ in range(3):
            mx.eval(exp(x))
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for _ in range(20):
            mx.eval(exp(x))
        seconds = (time.perf_counter() - start) / 20
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 20
        print(f"{n:>9} floats: {seconds * 1e9 / n:5.2f} ns an element, {faults:7.0f} page faults a call")


if __name__ == "__main__":
    main()
