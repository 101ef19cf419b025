"""Time to first token of one request on a running `qwen2-scratch serve`, with and without the prompt cache.

The same request (a conversation of a few turns that goes on by one message) is sent twice:
once right after an unrelated request (nothing to reuse), once right after the conversation it
extends (its prefix is cached). Each is streamed, and the time to the first content chunk is
measured; the median of --trials pairs is printed.

    python tools/ttft.py [--url http://127.0.0.1:8080/v1] [--api-key K] [--trials 3]
"""

import argparse
import statistics
import time

from openai import OpenAI

CODE = "\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(40))
HISTORY = [
    {"role": "user", "content": f"Here is a module:\n```python\n{CODE}```\nWhat does f3 return for 2?"},
    {"role": "assistant", "content": "f3(2) returns 2 * 3 + 9 = 15."},
]
NEXT = HISTORY + [{"role": "user", "content": "And f7 for 1?"}]
UNRELATED = [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Hi?"}]


def first_token_seconds(client, model, messages, max_tokens=1):
    """Seconds to the first content chunk of one streamed request, and the request's usage."""
    tic = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                            max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True})
    seconds, usage = None, None
    for chunk in stream:
        if seconds is None and chunk.choices and chunk.choices[0].delta.content:
            seconds = time.perf_counter() - tic
        usage = chunk.usage or usage
    return seconds, usage


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key=args.api_key, timeout=600, max_retries=0)
    model = client.models.list().data[0].id
    cold, warm = [], []
    for _ in range(args.trials):
        first_token_seconds(client, model, UNRELATED)
        seconds, usage = first_token_seconds(client, model, NEXT)
        cold.append((seconds, usage.prompt_tokens_details.cached_tokens))
        first_token_seconds(client, model, HISTORY + [{"role": "user", "content": "Thanks."}])  # shares HISTORY
        seconds, usage = first_token_seconds(client, model, NEXT)
        warm.append((seconds, usage.prompt_tokens_details.cached_tokens))
    print(f"prompt: {usage.prompt_tokens} tokens; median of {args.trials} trials")
    for name, runs in (("without the cache", cold), ("with the cache", warm)):
        print(f"{name:>18}: time to first token {statistics.median(s for s, _ in runs):.2f} s "
              f"({runs[0][1]} tokens reused)")


if __name__ == "__main__":
    main()
