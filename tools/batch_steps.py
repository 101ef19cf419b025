"""Time one compiled decode step for batches of 1 to 64 rows on a model (default: the packaged one).

    python tools/batch_steps.py [--model M] [--dtype float32] [--steps 5]

Rows sit at different offsets (100, 107, ...), as an engine's batch does; each figure is the mean of
--steps steps after two warm-up steps. tokens/s = rows / step time: what batching can give at most.
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import time

import mlx.core as mx

from qwen2s import weights


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--steps", type=int, default=5)
    a = parser.parse_args()
    params, config = weights.load_params(weights.resolve(a.model), weights.DTYPES[a.dtype or weights.default_dtype()])
    for rows in (1, 2, 4, 8, 16, 32, 64):
        cache = q.reserve(q.new_cache(config, rows, params["model"]["norm"]["weight"].dtype), 512)
        cache = {"layers": cache["layers"], "offset": mx.array([100 + 7 * i for i in range(rows)], mx.int32)}
        tokens = mx.full((rows, 1), 5, mx.int32)
        for i in range(2 + a.steps):
            if i == 2:
                tic = time.perf_counter()
            logits, out = q.compiled_decode_step(params, config, tokens, cache)
            mx.eval(logits, out)
        step = (time.perf_counter() - tic) / a.steps
        print(f"{rows:>2} rows: {step * 1e3:6.1f} ms a step, {rows / step:6.1f} tokens/s")


if __name__ == "__main__":
    main()
