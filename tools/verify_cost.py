"""What a speculative verifier step costs: one forward over k+1 tokens against one decode step.

Speculative decoding checks k proposed tokens (plus the last accepted one) in one call of
`forward` with the cache; it pays when that call costs about as much as one decode step. This
times both, compiled, on random weights of a real Qwen2 shape, alternating trial by trial,
and prints the median cost ratio for each k (independent of the weights: no acceptance here).

    python tools/verify_cost.py --shape qwen2-0.5b --dtype bfloat16 --context 256 --ks 1,2,4,8
"""

from qwen2s import qwen2_scratch as q  # first: the model loads the fast BLAS before MLX

# isort: split
import argparse
import json
import statistics
import time

import mlx.core as mx

from qwen2s import bench


def verify_step(params, config, tokens, cache, kernels):
    """Logits [1, k+1, V] for the last accepted token and k proposals, and the cache with them."""
    return q.forward(params, config, tokens, cache, kernels)


compiled_verify_step = mx.compile(verify_step)


def seconds(step, params, config, tokens, cache, kernels, repeats):
    """Median wall time of `step` over repeats calls, each evaluated, from the same cache."""
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        logits, _ = step(params, config, tokens, cache, kernels)
        mx.eval(logits)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(bench.SHAPES), default="qwen2-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kernels", default="fast" if mx.default_device() == mx.gpu else "reference")
    parser.add_argument("--context", type=int, default=256, help="tokens already in the cache")
    parser.add_argument("--ks", default="1,2,3,4,5,6,7,8")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    params, config, _, source = bench.bench_weights(None, args.shape, args.dtype)
    cache = q.new_cache(config, dtype=getattr(mx, args.dtype))
    prompt = mx.random.randint(0, config.vocab_size, (1, args.context), key=mx.random.key(0))
    _, cache = q.prefill(params, config, prompt, cache, args.kernels)
    cache = q.reserve(cache, args.context + 16)  # room for k+1 <= 16 more, as generation reserves
    mx.eval(cache)
    bench.warm_up_gpu()
    ks = [int(k) for k in args.ks.split(",")]
    one = prompt[:, :1]
    runs = {0: lambda: seconds(q.compiled_decode_step, params, config, one, cache, args.kernels, args.repeats)}
    for k in ks:
        tokens = prompt[:, : k + 1]
        runs[k] = lambda t=tokens: seconds(compiled_verify_step, params, config, t, cache, args.kernels,
                                            args.repeats)
    for run in runs.values():
        run()  # compile every shape first
    times = {k: [] for k in runs}
    for _ in range(args.trials):
        for k, run in runs.items():
            times[k].append(run())
    decode = statistics.median(times[0])
    result = {"source": source, "dtype": args.dtype, "kernels": args.kernels, "device": bench.device_name(),
              "mlx": mx.__version__, "context": args.context, "decode_step_ms": 1e3 * decode,
              "verify_step_vs_decode_step": {k: statistics.median(times[k]) / decode for k in ks},
              "spread": {k: [min(times[k]) / decode, max(times[k]) / decode] for k in ks}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
