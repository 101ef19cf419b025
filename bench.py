"""The benchmark: ours and mlx_lm side by side, on the same weights, dtype and BLAS, in one process.

Contenders run alternately, trial by trial, after one warm-up run of each; each figure is the
median. Peak memory is measured for each contender in a subprocess of its own. The roofline is
bytes read per decoded token x decode tok/s / the machine's read bandwidth, measured in the
same run.
"""

import qwen2_scratch as q  # first: the model loads the fast BLAS before MLX

# isort: split
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import mlx.core as mx

import blas
import speculative
import weights

__all__ = ["SHAPES", "run", "table", "run_speculative", "speculative_table"]


class BenchError(Exception):
    """The benchmark cannot run; the message says why."""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


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
    weights.check_memory(weights.weight_bytes(q.config_from_dict(raw), dtype), f"the model {folder.name} at {dtype}")
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
    def run(prompt, n):
        cache = q.new_cache(config, dtype=params["model"]["norm"]["weight"].dtype)
        return q.generate_tokens(params, config, prompt, cache, max_tokens=n, kernels=kernels)
    return run


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


def read_bandwidth_gbs() -> float:
    """The machine's read bandwidth: best of 5 numpy float32 matrix-vector products over 1 GiB."""
    import numpy as np

    if mx.default_device() == mx.gpu:  # best of 5 sums over a 4 GiB bfloat16 array
        a = mx.ones((32768, 65536), mx.bfloat16)
        mx.eval(a)
        best = min(timed_eval(lambda: mx.sum(a)) for _ in range(5))
        return a.nbytes / best / 1e9
    a = np.ones((16384, 16384), np.float32)
    x = np.ones(16384, np.float32)
    best = float("inf")
    for _ in range(5):
        tic = time.perf_counter()
        a @ x
        best = min(best, time.perf_counter() - tic)
    return a.nbytes / best / 1e9


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


def run(model=None, shape=None, dtype=None, kernels=("reference", "fast"), lengths=(128, 512), gen_tokens=128,
        trials=3, int4=True, command="") -> dict:
    """Time ours (each of kernels) and mlx_lm, alternately, and measure memory and the roofline: the report."""
    dtype = dtype or ("bfloat16" if mx.default_device() == mx.gpu else "float32")
    lengths = sorted(set(lengths))
    params, config, reference, source = bench_weights(model, shape, dtype)
    runs = {f"ours-{k}": run_ours(params, config, k) for k in kernels} | {"mlx_lm": run_mlx_lm(reference)}
    key = mx.random.key(0)
    prompts = {n: mx.random.randint(0, config.vocab_size, (n,), key=key).tolist() for n in lengths}
    log(f"bench: {source}, {dtype}, {mx.default_device()}, BLAS {blas.describe()}")
    warm_up_gpu()
    for contender in runs.values():  # warm-up: compile and trace every shape the trials use
        measure(contender, prompts, min(gen_tokens, 16))
    figures = {name: [] for name in runs}
    for trial in range(trials):
        for name, contender in runs.items():
            figures[name].append(measure(contender, prompts, gen_tokens))
            numbers = ", ".join(f"{k} {v:.2f}" for k, v in figures[name][-1].items())
            log(f"  trial {trial + 1}/{trials} {name}: {numbers}")
    bandwidth = read_bandwidth_gbs()
    per_token = bytes_per_token(params, config)
    results = {}
    for name, rows in figures.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        med["roofline"] = per_token * med["decode"] / (bandwidth * 1e9)
        results[name] = med
    for name in results:
        results[name]["decode_vs_mlx_lm"] = results[name]["decode"] / results["mlx_lm"]["decode"]
        for n in lengths:
            results[name][f"prefill_{n}_vs_mlx_lm"] = results[name][f"prefill_{n}"] / results["mlx_lm"][f"prefill_{n}"]
    del params, reference, runs
    mx.clear_cache()
    itemsize = mx.array(0, getattr(mx, dtype)).itemsize
    weights_bytes = per_token if config.tie_word_embeddings else per_token + (
        config.vocab_size - 1) * config.hidden_size * itemsize
    floor = weights_bytes + kv_cache_bytes(config, lengths[-1] + 16, itemsize)
    for name in results:
        peak = probe(name, model, shape, dtype, lengths[-1], 16)["peak_gb"]
        results[name]["peak_gb"] = peak
        results[name]["peak_vs_weights_and_kv"] = peak * 1e9 / floor
    return {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "source": source, "dtype": dtype, "device": device_name(), "blas": blas.describe(),
        "mlx": mx.__version__, "mlx_lm": package_version("mlx-lm"),
        "prompt_tokens": lengths, "gen_tokens": gen_tokens, "trials": trials,
        "read_bandwidth_gbs": bandwidth, "bytes_per_token": per_token,
        "weights_and_kv_bytes": floor, "results": results,
        "mlx_lm_default_int4": bench_int4(model, shape, dtype) if int4 else None,
        # mlx_lm as pip installs it on Linux: MLX's reference BLAS (a process without our adapter)
        "mlx_lm_stock_blas": probe("mlx_lm", model, shape, dtype, 32, 16, {"QWEN2_SCRATCH_BLAS": "reference"})
        if int4 and mx.default_device() == mx.cpu else None,
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
        f = q.compiled_decode_step if length == 1 else speculative.compiled_verify_step
        return timed_eval(lambda: f(params, config, tokens, cache, kernels))

    for length in [1, *(k + 1 for k in ks)]:  # traces
        step(length)
    ratios = {k: [] for k in ks}
    for _ in range(trials):  # alternated, each step against the decode step just before it
        for k in ks:
            decode = step(1)
            ratios[k].append(step(k + 1) / decode)
    return {k: statistics.median(r) for k, r in ratios.items()}


def decode_workload(params, config, prompt, kernels, max_tokens, eos, options) -> dict:
    report, cache = {}, q.new_cache(config, dtype=params["model"]["norm"]["weight"].dtype)
    tokens = options.get("tokens", q.generate_tokens)
    rest = {k: v for k, v in options.items() if k != "tokens"}
    list(tokens(params, config, prompt, cache, max_tokens=max_tokens, eos_ids=eos, kernels=kernels, report=report,
                **rest))
    return report


def run_speculative(model=None, shape=None, dtype=None, kernels="reference", ks=(4, 8), trials=3, command="") -> dict:
    """Both workloads, greedy, plain and with prompt lookup at each k, alternately; and the verifier's cost.

    With --shape (random weights, which accept nothing) only the verifier's cost is measured.
    """
    dtype = dtype or ("bfloat16" if mx.default_device() == mx.gpu else "float32")
    params, config, _, source = bench_weights(model, shape, dtype)
    log(f"bench --speculative: {source}, {dtype}, {mx.default_device()}, BLAS {blas.describe()}")
    warm_up_gpu()
    report = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "source": source, "dtype": dtype,
              "device": device_name(), "blas": blas.describe(), "mlx": mx.__version__, "trials": trials,
              "verifier_cost": verifier_cost(params, config, kernels, ks), "workloads": {}}
    log(f"  verifier step / decode step: {report['verifier_cost']}")
    if shape:
        return report
    tokenizer = weights.load_tokenizer(weights.resolve(model))
    eos = frozenset(tokenizer.eos_token_ids)
    contenders = {"plain": {}} | {f"lookup k={k}": dict(tokens=speculative.speculative_tokens, num_draft=k)
                                  for k in ks}
    for name, (text, max_tokens) in WORKLOADS.items():
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        for options in contenders.values():  # warm-up: traces
            decode_workload(params, config, prompt, kernels, 16, eos, options)
        runs = {c: [] for c in contenders}
        for trial in range(trials):
            for c, options in contenders.items():
                runs[c].append(decode_workload(params, config, prompt, kernels, max_tokens, eos, options))
                log(f"  {name}, trial {trial + 1}/{trials}, {c}: {runs[c][-1]['generation_tps']:.2f} tok/s")
        plain_tps = statistics.median(r["generation_tps"] for r in runs["plain"])
        rows = {}
        for c, reports in runs.items():
            last, tps = reports[-1], statistics.median(r["generation_tps"] for r in reports)
            rows[c] = {"prompt_tokens": len(prompt), "tokens": last["generation_tokens"], "decode": tps,
                       "speedup": tps / plain_tps, "same_as_plain": last["generated"] == runs["plain"][-1]["generated"]}
            if "verify_steps" in last:
                rows[c]["acceptance"] = last["accepted"] / max(last["proposed"], 1)
                rows[c]["tokens_per_step"] = last["step_tokens"] / last["verify_steps"]
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
    fmt = lambda v: f"{v:.2f}"  # noqa: E731
    for n in r["prompt_tokens"]:
        rows.append((f"prefill {n} tok/s", [fmt(r["results"][k][f"prefill_{n}"]) for k in names]))
        rows.append(("  x mlx_lm", [fmt(r["results"][k][f"prefill_{n}_vs_mlx_lm"]) for k in names]))
    rows.append((f"decode tok/s ({r['gen_tokens']} tokens)", [fmt(r["results"][k]["decode"]) for k in names]))
    rows.append(("  x mlx_lm", [fmt(r["results"][k]["decode_vs_mlx_lm"]) for k in names]))
    rows.append(("  % of roofline", [f"{100 * r['results'][k]['roofline']:.0f}%" for k in names]))
    rows.append(("peak memory GB", [fmt(r["results"][k]["peak_gb"]) for k in names]))
    rows.append(("  x (weights + KV)", [fmt(r["results"][k]["peak_vs_weights_and_kv"]) for k in names]))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}" + "".join(f"{c:>16}" for c in cells) for label, cells in rows]
    lines.append(f"roofline: {r['bytes_per_token'] / 1e9:.3f} GB read per token at {r['read_bandwidth_gbs']:.1f} GB/s "
                 f"= {r['read_bandwidth_gbs'] * 1e9 / r['bytes_per_token']:.2f} tok/s")
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
