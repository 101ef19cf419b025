"""The benchmark: ours and mlx_lm side by side, on the same weights, dtype and BLAS, in one process;
llama.cpp's llama-bench on the same model's F32 GGUF beside them, where `make llama-cpp` built it.

Contenders run alternately, trial by trial, after one warm-up run of each; each figure is the
median. Peak memory is measured for each contender in a subprocess of its own. The roofline is
bytes read per decoded token x decode tok/s / the machine's read bandwidth, measured in the
same run.
"""

from qwen2s import qwen2_scratch as q  # first: the model loads the fast BLAS before MLX

# isort: split
import contextlib
import ctypes
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

from qwen2s import blas, speculative, weights
from qwen2s.engine import Engine, Request, Stats
from qwen2s.say import say

__all__ = ["SHAPES", "run", "table", "run_speculative", "speculative_table"]


class BenchError(Exception):
    """The benchmark cannot run; the message says why."""


SHAPES = {  # the real Qwen2 shapes, for random-weight benchmarks (--shape)
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-7b": dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def bench_weights(model: str | None, shape: str | None, dtype: str):
    """(params, config, mlx_lm model sharing those very arrays, what was loaded)."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import qwen2 as ref

    if shape:
        raw = {"model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1e6, **SHAPES[shape]}
        # the bytes first: past the machine's memory MLX's allocation crashed (a 7B in float32 on 24 GB)
        weights.check_memory(weights.weight_bytes(q.config_from_dict(raw), dtype), f"the {shape} shape at {dtype}")
        reference = ref.Model(ref.ModelArgs.from_dict(raw))
        reference.set_dtype(getattr(mx, dtype))
        mx.eval(reference.parameters())
        params = tree_unflatten(tree_flatten(reference.parameters()))
        return params, q.config_from_dict(raw), reference, f"random weights, {shape} shape"
    folder = weights.resolve(model)
    raw = weights.read_config(folder)
    checked = weights.check_config(raw, folder / "config.json")  # before its numbers are used
    weights.check_memory(weights.weight_bytes(checked, dtype), f"the model {folder.name} at {dtype}")
    params, config = weights.load_params(folder, getattr(mx, dtype))
    reference = ref.Model(ref.ModelArgs.from_dict(raw))
    reference.update(params)  # the same arrays: no second copy of the weights
    return params, config, reference, str(folder)


def timed(tokens) -> tuple[float, float, int]:
    """Run a token generator: (seconds to the first token, seconds from the first to the last, count)."""
    tic = time.perf_counter()
    next(tokens)
    first = time.perf_counter()
    n = 1 + sum(1 for _ in tokens)
    return first - tic, time.perf_counter() - first, n


def run_ours(params, config, kernels):
    """Our engine (no prompt cache: every trial prefills its whole prompt), greedy, no end-of-sequence."""
    runner = Engine(params, config, NoEos(), kernels, max_batch=1, prompt_cache_bytes=0)

    def run(prompt, n):
        return (e.token for e in runner.generate(Request(tuple(prompt), max_tokens=n)) if e.token is not None)
    return run


class NoEos:
    """A tokenizer stand-in for timing: no end-of-sequence id, and a detokenizer that keeps nothing."""

    eos_token_ids = ()

    class detokenizer:  # noqa: N801  (the attribute name mlx_lm's wrapper uses)
        last_segment = ""

        @staticmethod
        def reset(): ...

        @staticmethod
        def add_token(token): ...

        @staticmethod
        def finalize(): ...


def random_weights_run(contender: str, shape: str, dtype: str, kernels: str = "fast"):
    """(run, params, config) of ours or "mlx_lm" on random weights of a real shape, keeping only that
    contender's arrays (params is None for mlx_lm)."""
    params, config, reference, _ = bench_weights(None, shape, dtype)
    if contender == "mlx_lm":
        return run_mlx_lm(reference), None, config
    return run_ours(params, config, kernels), params, config


def run_mlx_lm(model):
    from mlx_lm.generate import generate_step

    def run(prompt, n):
        return (t for t, _ in generate_step(mx.array(prompt), model, max_tokens=n))
    return run


def measure(run, prompts: dict, gen_tokens: int) -> dict:
    """Prefill tok/s at each prompt length; decode tok/s after the shortest prompt (mlx_lm's definitions)."""
    out = {}
    for i, (length, prompt) in enumerate(prompts.items()):
        to_first, rest, n = timed(run(prompt, gen_tokens if i == 0 else 1))
        out[f"prefill_{length}"] = length / to_first
        if i == 0:
            out["decode"] = (n - 1) / rest
    return out


class Bandwidth(NamedTuple):
    """The machine's read bandwidth: the best reader's GB/s, each reader's, and whether others ran meanwhile."""

    gbs: float
    readers: dict
    busy: bool


def others_running() -> int:
    """Runnable tasks on the machine besides this one (/proc/loadavg), 0 where that is not known."""
    try:
        return max(int(open("/proc/loadavg").read().split()[3].split("/")[0]) - 1, 0)
    except (OSError, IndexError, ValueError):
        return 0


def read_bandwidth() -> Bandwidth:
    """Best of 5 passes of each reader over 1 GiB: on the CPU numpy's matrix-vector product (OpenBLAS's
    threads) and plain sums with 1 to all cores' threads (our adapter's reader); on a GPU a bfloat16 sum."""
    import numpy as np

    busy = others_running() > 0
    if mx.default_device() == mx.gpu:  # best of 5 sums over a 4 GiB bfloat16 array
        a = mx.ones((32768, 65536), mx.bfloat16)
        mx.eval(a)
        readers = {"mx.sum": a.nbytes / min(timed_eval(lambda: mx.sum(a)) for _ in range(5)) / 1e9}
    else:
        a = np.ones((16384, 16384), np.float32)
        x = np.ones(16384, np.float32)
        best = float("inf")
        for _ in range(5):
            tic = time.perf_counter()
            a @ x
            best = min(best, time.perf_counter() - tic)
        readers = {"numpy sgemv": a.nbytes / best / 1e9}
        if (state := blas.load()).kind == "openblas":
            read = state.library.qwen2_scratch_read_seconds
            read.restype, read.argtypes = ctypes.c_double, [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int]
            for threads in range(1, (os.cpu_count() or 1) + 1):
                readers[f"sum, {threads} threads"] = a.nbytes / read(a.ctypes.data, a.size, threads, 5) / 1e9
    busy = busy or others_running() > 0
    return Bandwidth(max(readers.values()), readers, busy)


def warm_up_gpu(seconds: float = 5.0) -> None:
    """A few seconds of matmuls, so that a GPU reaches its working clock before anything is timed."""
    if mx.default_device() != mx.gpu:
        return
    a = mx.random.normal((8192, 8192)).astype(mx.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        mx.eval(a @ a)


def timed_eval(f) -> float:
    tic = time.perf_counter()
    mx.eval(f())
    return time.perf_counter() - tic


def bytes_per_token(params: dict, config: q.Config) -> int:
    """Bytes a decoded token reads: every weight, but only one row of an untied embedding table."""
    from mlx.utils import tree_flatten

    total = sum(v.nbytes for _, v in tree_flatten(params))
    if not config.tie_word_embeddings:
        table = params["model"]["embed_tokens"]["weight"]
        total -= table.nbytes - table.nbytes // table.shape[0]
    return total


def kv_cache_bytes(config: q.Config, tokens: int, itemsize: int) -> int:
    capacity = -(-tokens // q.CACHE_BLOCK) * q.CACHE_BLOCK
    return 2 * config.num_hidden_layers * config.num_key_value_heads * capacity * config.head_dim * itemsize


def probe(contender: str, model, shape, dtype, prompt_tokens: int, gen_tokens: int, env=None) -> dict:
    """One contender in a subprocess of its own: its peak memory (loading, prefill, decoding) and speeds."""
    args = [contender, model, shape, dtype, prompt_tokens, gen_tokens]
    done = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise BenchError(f"the memory probe of {contender} failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_probe(contender, model, shape, dtype, prompt_tokens, gen_tokens):
    """One contender alone in this process: load, generate, print its peak memory as JSON."""
    kernels = contender.removeprefix("ours-")
    if contender == "mlx_lm":
        if shape:
            _, config, reference, _ = bench_weights(None, shape, dtype)
        else:
            import mlx_lm

            reference, _ = mlx_lm.load(str(weights.resolve(model)))
            reference.set_dtype(getattr(mx, dtype))
            config = q.config_from_dict(weights.read_config(weights.resolve(model)))
        run = run_mlx_lm(reference)
    elif shape:
        params, config, _, _ = bench_weights(None, shape, dtype)
        run = run_ours(params, config, kernels)
    else:
        params, config = weights.load_params(weights.resolve(model), getattr(mx, dtype))
        run = run_ours(params, config, kernels)
    prompt = mx.random.randint(0, config.vocab_size, (prompt_tokens,), key=mx.random.key(0)).tolist()
    to_first, rest, n = timed(run(prompt, gen_tokens))
    print(json.dumps({"peak_gb": mx.get_peak_memory() / 1e9, f"prefill_{prompt_tokens}": prompt_tokens / to_first,
                      "decode": (n - 1) / rest}))


# ---------------------------------------------------------------------------------------------
# llama.cpp as a contender: its llama-bench on the packaged model's F32 GGUF, where `make llama-cpp` built them
# ---------------------------------------------------------------------------------------------

LLAMA_CPP_VERSION = "0.3.36"  # llama-cpp-python's sdist that `make llama-cpp` builds (the Makefile's LLAMA_CPP_VERSION)
LLAMA_CPP = "llama.cpp F32"  # its name among the contenders


class LlamaCpp(NamedTuple):
    """llama.cpp's llama-bench and the GGUF file it times."""

    binary: str
    gguf: str


def llama_cpp_dir() -> Path:
    """Where `make llama-cpp` builds llama.cpp and writes the packaged model's F32 and Q8_0 GGUF files."""
    return weights.cache_root() / f"llama.cpp-{LLAMA_CPP_VERSION}"


def find_llama_cpp(binary: str | None, model: str | None, shape: str | None) -> LlamaCpp | str:
    """llama-bench (binary, else `make llama-cpp`'s build) and the packaged model's F32 GGUF, or the one line the
    report gives instead: why llama.cpp is not timed, and how to get it."""
    if shape or model not in (None, "", weights.PACKAGED_NAME):
        return "llama.cpp: not timed (only the packaged model has a GGUF for it here)"
    try:
        folder = llama_cpp_dir()
    except weights.ModelError as e:
        return f"llama.cpp: not timed ({e})"
    found = LlamaCpp(binary or str(folder / "build" / "bin" / "llama-bench"), str(folder / "packaged-F32.gguf"))
    missing = [path for path in found if not os.path.isfile(path)]
    if missing:
        return f"llama.cpp: not timed ({' and '.join(missing)} not found; build them once with: make llama-cpp)"
    return found


def llama_bench_figures(output: str) -> dict:
    """llama-bench's JSON output (-o json) -> {"prefill_N": tok/s, ..., "decode": tok/s}, our figures' names."""
    figures = {}
    for test in json.loads(output):
        name = "decode" if test["n_gen"] > 0 else f"prefill_{test['n_prompt']}"
        figures[name] = test["avg_ts"]
    return figures


def run_llama_bench(llama: LlamaCpp, lengths, gen_tokens: int) -> str:
    """One run of each test (-r 1; llama-bench warms up first), on this process's cores: its JSON output."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    argv = [llama.binary, "-m", llama.gguf, "-t", str(threads), "-p", ",".join(map(str, lengths)),
            "-n", str(gen_tokens), "-r", "1", "-o", "json"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"llama-bench failed (exit code {done.returncode}): {done.stderr.strip()[-300:]}")
    return done.stdout


def llama_cpp_facts(llama: LlamaCpp) -> dict:
    """What the report says of the llama.cpp that ran: its files and build (llama-bench --version)."""
    done = subprocess.run([llama.binary, "--version"], capture_output=True, text=True)
    version = (done.stdout + done.stderr).strip().splitlines()
    ours = llama.binary == str(llama_cpp_dir() / "build" / "bin" / "llama-bench")
    return {"llama_bench": llama.binary, "gguf": llama.gguf, "version": version[0] if version else "unknown",
            "built_by": f"make llama-cpp: llama-cpp-python {LLAMA_CPP_VERSION}'s sdist" if ours else None}


def measure_llama_cpp(llama: LlamaCpp, lengths):
    """llama.cpp as a contender: gen_tokens -> its figures, as `measure` gives ours."""
    return lambda gen_tokens: llama_bench_figures(run_llama_bench(llama, lengths, gen_tokens))


def bench_int4(model, shape, dtype) -> dict:
    """What a user gets from mlx_lm by default: the int4 (group 64) model, 32-token prompt, 16 tokens."""
    from mlx_lm.utils import quantize_model

    _, config, reference, _ = bench_weights(model, shape, "bfloat16")
    with contextlib.redirect_stdout(sys.stderr):  # mlx_lm prints its bits per weight: stdout holds the table
        quantize_model(reference, {}, group_size=64, bits=4)
    mx.eval(reference.parameters())
    prompt = mx.random.randint(0, config.vocab_size, (32,), key=mx.random.key(1)).tolist()
    to_first, rest, n = timed(run_mlx_lm(reference)(prompt, 16))
    return {"prefill_32": 32 / to_first, "decode": (n - 1) / rest}


def package_version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


def spread(values: list[float]) -> float:
    """(max - min) / median of one figure over the trials: how far a single trial's number can be trusted."""
    return (max(values) - min(values)) / statistics.median(values)


def versus(results: dict, base: str, suffix: str, figures) -> dict:
    """Each contender's figures over contender base's: {name: {f"{figure}_vs_{suffix}": its / base's}}."""
    return {name: {f"{f}_vs_{suffix}": r[f] / results[base][f] for f in figures} for name, r in results.items()}


def run(model=None, shape=None, dtype=None, kernels=("reference", "fast"), lengths=(128, 512), gen_tokens=128,
        trials=3, int4=True, command="", llama_bench=None) -> dict:
    """Time ours (each of kernels), mlx_lm and, where it is built, llama.cpp, alternately, and measure memory and
    the roofline: the report. llama_bench: llama-bench's path [default: `make llama-cpp`'s build]."""
    dtype = dtype or ("bfloat16" if mx.default_device() == mx.gpu else "float32")
    lengths = sorted(set(lengths))
    params, config, reference, source = bench_weights(model, shape, dtype)
    positions = config.max_position_embeddings
    if lengths[-1] >= positions:  # the engine would refuse the prompt mid-run
        raise BenchError(f"--prompt-tokens {lengths[-1]} is beyond the model's {positions} positions "
                         "(max_position_embeddings)")
    if lengths[0] + gen_tokens > positions:  # ours would stop at the context, mlx_lm would go on
        raise BenchError(f"--prompt-tokens {lengths[0]} and --gen-tokens {gen_tokens} are beyond the model's "
                         f"{positions} positions (max_position_embeddings)")
    runs = {f"ours-{k}": run_ours(params, config, k) for k in kernels} | {"mlx_lm": run_mlx_lm(reference)}
    key = mx.random.key(0)
    prompts = {n: mx.random.randint(0, config.vocab_size, (n,), key=key).tolist() for n in lengths}
    llama = find_llama_cpp(llama_bench, model, shape)
    timers = {name: functools.partial(measure, contender, prompts) for name, contender in runs.items()}
    if isinstance(llama, LlamaCpp):  # the same prompt lengths and tokens, one llama-bench run a trial
        timers[LLAMA_CPP] = measure_llama_cpp(llama, lengths)
    else:
        say(llama)
    say(f"bench: {source}, {dtype}, {mx.default_device()}, BLAS {blas.describe()}")
    probes = [read_bandwidth()]  # apart from the trials: before them and after
    warm_up_gpu()
    for timer in timers.values():  # warm-up: compile and trace every shape the trials use
        timer(min(gen_tokens, 16))
    figures = {name: [] for name in timers}
    for trial in range(trials):
        for name, timer in timers.items():
            figures[name].append(timer(gen_tokens))
            numbers = ", ".join(f"{k} {v:.2f}" for k, v in figures[name][-1].items())
            say(f"  trial {trial + 1}/{trials} {name}: {numbers}")
    probes.append(read_bandwidth())
    bandwidth = max(p.gbs for p in probes)
    busy = any(p.busy for p in probes) or min(p.gbs for p in probes) < 0.85 * bandwidth
    per_token = bytes_per_token(params, config)
    results = {}
    for name, rows in figures.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        med["roofline"] = per_token * med["decode"] / (bandwidth * 1e9)
        results[name] = med
    compared = ["decode", *(f"prefill_{n}" for n in lengths)]
    vs_mlx_lm = versus(results, "mlx_lm", "mlx_lm", compared)
    vs_llama_cpp = versus(results, LLAMA_CPP, "llama_cpp", compared) if LLAMA_CPP in results else {}
    results = {name: med | vs_mlx_lm[name] | vs_llama_cpp.get(name, {}) for name, med in results.items()}
    del params, reference, runs
    mx.clear_cache()
    itemsize = mx.array(0, getattr(mx, dtype)).itemsize
    weights_bytes = per_token if config.tie_word_embeddings else per_token + (
        config.vocab_size - 1) * config.hidden_size * itemsize
    floor = weights_bytes + kv_cache_bytes(config, lengths[-1] + 16, itemsize)
    for name in [n for n in results if n != LLAMA_CPP]:  # llama.cpp's own memory is not measured
        peak = probe(name, model, shape, dtype, lengths[-1], 16)["peak_gb"]
        results[name]["peak_gb"] = peak
        results[name]["peak_vs_weights_and_kv"] = peak * 1e9 / floor
    return {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "source": source, "dtype": dtype, "device": device_name(), "blas": blas.describe(),
        "mlx": mx.__version__, "mlx_lm": package_version("mlx-lm"),
        "prompt_tokens": lengths, "gen_tokens": gen_tokens, "trials": trials,
        "read_bandwidth_gbs": bandwidth, "bandwidth_probes": [p._asdict() for p in probes], "machine_busy": busy,
        "bytes_per_token": per_token,
        "weights_and_kv_bytes": floor, "results": results, "trials_by_contender": figures,
        "spreads": {name: {k: spread([r[k] for r in rows]) for k in rows[0]} for name, rows in figures.items()},
        "mlx_lm_default_int4": bench_int4(model, shape, dtype) if int4 else None,
        # mlx_lm as pip installs it on Linux: MLX's reference BLAS (a process without our adapter)
        "mlx_lm_stock_blas": probe("mlx_lm", model, shape, dtype, 32, 16, {"QWEN2_SCRATCH_BLAS": "reference"})
        if int4 and mx.default_device() == mx.cpu else None,
        "llama_cpp": llama_cpp_facts(llama) if isinstance(llama, LlamaCpp) else None,
        "llama_cpp_missing": None if isinstance(llama, LlamaCpp) else llama,
    }


# ---------------------------------------------------------------------------------------------
# Speculative decoding: two workloads, each with and without it (bench --speculative)
# ---------------------------------------------------------------------------------------------

EDIT_CODE = '''import json
import os


def load_records(path):
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def group_by(records, key):
    groups = {}
    for record in records:
        groups.setdefault(record[key], []).append(record)
    return groups


def summarize(groups, field):
    summary = {}
    for name, items in groups.items():
        values = [item[field] for item in items if field in item]
        if values:
            summary[name] = {
                "count": len(values),
                "mean": sum(values) / len(values),
                "min": min(values),
                "max": max(values),
            }
    return summary


def save_summary(summary, folder, name):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + ".json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    return path


def top_groups(summary, n):
    ranked = sorted(summary.items(), key=lambda item: item[1]["mean"], reverse=True)
    return [name for name, _ in ranked[:n]]


def main(path, key, field, folder):
    records = load_records(path)
    summary = summarize(group_by(records, key), field)
    print("best:", ", ".join(top_groups(summary, 3)))
    return save_summary(summary, folder, field)
'''  # 316 tokens

WORKLOADS = {  # name: (the user's message, tokens to generate)
    "code edit": ("Add type hints and docstrings to this code. Reply with the code only.\n\n```python\n"
                  + EDIT_CODE + "```", 256),
    "question": ("Why do some programming languages use garbage collection and others do not? "
                 "Explain the trade-offs.", 128),
}


def verifier_cost(params, config, kernels, ks, context=512, trials=7) -> dict:
    """Time of one verifier step over k+1 tokens / one decode step, at `context` cached tokens: medians by k."""
    prompt = mx.random.randint(0, config.vocab_size, (1, context), key=mx.random.key(2))
    _, cache = q.prefill(params, config, prompt, q.new_cache(config, dtype=params["model"]["norm"]["weight"].dtype),
                         kernels)
    cache = q.reserve(cache, context + max(ks) + 1)

    def step(length):
        tokens = mx.ones((1, length), mx.int32)
        return timed_eval(lambda: q.compiled_decode_step(params, config, tokens, cache, kernels))

    for length in [1, *(k + 1 for k in ks)]:  # traces
        step(length)
    ratios = {k: [] for k in ks}
    for _ in range(trials):  # alternated, each step against the decode step just before it
        for k in ks:
            decode = step(1)
            ratios[k].append(step(k + 1) / decode)
    return {k: statistics.median(r) for k, r in ratios.items()}


def decode_workload(params, config, tokenizer, prompt, kernels, max_tokens, k) -> tuple[list[int], Stats]:
    """Greedy decoding of prompt, plain (k = 0) or with prompt lookup proposing k: (tokens, stats)."""
    runner = Engine(params, config, tokenizer, kernels, max_batch=1, prompt_cache_bytes=0,
                    proposer=speculative.Lookup() if k else None, num_draft=k or speculative.NUM_DRAFT)
    events = list(runner.generate(Request(tuple(prompt), max_tokens=max_tokens)))
    return [e.token for e in events if e.token is not None], events[-1].stats


def run_speculative(model=None, shape=None, dtype=None, kernels="reference", ks=(4, 8), trials=3, command="") -> dict:
    """Both workloads, greedy, plain and with prompt lookup at each k, alternately; and the verifier's cost.

    With --shape (random weights, which accept nothing) only the verifier's cost is measured.
    """
    dtype = dtype or ("bfloat16" if mx.default_device() == mx.gpu else "float32")
    params, config, _, source = bench_weights(model, shape, dtype)
    say(f"bench --speculative: {source}, {dtype}, {mx.default_device()}, BLAS {blas.describe()}")
    warm_up_gpu()
    report = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "source": source, "dtype": dtype,
              "device": device_name(), "blas": blas.describe(), "mlx": mx.__version__, "trials": trials,
              "verifier_cost": verifier_cost(params, config, kernels, ks), "workloads": {}}
    say(f"  verifier step / decode step: {report['verifier_cost']}")
    if shape:
        return report
    tokenizer = weights.load_tokenizer(weights.resolve(model))
    contenders = {"plain": 0} | {f"lookup k={k}": k for k in ks}
    for name, (text, max_tokens) in WORKLOADS.items():
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        for k in contenders.values():  # warm-up: traces
            decode_workload(params, config, tokenizer, prompt, kernels, 16, k)
        runs = {c: [] for c in contenders}
        for trial in range(trials):
            for c, k in contenders.items():
                runs[c].append(decode_workload(params, config, tokenizer, prompt, kernels, max_tokens, k))
                say(f"  {name}, trial {trial + 1}/{trials}, {c}: {runs[c][-1][1].generation_tps:.2f} tok/s")
        plain_tps = statistics.median(s.generation_tps for _, s in runs["plain"])
        rows = {}
        for c, results in runs.items():
            (tokens, last), tps = results[-1], statistics.median(s.generation_tps for _, s in results)
            rows[c] = {"prompt_tokens": len(prompt), "tokens": len(tokens), "decode": tps,
                       "speedup": tps / plain_tps, "same_as_plain": tokens == runs["plain"][-1][0]}
            if last.verify_steps:
                rows[c]["acceptance"] = last.accepted / max(last.proposed, 1)
                rows[c]["tokens_per_step"] = (last.accepted + last.verify_steps) / last.verify_steps
        report["workloads"][name] = rows
    return report


def speculative_table(r: dict) -> str:
    lines = ["verifier step over k+1 tokens / decode step: "
             + ", ".join(f"k={k}: {v:.2f}x" for k, v in r["verifier_cost"].items())]
    for name, rows in r["workloads"].items():
        for c, row in rows.items():
            spec = (f", acceptance {row['acceptance']:.0%}, {row['tokens_per_step']:.2f} tokens/step"
                    if "acceptance" in row else "")
            lines.append(f"{name:<10} {c:<12} {row['decode']:6.2f} tok/s ({row['speedup']:.2f}x plain), "
                         f"{row['tokens']} tokens{spec}{'' if row['same_as_plain'] else ', OUTPUT DIFFERS'}")
    lines.append(f"{r['source']} | {r['dtype']} | {r['device']} | BLAS {r['blas']} | MLX {r['mlx']} | {r['date']}")
    return "\n".join(lines)


def device_name() -> str:
    import platform

    if mx.default_device() == mx.gpu:
        info = mx.device_info() if hasattr(mx, "device_info") else {}
        return f"gpu: {info.get('device_name', 'unknown')}"
    return f"cpu: {platform.machine()}, {os.cpu_count()} cores"


def table(r: dict) -> str:
    names = list(r["results"])
    rows = [("", names)]

    def row(figure):  # "-" where a contender has no such figure (llama.cpp's memory)
        return [f"{r['results'][k][figure]:.2f}" if figure in r["results"][k] else "-" for k in names]

    for figure, label in [*((f"prefill_{n}", f"prefill {n} tok/s") for n in r["prompt_tokens"]),
                          ("decode", f"decode tok/s ({r['gen_tokens']} tokens)")]:
        rows.append((label, row(figure)))
        rows.append(("  x mlx_lm", row(f"{figure}_vs_mlx_lm")))
        if r.get("llama_cpp"):
            rows.append((f"  x {LLAMA_CPP}", row(f"{figure}_vs_llama_cpp")))
    rows.append(("  % of roofline", [f"{100 * r['results'][k]['roofline']:.0f}%" for k in names]))
    rows.append(("peak memory GB", row("peak_gb")))
    rows.append(("  x (weights + KV)", row("peak_vs_weights_and_kv")))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}" + "".join(f"{c:>16}" for c in cells) for label, cells in rows]
    lines.append("spread over the trials ((max - min) / median): " + "; ".join(
        f"{name}: " + ", ".join(f"{k.replace('_', ' ')} {100 * v:.0f}%" for k, v in s.items())
        for name, s in r["spreads"].items()))
    lines.append(f"roofline: {r['bytes_per_token'] / 1e9:.3f} GB read per token at {r['read_bandwidth_gbs']:.1f} GB/s "
                 f"= {r['read_bandwidth_gbs'] * 1e9 / r['bytes_per_token']:.2f} tok/s (the best reader of "
                 f"{', '.join(r['bandwidth_probes'][0]['readers'])}, before and after the trials)")
    if r["machine_busy"]:
        lines.append("warning: the machine was busy (other tasks runnable, or the probes before and after the trials "
                     "differ by more than 15%): these figures are not reliable")
    if r.get("llama_cpp"):
        lines.append(f"{LLAMA_CPP}: {r['llama_cpp']['version']}, llama-bench -r 1 a trial on {r['llama_cpp']['gguf']} "
                     "(its decode starts from an empty cache, ours after the shortest prompt)")
    if r.get("llama_cpp_missing"):
        lines.append(r["llama_cpp_missing"])
    if r.get("mlx_lm_stock_blas"):
        d = r["mlx_lm_stock_blas"]
        lines.append(f"mlx_lm on MLX's own reference BLAS ({r['dtype']}; 32-token prompt, 16 tokens): prefill "
                     f"{d['prefill_32']:.2f} tok/s, decode {d['decode']:.2f} tok/s")
    if r["mlx_lm_default_int4"]:
        d = r["mlx_lm_default_int4"]
        lines.append(f"mlx_lm default (int4, group 64; 32-token prompt, 16 tokens): prefill {d['prefill_32']:.2f} "
                     f"tok/s, decode {d['decode']:.2f} tok/s")
    lines.append(f"{r['source']} | {r['dtype']} | {r['device']} | BLAS {r['blas']} | MLX {r['mlx']} | "
                 f"mlx_lm {r['mlx_lm']} | {r['date']}")
    return "\n".join(lines)


if __name__ == "__main__":  # the memory probe: one contender alone in a fresh process
    run_probe(*json.loads(sys.argv[1]))


# ---------------------------------------------------------------------------------------------
# bench --serve: many clients at once against our server and mlx_lm.server, on the same weights and BLAS
# ---------------------------------------------------------------------------------------------

SERVE_QUESTIONS = [
    "Write a short story about a lighthouse keeper.", "Explain how a hash map works.",
    "Describe the water cycle in detail.", "Write a Python function that sorts a list, and explain it.",
    "What are the benefits of unit tests?", "Tell me about the history of the bicycle.",
    "Explain recursion to a beginner.", "Describe a walk through a forest in autumn.",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ended_with_parent() -> None:
    """In a server's process before it runs (Linux): SIGTERM once the bench's process ends, however it ends. A bench
    killed (by `timeout`, or a test's time limit) had left both servers running, decoding for clients long gone."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_server(argv: list[str], port: int, env: dict) -> subprocess.Popen:
    """A server in a process of its own, once /v1/models answers."""
    import httpx

    log = tempfile.TemporaryFile()  # not a pipe: a server that logs every request would fill it and stall
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=log,
                            preexec_fn=ended_with_parent if sys.platform == "linux" else None)
    for _ in range(600):
        if proc.poll() is not None:
            log.seek(0)
            raise BenchError(f"{argv[0]} {argv[1:3]} exited: {log.read().decode(errors='replace')[-500:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        time.sleep(0.5)
    proc.kill()
    raise BenchError(f"{argv[0]} did not answer on port {port} within 300 s")


def mlx_lm_folder(folder, dtype: str) -> str:
    """The model as an mlx_lm folder of dtype (converted once into our cache), for mlx_lm.server."""
    out = weights.cache_root() / f"mlx-lm-{dtype}" / folder.name
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(folder), "--mlx-path", str(out),
                        "--dtype", dtype], check=True, capture_output=True)
    return str(out)


def one_client(port: int, question: str, max_tokens: int, started: threading.Event | None = None,
               until: threading.Event | None = None) -> dict:
    """One streamed greedy chat completion: time to first token, latency, tokens (started is set at the first; the
    client leaves once `until` is set)."""
    import httpx

    body = {"messages": [{"role": "user", "content": question}], "temperature": 0,  # each server's own model
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    tic, first, chunks, usage = time.perf_counter(), None, 0, None
    try:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=3600) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                usage = data.get("usage") or usage
                if data.get("choices") and data["choices"][0].get("delta", {}).get("content"):
                    first = first or time.perf_counter()
                    chunks += 1
                    if started is not None:
                        started.set()
                if until is not None and until.is_set():
                    break
    finally:
        if started is not None:  # an answer without content, or a failed request, keeps no one waiting
            started.set()
    tokens = usage["completion_tokens"] if usage else chunks
    return {"ttft": (first or time.perf_counter()) - tic, "latency": time.perf_counter() - tic, "tokens": tokens}


def failed(port: int, e: Exception) -> BenchError:
    return BenchError(f"the server on port {port} failed a request: {type(e).__name__}: {e}")


def burst(port: int, clients: int, max_tokens: int) -> dict:
    """`clients` requests at once: aggregate tokens/s, and time-to-first-token and latency percentiles."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    tic = time.perf_counter()
    try:
        with ThreadPoolExecutor(clients) as pool:
            runs = list(pool.map(lambda i: one_client(port, SERVE_QUESTIONS[i % len(SERVE_QUESTIONS)], max_tokens),
                                 range(clients)))
    except httpx.HTTPError as e:
        raise failed(port, e) from None
    wall = time.perf_counter() - tic

    def pct(key, p):
        values = sorted(r[key] for r in runs)
        return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]

    return {"tokens_per_s": sum(r["tokens"] for r in runs) / wall, "tokens": sum(r["tokens"] for r in runs),
            "ttft_p50": pct("ttft", 50), "ttft_p95": pct("ttft", 95),
            "latency_p50": pct("latency", 50), "latency_p95": pct("latency", 95)}


SHORT = ("alone", "while_streaming", "ratio", "restarts")  # a short request's figures, medians over trials


def stream_until(port: int, question: str, started: threading.Event, done: threading.Event) -> int:
    """A client streaming an answer until done is set, asking again whenever one ends (some greedy answers of the
    packaged model end within 14 tokens): -> how many answers ended before done."""
    ended = -1
    while not done.is_set():
        one_client(port, question, 16384, started, done)
        ended += 1
    return ended


def short_request_ttft(port: int, streams: int = 8, samples: int = 3, seed: int = 0) -> dict:
    """Time to first token of a short request alone, and while `streams` others decode: medians of `samples`. Each
    request while they decode is sent after a random pause (up to half a second), since a request arrives at any
    moment of a step, not just as one begins: sent as the last stream's first token came, it had always waited for
    a whole step. Each stream asks again when its answer ends (`restarts` counts those), and all leave once the
    samples are done."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    question, pause = "Say hi.", random.Random(seed)
    started, done = [threading.Event() for _ in range(streams)], threading.Event()
    try:
        alone = [one_client(port, question, 4)["ttft"] for _ in range(samples)]
        with ThreadPoolExecutor(streams) as pool:
            running = [pool.submit(stream_until, port, SERVE_QUESTIONS[i % len(SERVE_QUESTIONS)], started[i], done)
                       for i in range(streams)]
            try:
                for event in started:
                    event.wait(600)
                loaded = []
                for _ in range(samples):
                    time.sleep(pause.uniform(0, 0.5))
                    loaded.append(one_client(port, question, 4)["ttft"])
            finally:
                done.set()  # the streams leave, whatever happened
            restarts = sum(future.result() for future in running)
    except httpx.HTTPError as e:
        raise failed(port, e) from None
    time.sleep(1)  # the streams left: both servers free their rows at their next step
    return {"alone": statistics.median(alone), "while_streaming": statistics.median(loaded),
            "ratio": statistics.median(loaded) / statistics.median(alone), "restarts": restarts,
            "alone_samples": alone, "while_streaming_samples": loaded}


def run_serve(model=None, dtype=None, levels=(1, 8, 32), max_tokens=48, trials=1, parallel=None, command="") -> dict:
    """Ours (`qwen2-scratch serve`) and mlx_lm.server side by side, alternating level by level and trial by trial."""
    dtype = dtype or ("bfloat16" if mx.default_device() == mx.gpu else "float32")
    folder = weights.resolve(model)
    ports = {"ours": free_port(), "mlx_lm": free_port()}
    # greedy clients get the argmax on both: mlx_lm.server applies no penalty a request does not ask for, where ours
    # would apply the model's generation_config (the packaged model's repetition penalty, 1.05)
    ours = [sys.executable, "-m", "qwen2s.cli", "serve", "--port", str(ports["ours"]), "--dtype", dtype,
            "--repetition-penalty", "1"]
    ours += (["--model", model] if model else []) + (["--parallel", str(parallel)] if parallel else [])
    theirs = [sys.executable, "-m", "mlx_lm", "server", "--port", str(ports["mlx_lm"]), "--model",
              mlx_lm_folder(folder, dtype)]
    env = {}
    if (state := blas.load()).kind == "openblas":  # our BLAS under mlx_lm too: the same matmuls
        env = {"LD_PRELOAD": str(state.adapter), "LD_LIBRARY_PATH": str(blas.library_dir())}
    procs = {}
    try:
        procs["ours"] = start_server(ours, ports["ours"], {})
        procs["mlx_lm"] = start_server(theirs, ports["mlx_lm"], env)
        for n in levels:  # warm-up: every batch size and cache capacity the trials reach is traced once
            for port in ports.values():
                burst(port, n, max_tokens)
        results = {name: {n: [] for n in levels} for name in ports}
        short = {name: [] for name in ports}
        for trial in range(trials):
            for n in levels:
                for name, port in ports.items():
                    results[name][n].append(burst(port, n, max_tokens))
                    say(f"  serve, trial {trial + 1}/{trials}, {n} clients, {name}: "
                        f"{results[name][n][-1]['tokens_per_s']:.2f} tok/s")
            for name, port in ports.items():
                short[name].append(short_request_ttft(port, 8, seed=trial))
                say(f"  serve, trial {trial + 1}/{trials}, a short request while 8 stream, {name}: time to first "
                    f"token {short[name][-1]['while_streaming']:.2f} s ({short[name][-1]['ratio']:.2f}x alone)")
    finally:
        for proc in procs.values():
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
    medians = {name: {n: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for n, runs in by_n.items()}
               for name, by_n in results.items()}
    return {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "source": str(folder), "dtype": dtype,
            "device": device_name(), "blas": blas.describe(), "mlx": mx.__version__,
            "mlx_lm": package_version("mlx-lm"), "max_tokens": max_tokens, "trials": trials, "results": medians,
            "runs": results, "short_request": {name: {k: statistics.median(r[k] for r in runs) for k in SHORT}
                                               for name, runs in short.items()}, "short_request_runs": short}


def serve_table(r: dict) -> str:
    head = ("clients", "contender", "tok/s", "ttft p50", "ttft p95", "lat p50", "lat p95")
    lines = ["{:>7} {:<9} {:>8} {:>9} {:>9} {:>8} {:>8}".format(*head)]
    for n in r["results"]["ours"]:
        for name in r["results"]:
            m = r["results"][name][n]
            lines.append(f"{n:>7} {name:<9} {m['tokens_per_s']:8.2f} {m['ttft_p50']:8.2f}s {m['ttft_p95']:8.2f}s "
                         f"{m['latency_p50']:7.2f}s {m['latency_p95']:7.2f}s")
    for name, s in r.get("short_request", {}).items():
        lines.append(f"a short request's time to first token, {name}: {s['alone']:.2f} s alone, "
                     f"{s['while_streaming']:.2f} s while 8 stream ({s['ratio']:.2f}x)")
    lines.append(f"{r['source']} | {r['dtype']} | {r['device']} | BLAS {r['blas']} | MLX {r['mlx']} | {r['date']}")
    return "\n".join(lines)
