"""The layout: one room per concern, imports running one way, a package that installs for real."""

import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import ast
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version

import tomllib

from conftest import HERE, run_cli

PROJECT = tomllib.loads((HERE / "pyproject.toml").read_text())
MODULES = PROJECT["tool"]["setuptools"]["py-modules"]


def lint_imports(source):
    return subprocess.run([sys.executable, str(HERE / "tools" / "lint_imports.py"), str(source)],
                          capture_output=True, text=True, timeout=120)


def test_imports_run_one_way():
    done = lint_imports(HERE)
    assert done.returncode == 0 and "1 kept, 0 broken" in done.stdout, done.stdout + done.stderr


def test_an_import_against_the_layers_breaks_the_contract(tmp_path):
    for name in MODULES:
        shutil.copy(HERE / f"{name}.py", tmp_path)
    with open(tmp_path / "weights.py", "a") as f:
        f.write("\nimport chat  # weights may not import a room above it\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0 and "0 kept, 1 broken" in done.stdout and "weights -> " in done.stdout, done.stdout


def imported_modules(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_model_file_holds_the_model():
    path = HERE / "qwen2_scratch.py"
    imported = imported_modules(path)
    assert not imported & {"click", "subprocess", "ctypes", "weights", "chat", "bench", "cli"}, imported
    first = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.Import | ast.ImportFrom))
    assert isinstance(first, ast.Import) and first.names[0].name == "blas", "blas must be the first import"
    assert [m for m in MODULES if "click" in imported_modules(HERE / f"{m}.py")] == ["cli"]


def test_pip_builds_a_real_wheel(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(HERE, source, ignore=shutil.ignore_patterns(".venv", ".git", "*cache*", "build", "*.egg-info"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("qwen2_scratch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"{m}.py" for m in MODULES} <= set(names), names
    assert any(n.endswith("data/data/share/qwen2-scratch/blas_adapter.c") for n in names), names
    meta = {n.rsplit("/", 1)[-1]: zipfile.ZipFile(wheel).read(n).decode() for n in names if ".dist-info/" in n}
    assert "qwen2-scratch = cli:main" in meta["entry_points.txt"]
    required = {line.removeprefix("Requires-Dist: ") for line in meta["METADATA"].splitlines()
                if line.startswith("Requires-Dist: ")}
    assert {d.replace(" ; ", "; ") for d in PROJECT["project"]["dependencies"]} <= required, required


def test_version_says_what_runs():
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"qwen2-scratch {version('qwen2-scratch')}", lines[0]
    assert f"MLX {version('mlx')}" in lines[1] and f"mlx_lm {version('mlx-lm')}" in lines[1], lines[1]
    assert lines[2].startswith("BLAS: OpenBLAS ") and "DYNAMIC_ARCH" in lines[2] and "(core: " in lines[2]


def test_help_texts_keep_their_examples_whole():
    done = run_cli("chat", "--help")
    assert done.returncode == 0 and "printf 'My name is Ada.\\nWhat is my name?\\n' | qwen2-scratch chat" in done.stdout
