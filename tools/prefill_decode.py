"""Prefill and decode speeds of a model through the engine, one JSON line: for comparing two checkouts.

    python tools/prefill_decode.py [--model M]

Run it alternately in each checkout (PYTHONPATH=<checkout>), trial by trial, and compare medians. Prefill:
tok/s of a fresh 512- and 1024-token prompt. Decode: tok/s of 32 tokens after a 1024- and a 2048-token prompt
(end-of-sequence tokens banned, so that every request decodes all of them). One warm-up request first.
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import json

import mlx.core as mx

from qwen2s import weights
from qwen2s.engine import Engine, Request


def stats(params, config, tokenizer, prompt_tokens: int, gen_tokens: int):
    """The final event's stats of one greedy request on a fresh engine."""
    runner = Engine(params, config, tokenizer)
    prompt = tuple((i * 7919) % (config.vocab_size - 100) + 10 for i in range(prompt_tokens))
    no_end = tuple((t, -100.0) for t in sorted(runner.eos))
    last = list(runner.generate(Request(prompt, q.Sampling(), gen_tokens, logit_bias=no_end)))[-1]
    assert last.usage.completion_tokens == gen_tokens, last.usage
    return last.stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    params, config, tokenizer = weights.load(args.model, "float32")
    mx.eval(params)
    stats(params, config, tokenizer, 64, 4)  # warm-up
    figures = {f"prefill_{n}": n / stats(params, config, tokenizer, n, 2).prefill_seconds for n in (512, 1024)}
    figures |= {f"decode_after_{n}": stats(params, config, tokenizer, n, 33).generation_tps for n in (1024, 2048)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
