"""Sampled decoding with the draw among the k likeliest tokens (as `q.sample` draws now) against the draw over the
whole vocabulary, sorted for top-p (before), requests alternated in one process: a machine whose speed drifts
still compares them fairly.

    python tools/sampler_ab.py [--model M] [--tokens 64] [--rounds 4]

The model's sampling defaults (the packaged model's: temperature 0.7, top-p 0.8, top-k 20, repetition penalty
1.05), one request at a time through the engine, seed 0; prints each request's decode tokens/s and the median
ratio. Also times one draw alone at the model's vocabulary size, each way, and the engine's draw (penalty and
log-probability included) compiled (`engine.draw`) against its ops run one by one (before `compiled_draw`).
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import statistics
import time

import mlx.core as mx

from qwen2s import cli, engine, weights


def sample_sorting_the_vocabulary(logits: mx.array, s: q.Sampling, key: mx.array | None = None) -> mx.array:
    """The sampler before: top-p over the whole vocabulary (a sort of it), min-p, then top-k, then categorical."""
    if s.temp < q.GREEDY_BELOW:
        return mx.argmax(logits, axis=-1)
    logprobs = q.log_softmax(logits)
    if 0 < s.top_p < 1:
        logprobs = q.apply_top_p(logprobs, s.top_p)
    if s.min_p > 0:
        logprobs = q.apply_min_p(logprobs, s.min_p)
    if 0 < s.top_k < logprobs.shape[-1]:
        drop = mx.argpartition(-logprobs, kth=s.top_k - 1, axis=-1)[:, s.top_k :]
        logprobs = mx.put_along_axis(logprobs, drop, mx.array(-mx.inf, logprobs.dtype), axis=-1)
    return mx.random.categorical(logprobs * (1 / s.temp), key=key)


def eager_draw(logits: mx.array, row: engine.Row, window: mx.array, position: int) -> engine.Draw:
    """The engine's draw before `compiled_draw`: its ops one by one around the compiled sampler."""
    s = row.request.sampling
    logits32 = logits.astype(mx.float32)
    norm = q.logsumexp(logits32)
    if s.repetition_penalty != 1:
        logits = q.apply_repetition_penalty(logits, window, s.repetition_penalty)
    token = q.compiled_sample(logits, s, q.sampling_key(row.seed, position))
    return engine.Draw(token, mx.take_along_axis(logits32, token[:, None], axis=-1)[:, 0] - norm[:, 0], None)


def time_engine_draws(vocab: int, sampling: q.Sampling, tokenizer) -> None:
    """Median milliseconds of a draw, eager and compiled, alternated over 5 rounds of 100 (after one uncounted)."""
    row = engine.Row(engine.Handle(engine.Request(tuple(range(30)), sampling, seed=3)), tokenizer, frozenset(), 0)
    logits, window = mx.random.normal((1, vocab), key=mx.random.key(0)) * 3, mx.array([list(range(5, 25))])
    same = all(eager_draw(logits, row, window, i).token.item() == engine.draw(logits, row, window, i).token.item()
               for i in range(20))
    times = {"eager": [], "compiled": []}
    for r in range(6):
        for name, draw in (("eager", eager_draw), ("compiled", engine.draw)):
            tic = time.perf_counter()
            for i in range(100):
                mx.eval(draw(logits, row, window, i))
            if r:
                times[name].append((time.perf_counter() - tic) / 100 * 1e3)
    print(f"the engine's draw over {vocab} logits ({sampling}): eager {statistics.median(times['eager']):.3f} ms, "
          f"compiled {statistics.median(times['compiled']):.3f} ms; the same tokens: {same}")


SAMPLERS = {"whole vocabulary": mx.compile(sample_sorting_the_vocabulary), "k likeliest": q.compiled_sample}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    params, config, tokenizer = cli.load_model(args.model, None)
    sampling = weights.sampling_for({**cli.QWEN_CHAT, **weights.sampling_defaults(weights.resolve(args.model))})
    print(f"sampling: {sampling}")
    logits = mx.random.normal((1, config.vocab_size), key=mx.random.key(0)) * 3
    for name, sampler in SAMPLERS.items():
        mx.eval(sampler(logits, sampling, q.sampling_key(0, 0)))
        tic = time.perf_counter()
        for i in range(50):
            mx.eval(sampler(logits, sampling, q.sampling_key(0, i)))
        print(f"one draw over {config.vocab_size} logits, {name}: {(time.perf_counter() - tic) / 50 * 1e3:.2f} ms")
    for vocab in (300, config.vocab_size):
        time_engine_draws(vocab, sampling._replace(top_k=sampling.top_k if vocab > 1000 else 0), tokenizer)
    eng = engine.Engine(params, config, tokenizer, max_batch=1)
    prompt = tuple(tokenizer.apply_chat_template([{"role": "user", "content": "Write a long story about a "
                                                   "lighthouse keeper."}], add_generation_prompt=True))
    request = engine.Request(prompt, sampling, max_tokens=args.tokens, seed=0)
    tps = {name: [] for name in SAMPLERS}
    for r in range(args.rounds + 1):  # the first round warms both up and is not counted
        for name, sampler in SAMPLERS.items():
            q.compiled_sample = sampler
            *_, last = eng.generate(request)
            if r:
                tps[name].append(last.stats.generation_tps)
                print(f"round {r}, {name}: {last.stats.generation_tps:.2f} tok/s ({last.usage.completion_tokens} "
                      "tokens)", flush=True)
    q.compiled_sample = SAMPLERS["k likeliest"]
    ratios = [a / b for a, b in zip(tps["k likeliest"], tps["whole vocabulary"], strict=True)]
    print(f"k likeliest / whole vocabulary, decode tok/s: median {statistics.median(ratios):.2f} "
          f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
