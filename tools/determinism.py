"""How often one request's tokens change with what runs beside it: alone, in a batch of eight,
after a prompt-cache hit, and with prompt-lookup speculation; greedy and seeded sampling.

    python tools/determinism.py [--model M | --shape qwen2-0.5b] [--dtype bfloat16] [--tokens 48]
                                [--step-rows 64|none] [--json out.json]

Prints one line per check: how many of the requests differ from the request run alone, where the
first difference is, and how many differ in any log-probability bit. On the CPU in float32 every
count should be 0 (the tests say so); on a GPU this measures how far MLX's kernels keep the
promise. --shape runs random weights of a real shape on prompts of random token ids (each question
said three times, so that prompt lookup has something to propose): the kernels' question, without
the packaged model's weights. --step-rows: the engine's fixed-shape steps (default: the device's).
"""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import argparse
import json
import time

import mlx.core as mx

from qwen2s import bench, speculative, weights
from qwen2s.engine import Engine, Request

QUESTIONS = [
    "Why do some programming languages use garbage collection and others do not?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Name three prime numbers below ten. Answer in one short sentence.",
    "Explain what a hash map is to a beginner.",
    "Write a haiku about the sea.",
    "What is the difference between a list and a tuple in Python?",
    "Describe the water cycle in two sentences.",
    "def fibonacci(n):",
]


def tokens(events) -> list[tuple[int, float]]:
    """(token, log-probability) of each event that carries a token."""
    return [(e.token, e.logprob) for e in events if e.token is not None]


def together(runner: Engine, requests: list[Request]) -> list[list[int]]:
    handles = [runner.submit(r) for r in requests]
    while runner.step():
        pass
    out = []
    for h in handles:
        got = []
        while not h.queue.empty():
            got.append(h.queue.get())
        out.append(tokens(got))
    return out


def compare(name: str, reference: list[list[tuple]], other: list[list[tuple]]) -> dict:
    ids = [([t for t, _ in x], [t for t, _ in y]) for x, y in zip(reference, other, strict=True)]
    first = [next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), None if x == y else 0)
             for x, y in ids]
    differ = [f for f in first if f is not None]
    bits = sum(x != y for x, y in zip(reference, other, strict=True))  # a token or a log-probability
    line = {"check": name, "requests": len(reference), "differ": len(differ), "first_difference_at": differ,
            "differ_in_logprob_bits": bits}
    print(f"{name:<34} {len(differ)} of {len(reference)} differ" + (f" (first at tokens {differ})" if differ else "")
          + f"; {bits} in any log-probability bit")
    return line


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--shape", choices=list(bench.SHAPES), default=None,
                        help="random weights of this shape, on random token ids, instead of a model")
    parser.add_argument("--step-rows", default=None, help="query rows of a fixed-shape step, or 'none' "
                        "(default: the device's choice)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--kernels", default="fast" if mx.default_device() == mx.gpu else "reference")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--json", default=None)
    parser.add_argument("--system-repeats", type=int, default=250 if mx.default_device() == mx.gpu else 30,
                        help="A shared system prompt this many sentences long: longer than a prefill chunk, so that "
                             "the prompt cache has whole chunks to give back")
    a = parser.parse_args()
    rows = -1 if a.step_rows is None else None if a.step_rows == "none" else int(a.step_rows)
    if a.shape:
        params, config, _, _ = bench.bench_weights(None, a.shape, a.dtype or weights.default_dtype())
        tokenizer = bench.NoEos()
        ids = mx.random.randint(0, config.vocab_size, (len(QUESTIONS) + 1, a.system_repeats * 10),
                                key=mx.random.key(7)).tolist()
        prompts = [tuple(ids[0] + ids[i + 1][:15] * 3) for i in range(len(QUESTIONS))]
    else:
        system = [{"role": "system", "content": "You are a careful assistant who answers briefly. " * a.system_repeats}]
        params, config, tokenizer = weights.load(a.model, a.dtype)
        prompts = [tuple(tokenizer.apply_chat_template(system + [{"role": "user", "content": t}],
                                                       add_generation_prompt=True)) for t in QUESTIONS]
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": str(mx.default_device()),
              "dtype": str(params["model"]["norm"]["weight"].dtype), "kernels": a.kernels, "mlx": mx.__version__,
              "model": f"random weights, {a.shape} shape" if a.shape else a.model or "packaged",
              "step_rows": Engine(params, config, tokenizer, step_rows=rows).step_rows,
              "tokens": a.tokens, "checks": []}
    print(f"{report['model']}, {report['dtype']}, {report['device']}, step rows {report['step_rows']}")
    for name, sampling, seed in (("greedy", q.Sampling(), 0), ("sampled", q.Sampling(temp=0.7, top_p=0.8), 5)):
        requests = [Request(p, sampling, a.tokens, seed=seed + i) for i, p in enumerate(prompts)]
        alone = [tokens(Engine(params, config, tokenizer, a.kernels, max_batch=1, step_rows=rows).generate(r))
                 for r in requests]
        report["checks"].append(compare(f"{name}: in a batch of eight", alone,
                                        together(Engine(params, config, tokenizer, a.kernels, max_batch=8,
                                                        step_rows=rows), requests)))
        cached = Engine(params, config, tokenizer, a.kernels, step_rows=rows)
        for r in requests:  # fill the prompt cache, then ask again
            list(cached.generate(r._replace(max_tokens=1)))
        report["checks"].append(compare(f"{name}: after a prompt-cache hit", alone,
                                        [tokens(cached.generate(r)) for r in requests]))
        spec = Engine(params, config, tokenizer, a.kernels, proposer=speculative.Lookup(), step_rows=rows)
        runs = [list(spec.generate(r)) for r in requests]
        report["checks"].append(compare(f"{name}: with lookup speculation", alone, [tokens(e) for e in runs]))
        steps = [e[-1].stats for e in runs]
        report["checks"][-1].update(verify_steps=sum(x.verify_steps for x in steps),
                                    proposed=sum(x.proposed for x in steps), accepted=sum(x.accepted for x in steps))
        print("  (verifier steps {verify_steps}, proposed {proposed}, accepted {accepted})"
              .format(**report["checks"][-1]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
