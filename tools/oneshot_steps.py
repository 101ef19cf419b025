"""Where a one-shot command's decode time goes: the time between tokens, and the decode step's traces.

    python tools/oneshot_steps.py [--model M] [--dtype bfloat16] [--kernels fast] [--workload "code edit"]
                                  [--speculate none|lookup] [--tokens N] [--cache-block N] [--always-wait]
                                  [--no-pretrace]

What `qwen2-scratch generate --temp 0` does (cli's load_model and engine_for, the chat template, one request), once,
in this process: the time from each event to the next, the traces of the compiled step (calls of q.forward, which
only a trace makes: their count, where they came and their Python time), and the stats line. Run in fresh processes,
it shows what a one-shot command pays that a warm process does not. Prints one JSON line. --cache-block sets the
cache's growth (q.CACHE_BLOCK); --always-wait makes every lookup wait for the token before it, as before the
engine asked the proposer whether a lookup could find anything (`speculative.may_propose`); --no-pretrace leaves the
first verifier step's trace to that step (`Engine.pretrace`).
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import itertools
import json
import statistics
import time

import mlx.core as mx

from qwen2s import bench, cli, engine, speculative

TRACES = []  # (events so far, seconds of Python in the trace)
EVENTS = []  # perf_counter of each event


def counted(forward):
    def traced(*args, **kwargs):
        tic = time.perf_counter()
        out = forward(*args, **kwargs)
        TRACES.append((len(EVENTS), time.perf_counter() - tic, args[2].shape))
        return out
    return traced


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--kernels", default=None)
    parser.add_argument("--workload", default="code edit", choices=list(bench.WORKLOADS))
    parser.add_argument("--speculate", default="none", choices=["none", "lookup"])
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--cache-block", type=int, default=None)
    parser.add_argument("--always-wait", action="store_true")
    parser.add_argument("--no-pretrace", action="store_true")
    a = parser.parse_args()
    q.CACHE_BLOCK = a.cache_block or q.CACHE_BLOCK
    if a.always_wait:
        engine.Engine.may_propose = lambda self, row: True
    if a.no_pretrace:
        engine.Engine.pretrace = lambda self, row, first: None
    tic = time.perf_counter()
    params, config, tokenizer = cli.load_model(a.model, a.dtype)
    loaded = time.perf_counter() - tic
    text, max_tokens = bench.WORKLOADS[a.workload]
    o = {"max_kv_size": None, "num_draft": speculative.NUM_DRAFT, "draft_model": None}
    kernels = a.kernels or cli.default_kernels()
    runner = cli.engine_for(params, config, tokenizer, kernels, o, a.speculate, a.dtype, max_batch=1)
    ids = cli.templated(tokenizer, [{"role": "user", "content": text}])
    q.forward = counted(q.forward)
    start = time.perf_counter()
    request = engine.Request(tuple(ids), q.Sampling(temp=0), a.tokens or max_tokens, seed=0)
    for event in runner.generate(request):
        EVENTS.append(time.perf_counter())
        last = event
    gaps = [b - a_ for a_, b in itertools.pairwise(EVENTS)]
    steps = [g for g in gaps if g > 1e-4]  # a verifier step hands several tokens out at once
    typical = statistics.median(steps)
    print(json.dumps({
        "device": str(mx.default_device()), "workload": a.workload, "speculate": a.speculate,
        "cache_block": q.CACHE_BLOCK, "always_wait": a.always_wait, "pretrace": not a.no_pretrace,
        "prompt_tokens": len(ids), "load_s": round(loaded, 2), "first_token_s": round(EVENTS[0] - start, 3),
        "tokens": len(EVENTS), "decode_s": round(EVENTS[-1] - EVENTS[0], 3),
        "median_step_ms": round(typical * 1e3, 2),
        "excess_s": round(sum(g - typical for g in steps if g > 2 * typical), 3),
        "slowest_ms": sorted(((round(g * 1e3, 1), i) for i, g in enumerate(gaps)), reverse=True)[:8],
        "traces": [(n, round(s * 1e3, 1), list(shape)) for n, s, shape in TRACES],
        "stats": engine.stats_line(last.stats, last.usage)}))


if __name__ == "__main__":
    main()
