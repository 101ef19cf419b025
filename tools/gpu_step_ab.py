"""A compiled decode step now against the same step at an earlier commit, and mlx_lm's, samples interleaved.

    python tools/gpu_step_ab.py [COMMIT]    (default 7440ecd: q, k and v's biases, the residual adds and SwiGLU's
                                             gate as nodes of their own, before our kernels took them in)

The 0.5B shape's random weights in bfloat16, `fast` kernels, the engine's fixed-shape step (64 rows), for 1 and 32
rows at 40 cached tokens: the earlier commit's qwen2_scratch.py and gpu_products.py are read from git and loaded as
modules of their own beside ours. Each contender's step is evaluated alone 400 times and in chains of 10 sent at once
40 times, the contenders taking turns sample by sample (the H200's clock drifts within seconds); medians and
quartiles. Results: benchmarks/README.md, "Fewer nodes a GPU step".
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
from mlx_lm.models.cache import make_prompt_cache

from qwen2s import bench


def at_commit(commit: str, name: str) -> types.ModuleType:
    """A module of ours as it was at commit, loaded apart from the current one."""
    source = subprocess.run(["git", "show", f"{commit}:{name}.py"], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent).stdout
    module = types.ModuleType(f"{name}_{commit}")
    exec(compile(source, f"{commit}:{name}.py", "exec"), module.__dict__)
    return module


def quartiles(seconds: list[float]) -> str:
    s = sorted(seconds)
    return f"{1e3 * statistics.median(s):.3f} ms (p25 {1e3 * s[len(s) // 4]:.3f}, p75 {1e3 * s[3 * len(s) // 4]:.3f})"


def steps_of(rows: int, commit: str, earlier, params, config, reference) -> dict:
    """The contenders' steps for `rows` rows at 40 cached tokens: name -> a function sending one step off."""
    cache = q.reserve(q.new_cache(config, rows, mx.bfloat16), 256)
    cache = {"layers": cache["layers"], "offset": mx.array([40] * rows, mx.int32)}
    tokens = mx.full((rows, 1), 5, mx.int32)
    mx.eval(cache)
    steps = {"now": lambda: q.compiled_decode_step(params, config, tokens, cache, "fast", 64),
             commit: lambda: earlier.compiled_decode_step(params, config, tokens, cache, "fast", 64)}
    if rows == 1:
        mlx_cache = make_prompt_cache(reference)
        mx.eval(reference(mx.array([[5] * 40]), cache=mlx_cache))

        def mlx_lm_step():
            for c in mlx_cache:
                c.offset = 40
            return reference(mx.array([[5]]), cache=mlx_cache)
        steps["mlx_lm"] = mlx_lm_step
    return steps


def main():
    commit = sys.argv[1] if len(sys.argv) > 1 else "7440ecd"
    earlier = at_commit(commit, "qwen2_scratch")
    earlier.gpu_products = at_commit(commit, "gpu_products")  # its rows_alone looks the module up at each trace
    params, config, reference, _ = bench.bench_weights(None, "qwen2-0.5b", "bfloat16")
    for rows in (1, 32):
        steps = steps_of(rows, commit, earlier, params, config, reference)
        a, b = (steps[name]()[0].astype(mx.float32) for name in ("now", commit))
        print(f"rows {rows}: logits differ by at most {mx.abs(a - b).max().item():.4f}, "
              f"the same argmax: {mx.array_equal(a.argmax(-1), b.argmax(-1)).item()}")
        waited, sent = ({name: [] for name in steps} for _ in range(2))
        order = list(steps.items())
        for i in range(400):
            for name, step in order if i % 2 else order[::-1]:
                tic = time.perf_counter()
                mx.eval(step())
                waited[name].append(time.perf_counter() - tic)
        for i in range(40):
            for name, step in order if i % 2 else order[::-1]:
                tic = time.perf_counter()
                mx.eval([step() for _ in range(10)])
                sent[name].append((time.perf_counter() - tic) / 10)
        for name in steps:
            print(f"rows {rows} {name}: waited {quartiles(waited[name])}; sent 10 at once {quartiles(sent[name])}")


if __name__ == "__main__":
    main()
