"""The README's Python-API example runs as written, and the names it promises are exported."""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import importlib
import os
import re
import subprocess
import sys

import pytest

from conftest import HERE


def readme_example() -> str:
    section = (HERE / "README.md").read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_every_name_in_all_exists():
    for name in ("qwen2_scratch", "weights", "engine", "api", "chat", "bench", "server"):
        module = importlib.import_module(f"qwen2s.{name}")
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names {missing}, which it lacks"


@pytest.mark.packaged_model
def test_the_readme_python_api_example_runs_as_written(packaged):
    code = readme_example()
    assert "api.load" in code and "chat.ask" in code and "q.perplexity" in code
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=600,
                            env=os.environ)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"prefill: \d+ tokens", out), out
    assert "Ada" in re.search(r"What is my name\? -> (.*)", out).group(1), "the chat keeps its history: " + out
    assert re.search(r"perplexity=\d+\.\d+", out), out


# Options the Python API passes on unchecked (the server and the command line check theirs first): each out of its
# kind or range is a ValueError naming it, where NaN, a negative temperature or a penalty of 0 ran and drew garbage.
BAD_OPTIONS = [({"temp": float("nan")}, "temp"), ({"temp": -1}, "temp"), ({"top_p": 2}, "top_p"),
               ({"top_k": -5}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"min_p": 1.5}, "min_p"),
               ({"repetition_penalty": 0}, "repetition_penalty"), ({"seed": "x"}, "seed"),
               ({"max_tokens": 2.5}, "max_tokens"), ({"stop": ("", "a")}, "stop"),
               # past 64 bits MLX's step failed (std::bad_cast), the seed's text past 4300 digits, and the answer was ""
               ({"top_k": 2**63}, "top_k"), ({"top_k": 10**5000}, "top_k"),
               ({"repetition_context": 2**63}, "repetition_context"), ({"seed": 10**5000}, "seed"),
               ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"temp": 10**400}, "temp")]  # an OverflowError


def test_the_api_refuses_options_out_of_their_range_naming_them(tiny_folder):
    from qwen2s import api

    model = api.load(str(tiny_folder))
    for options, name in BAD_OPTIONS:
        with pytest.raises(ValueError, match=f"^{name} is "):
            api.generate(model, "hello", **{"max_tokens": 2, **options})
    assert api.generate(model, "hello", max_tokens=2, temp=0, top_k=3, seed=7)  # in range: it runs
    for kernels, max_kv_size, name in [("x", None, "kernels"), ("reference", -1, "max_kv_size"),
                                       ("reference", 10**5000, "max_kv_size")]:
        with pytest.raises(ValueError, match=f"^{name} is "):
            api.load(str(tiny_folder), kernels=kernels, max_kv_size=max_kv_size)


def test_a_step_that_fails_is_an_error_not_an_empty_answer(tiny_folder, monkeypatch):
    """The worker's failed step ended the request with an "error" event, which generate joined into "": no exception."""
    from qwen2s import api

    model = api.load(str(tiny_folder))

    def broken(seed, position):
        raise RuntimeError("std::bad_cast")

    monkeypatch.setattr(q, "sampling_key", broken)
    with pytest.raises(RuntimeError, match="a generation step failed: RuntimeError: std::bad_cast"):
        api.generate(model, "hello", max_tokens=2, temp=1, seed=1)


def test_the_api_takes_one_stop_string_whole_and_refuses_prompts_of_other_kinds(tiny_folder, monkeypatch):
    from qwen2s import api

    model = api.load(str(tiny_folder))
    sent = []
    monkeypatch.setattr(model.engine, "generate", lambda request: iter(sent.append(request) or ()))
    api.generate(model, "hello", stop="ab")
    api.generate(model, "hello", stop=None)
    assert [r.stops for r in sent] == [("ab",), ()]  # "ab" had been the two stops "a" and "b"
    for prompt in (123, b"hi", ["hi"], None):
        with pytest.raises(TypeError, match="string or a list of chat messages"):
            api.generate(model, prompt)
    for prompt in ("hi \ud800", [{"role": "user", "content": "hi \udfff"}]):  # the messages: a TypeError, deep inside
        with pytest.raises(ValueError, match="lone surrogate"):
            api.generate(model, prompt)


def test_threads_share_one_model_and_the_process_exits_cleanly(tiny_folder):
    """Several threads generating with one model each get the answer they get alone (one worker computes them all,
    in one batch), a model let go is freed, and the process exits 0. Two threads stepping one engine had raised or
    answered garbage, and a thread that generated and ended made MLX abort the process at exit ("terminate called
    without an active exception", exit -6)."""
    code = f"""
import threading
from qwen2s import api
model = api.load({str(tiny_folder)!r})
alone = [api.generate(model, p, max_tokens=12, temp=0) for p in ("hello world", "the quick fox")]
together = [None, None]
def one(i, p):
    together[i] = api.generate(model, p, max_tokens=12, temp=0)
threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(("hello world", "the quick fox"))]
for t in threads:
    t.start()
for t in threads:
    t.join()
stream = api.stream_generate(model, "hello world", max_tokens=1000, temp=0)
next(stream)
stream.close()  # closed early: its row is freed
assert together == alone, (together, alone)
print("same answers")
import gc, time, weakref
engine = weakref.ref(model.engine)
del model, stream
for _ in range(100):  # the worker lets go of the engine within its half-second wait
    gc.collect()
    if engine() is None:
        print("freed")
        break
    time.sleep(0.1)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "same answers" in result.stdout, (result.returncode, result.stderr[-2000:])
    assert "freed" in result.stdout, "a model let go is freed (its worker holds it only while it steps)"
