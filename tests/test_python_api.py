"""The README's Python-API example runs as written, and the names it promises are exported."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

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
