"""Where a piped chat turn's time goes as the history grows: the chat as `qwen2-scratch chat` runs it (the model's
sampling defaults, seed 0, one turn a line "line N"), its parts timed turn by turn.

    python tools/chat_turns.py --model /tmp/lead/tiny-qwen2 [--lines 400] [--every 100] [--max-tokens 16]

Prints, for each group of --every turns, the mean history (prompt tokens) and the mean milliseconds a turn of:
fit (templating the history and encoding it), prefill (the engine's prefill chunks), decode (first token to last)
and the rest (the prompt cache, events, the history's bookkeeping). Run it under `python -m cProfile` for functions.
"""

import argparse
import time

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
from qwen2s import chat, cli, engine, weights


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lines", type=int, default=400)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    params, config, tokenizer = cli.load_model(args.model, None)
    defaults = {**cli.QWEN_CHAT, **weights.sampling_defaults(weights.resolve(args.model))}
    session = chat.Chat(engine.Engine(params, config, tokenizer, max_batch=1), None, weights.sampling_for(defaults),
                        args.max_tokens)
    chat.warm_up(session)
    parts, start = [], time.perf_counter()
    for i in range(1, args.lines + 1):
        tic = time.perf_counter()
        ids = session.fit(f"line {i}", print)
        fitted = time.perf_counter()
        for _ in session.reply(f"line {i}", ids, print):
            pass
        stats = session.last.stats
        parts.append((len(ids), fitted - tic, stats.prefill_seconds, stats.decode_seconds, time.perf_counter() - tic))
        if i % args.every == 0:
            n, history, fit, prefill, decode, total = len(parts), *map(sum, zip(*parts, strict=True))
            print(f"turns {i - n + 1}-{i}: history {history / n:.0f} | ms a turn: fit {fit / n * 1e3:.1f}, "
                  f"prefill {prefill / n * 1e3:.1f}, decode {decode / n * 1e3:.1f}, "
                  f"rest {(total - fit - prefill - decode) / n * 1e3:.1f}, total {total / n * 1e3:.1f} | "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            parts = []


if __name__ == "__main__":
    main()
