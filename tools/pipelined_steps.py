"""Decode speed of the engine on a GPU, random weights of the 0.5B shape, bfloat16, each case in a process of its own:
one stream (5 runs of 128 tokens after a prompt of 512; peak memory) and 32 streams at once (prompts of 128, 4
runs of 127 tokens after every prompt is in), pipelined (the engine's default), waiting for each step ("sync":
mx.async_eval replaced by mx.eval), and drawing greedy rows one by one ("nobatch"); mlx_lm's generate_step for one
stream. An older checkout's package for "before": BEFORE=path/containing/qwen2s.

    python tools/pipelined_steps.py [rounds]
"""
import os
import subprocess
import sys

CHILD = r'''
import gc, json, sys, time
from qwen2s import bench, engine as E, qwen2_scratch as q
import mlx.core as mx
case, prompt_tokens, streams = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if case == "sync":
    mx.async_eval = mx.eval
if case == "nobatch":
    E.plainly_greedy = lambda row: False
run, params, config = bench.random_weights_run(case, "qwen2-0.5b", "bfloat16")
gc.collect(); mx.clear_cache(); mx.reset_peak_memory()
prompt = mx.random.randint(0, config.vocab_size, (prompt_tokens,), key=mx.random.key(0)).tolist()
out = {"case": case, "prompt": prompt_tokens}
if streams == 1:
    gen = run(prompt, 2); next(gen); out["peak_prefill_gb"] = round(mx.get_peak_memory() / 1e9, 3)
    for _ in gen: pass
    speeds = []
    for rep in range(5):
        to_first, rest, n = bench.timed(run(prompt, 128))
        speeds.append(round((n - 1) / rest, 1))
    out.update(peak_gb=round(mx.get_peak_memory() / 1e9, 3), decode_tok_s=sorted(speeds)[2], all=speeds)
else:
    eng = E.Engine(params, config, bench.NoEos(), "fast", max_batch=streams, prompt_cache_bytes=0)
    prompts = [mx.random.randint(0, config.vocab_size, (prompt_tokens,), key=mx.random.key(i)).tolist()
               for i in range(streams)]
    speeds = []
    for rep in range(4):
        hs = [eng.submit(E.Request(tuple(p), max_tokens=128)) for p in prompts]
        while len(eng.rows) < streams: eng.step()  # every prompt in: time the decoding
        t = time.perf_counter()
        while eng.step(): pass
        speeds.append(round(streams * 127 / (time.perf_counter() - t), 1))
    out.update(streams=streams, aggregate_tok_s=sorted(speeds[1:])[1], all=speeds,
               peak_gb=round(mx.get_peak_memory() / 1e9, 3))
print(json.dumps(out))
'''

def child(version, case, prompt, streams):
    env = dict(os.environ)
    if version == "before":
        env["PYTHONPATH"] = os.path.abspath(os.environ["BEFORE"])
    done = subprocess.run([sys.executable, "-c", CHILD, case, str(prompt), str(streams)], capture_output=True,
                          text=True, env=env)
    ok = done.returncode == 0 and done.stdout.strip()
    line = done.stdout.strip().splitlines()[-1] if ok else f'"failed": {done.stderr[-600:]!r}'
    print(version, line, flush=True)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    versions = ("before", "after") if os.environ.get("BEFORE") else ("after",)
    for _ in range(rounds):
        for version in versions:
            child(version, "ours", 512, 1)
        child("after", "sync", 512, 1)
        child("after", "mlx_lm", 512, 1)
        for version in versions:
            child(version, "ours", 128, 32)
        for case in ("sync", "nobatch"):
            child("after", case, 128, 32)


if __name__ == "__main__":
    main()
