"""Prefill and decode speed on a machine with more runnable threads than cores: ours against MLX's reference BLAS.

    python tools/oversubscribed.py [--load 4] [--trials 3] [--tokens 32] [--json FILE]

Starts --load busy loops (each wants a core), then runs `qwen2-scratch generate` on the packaged model with
our BLAS and with QWEN2_SCRATCH_BLAS=reference (MLX's own one-threaded BLAS), alternately, --trials times;
prints the medians of the prefill and decode tok/s each reports. With --load 0, the same on a quiet machine.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

PROMPT = "Explain in detail how a hash map works, with its collisions, resizing and the cost of each operation. " * 2
STATS = re.compile(r"prefill: (\d+) tokens, ([\d.]+) tok/s \| decode: (\d+) tokens, ([\d.]+) tok/s")


def one_run(tokens: int, blas: str) -> tuple[float, float]:
    env = {**os.environ, **({"QWEN2_SCRATCH_BLAS": "reference"} if blas == "reference" else {})}
    done = subprocess.run([sys.executable, "-m", "qwen2s.cli", "generate", "--prompt", PROMPT, "--max-tokens",
                           str(tokens), "--temp", "0"], capture_output=True, text=True, env=env)
    found = STATS.search(done.stderr)
    if done.returncode != 0 or not found:
        raise SystemExit(f"generate failed ({blas}): {done.stderr[-500:]}")
    return float(found.group(2)), float(found.group(4))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=int, default=4, help="busy loops to start (2 cores and 4: 3x oversubscribed)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", default=None)
    a = parser.parse_args()
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.load)]
    runs = {"ours": [], "reference": []}
    try:
        time.sleep(1)
        for trial in range(a.trials):
            for blas in runs:
                runs[blas].append(one_run(a.tokens, blas))
                print(f"trial {trial + 1}, {blas}: prefill {runs[blas][-1][0]:.2f} tok/s, "
                      f"decode {runs[blas][-1][1]:.2f} tok/s", flush=True)
    finally:
        for loop in loops:
            loop.kill()
    report = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": os.cpu_count(),
              "load": a.load, "trials": a.trials,
              "median": {k: {"prefill_tok_s": statistics.median(r[0] for r in v),
                             "decode_tok_s": statistics.median(r[1] for r in v)} for k, v in runs.items()},
              "runs": runs}
    print(json.dumps(report["median"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
