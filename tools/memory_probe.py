"""Peak memory and decode speed, ours (fixed-shape steps, or steps as they come) against mlx_lm, random 0.5B weights.

    python tools/memory_probe.py   (on a GPU machine: bfloat16, prompts of 512 and 4,096 tokens, 64 decoded)

Each case runs in a process of its own and prints one JSON line. peak_load_gb includes making the weights; the
other peaks start after it: peak_prefill_gb over a first run's prefill, peak_gb over that run and a timed one.
"""

import subprocess
import sys

CHILD = r'''
import gc, json, sys
from qwen2s import bench, qwen2_scratch as q
import mlx.core as mx
case, prompt_tokens = sys.argv[1], int(sys.argv[2])
if case == "ours-rows-off":
    q.STEP_ROWS["gpu"] = None
run, params, config = bench.random_weights_run(case, "qwen2-0.5b", "bfloat16")
del params
gc.collect()
mx.clear_cache()
peak_load = mx.get_peak_memory() / 1e9
mx.reset_peak_memory()
loaded = mx.get_active_memory() / 1e9
prompt = mx.random.randint(0, config.vocab_size, (prompt_tokens,), key=mx.random.key(0)).tolist()
gen = run(prompt, 2)
next(gen)
peak_prefill = mx.get_peak_memory() / 1e9
for _ in gen:
    pass
to_first, rest, n = bench.timed(run(prompt, 64))
print(json.dumps({"case": case, "prompt": prompt_tokens, "peak_load_gb": round(peak_load, 3),
                  "active_after_load_gb": round(loaded, 3), "peak_prefill_gb": round(peak_prefill, 3),
                  "peak_gb": round(mx.get_peak_memory() / 1e9, 3), "decode_tok_s": round((n - 1) / rest, 1)}))
'''


def main():
    for prompt in (512, 4096):
        for case in ("ours", "ours-rows-off", "mlx_lm"):
            done = subprocess.run([sys.executable, "-c", CHILD, case, str(prompt)], capture_output=True, text=True)
            failed = f"{case} failed: {done.stderr[-800:]}"
            print(done.stdout.strip().splitlines()[-1] if done.returncode == 0 else failed, flush=True)


if __name__ == "__main__":
    main()
