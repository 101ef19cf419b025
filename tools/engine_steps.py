"""The engine alone (no server): 1, 8 and 32 greedy streams submitted at once, and where the engine thread's time
goes; then one prefill and one compiled decode step by themselves.

    python tools/engine_steps.py [--model M] [--dtype bfloat16] [--kernels fast] [--tokens 256] [--rounds 2]

The prompts are bench --serve's questions in the model's chat template; no stream ends early (no end-of-sequence).
Per case: aggregate tokens/s, the seconds until every stream had its first token, and the time summed in each of
the engine's parts (admission's prefills, the decode steps and, inside them, the compiled step's call, MLX's
`async_eval` and `eval`, drawing and handing tokens out). Then the median time of a prefill of the first prompt
alone and of a decode step of 1, 8 and 32 rows at the engine's fixed shape, waited for one by one and sent off
20 at a time. The first round includes the first-time costs (traces; on CUDA, kernel builds).
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import collections
import statistics
import time

import mlx.core as mx

from qwen2s import bench, weights
from qwen2s import engine as E

TIME = collections.defaultdict(float)
CALLS = collections.Counter()


class NoEos:
    """The model's tokenizer (its detokenizer at work, as a server's), without an end-of-sequence id."""

    eos_token_ids = ()

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def timed(name, f):
    def wrapper(*args, **kwargs):
        tic = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            TIME[name] += time.perf_counter() - tic
            CALLS[name] += 1
    return wrapper


def instrument() -> None:
    """Count the time of the engine's parts (module attributes replaced for this process only)."""
    for name in ("prefill_chunk", "decode", "emit", "join", "retire"):
        if hasattr(E.Engine, name):
            setattr(E.Engine, name, timed(name, getattr(E.Engine, name)))
    if hasattr(E.Engine, "prefill_together"):
        E.Engine.prefill_together = timed("prefill_together", E.Engine.prefill_together)
    E.draw_rows = timed("draw_rows", E.draw_rows)
    E.q.compiled_decode_step = timed("compiled step call", q.compiled_decode_step)
    E.mx.async_eval = timed("async_eval", mx.async_eval)
    E.mx.eval = timed("eval", mx.eval)


def run(engine: E.Engine, prompts: list, streams: int, tokens: int) -> None:
    handles = [engine.submit(E.Request(prompts[i % len(prompts)], max_tokens=tokens)) for i in range(streams)]
    TIME.clear()
    CALLS.clear()
    tic = time.perf_counter()
    steps, first = 0, None
    while not all(h.done.is_set() for h in handles):
        engine.step()
        steps += 1
        if first is None and all(not h.queue.empty() for h in handles):
            first = time.perf_counter() - tic
    wall = time.perf_counter() - tic
    print(f"{streams:>2} streams: {streams * tokens / wall:7.1f} tok/s, {wall:.2f} s, {steps} steps, every first "
          f"token after {first:.3f} s")
    print("    " + ", ".join(f"{k} {TIME[k] * 1e3:.0f} ms/{CALLS[k]}" for k in sorted(TIME, key=lambda k: -TIME[k])))


def median_ms(f, n=15) -> float:
    for _ in range(3):
        f()
    times = []
    for _ in range(n):
        tic = time.perf_counter()
        f()
        times.append(time.perf_counter() - tic)
    return statistics.median(times) * 1e3


def alone(params, config, prompt, kernels, dtype, step_rows) -> None:
    tokens = mx.array(prompt)[None]

    def prefill():
        logits, cache = q.prefill(params, config, tokens, q.new_cache(config, 1, dtype), kernels)
        mx.eval(mx.argmax(logits, -1), cache)

    print(f"a prefill of {len(prompt)} tokens alone: {median_ms(prefill):.2f} ms")
    for rows in (1, 8, 32):
        cache = q.reserve(q.new_cache(config, rows, dtype), 512)
        cache = {"layers": cache["layers"], "offset": mx.array([40 + 3 * i for i in range(rows)], mx.int32)}
        first = mx.full((rows, 1), 5, mx.int32)

        def one(first=first, cache=cache):
            logits, c = q.compiled_decode_step(params, config, first, cache, kernels, step_rows)
            mx.eval(mx.argmax(logits[:, -1], -1), c)

        def twenty(first=first, cache=cache):
            t, c = first, cache
            for _ in range(20):
                logits, c = q.compiled_decode_step(params, config, t, c, kernels, step_rows)
                t = mx.argmax(logits[:, -1], -1)[:, None].astype(mx.int32)
                mx.async_eval(t, c)
            mx.eval(t)

        print(f"{rows:>2} rows: a step waited for {median_ms(one):.2f} ms; sent off 20 at a time "
              f"{median_ms(twenty, 5) / 20:.2f} ms a step")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--kernels", default="fast" if mx.default_device() == mx.gpu else "reference")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    a = parser.parse_args()
    params, config, tokenizer = weights.load(a.model, a.dtype)
    dtype = params["model"]["norm"]["weight"].dtype
    prompts = [tuple(tokenizer.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True))
               for s in bench.SERVE_QUESTIONS]
    instrument()
    engine = E.Engine(params, config, NoEos(tokenizer), a.kernels, max_batch=32, prompt_cache_bytes=0)
    print(f"{mx.default_device()}, {dtype}, kernels {a.kernels}, step rows {engine.step_rows}, prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {a.tokens} tokens a stream")
    for _ in range(a.rounds):
        for streams in (1, 8, 32):
            run(engine, prompts, streams, a.tokens)
    alone(params, config, list(prompts[0]), a.kernels, dtype, engine.step_rows)


if __name__ == "__main__":
    main()
