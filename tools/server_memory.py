"""Resident memory of `qwen2-scratch serve` after 100 and after 1,000 mixed requests (the engine's leak check).

    python tools/server_memory.py [--model M] [--requests 1000] [--clients 8] [--json FILE]

Mixed requests, 8 at a time: streamed and not, chat and plain completions, stop strings, seeds, prompts that
share prefixes (prompt-cache hits) and prompts that do not, streams the client drops after two chunks and
non-streamed requests it gives up on (cancellations). Prints the server's VmRSS after the first 100 and
after all, and their ratio (the target: within 10%).
"""

import argparse
import json
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

TOPICS = ["the sea", "a fox", "prime numbers", "hash maps", "the moon", "bread", "rivers", "chess"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def one_request(url: str, i: int) -> str:
    rng = random.Random(i)
    kind = ["stream", "plain", "stop", "completion", "drop", "give_up"][i % 6]
    shared = "You are a helpful assistant who answers briefly. " * rng.choice([1, 4, 12])
    body = {"messages": [{"role": "system", "content": shared},
                         {"role": "user", "content": f"Tell me about {rng.choice(TOPICS)} ({i})."}],
            "max_tokens": rng.randint(1, 24), "temperature": rng.choice([0, 0.8]), "seed": i}
    try:
        if kind == "completion":
            httpx.post(f"{url}/completions", json={"prompt": f"{shared} {i}", "max_tokens": body["max_tokens"]},
                       timeout=600).raise_for_status()
        elif kind in ("stream", "drop"):
            with httpx.stream("POST", f"{url}/chat/completions", json={**body, "stream": True}, timeout=600) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if kind == "drop" and n >= 2:
                        break
        elif kind == "give_up":
            httpx.post(f"{url}/chat/completions", json={**body, "max_tokens": 200}, timeout=0.05)
        else:
            extra = {"stop": ["e", "th"]} if kind == "stop" else {}
            httpx.post(f"{url}/chat/completions", json={**body, **extra}, timeout=600).raise_for_status()
    except httpx.TimeoutException:
        if kind != "give_up":
            raise
    return kind


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", default=None)
    a = parser.parse_args()
    port = free_port()
    model = ["--model", a.model] if a.model else []
    argv = [sys.executable, "-m", "qwen2s.cli", "serve", "--port", str(port), *model]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        marks, tic = {}, time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            for start, stop in ((0, 100), (100, a.requests)):
                list(pool.map(lambda i: one_request(url, i), range(start, stop)))
                time.sleep(1.0)  # the rows given up on are cancelled at the next step
                marks[stop] = rss_mb(server.pid)
                print(f"after {stop} requests: VmRSS {marks[stop]:.1f} MB ({time.perf_counter() - tic:.0f} s)",
                      flush=True)
    finally:
        server.terminate()
        server.wait(30)
    ratio = marks[a.requests] / marks[100]
    print(f"ratio {ratio:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "model": a.model, "rss_mb": marks, "ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
