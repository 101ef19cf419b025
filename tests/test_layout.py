"""The layout: one room per concern, imports running one way, a package that installs for real."""

from qwen2s import qwen2_scratch as q  # noqa: F401  (first: the fast BLAS before MLX)

# isort: split
import ast
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import tomllib

from conftest import HERE, run_cli

PROJECT = tomllib.loads((HERE / "pyproject.toml").read_text())
PACKAGE = HERE / "qwen2s"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
NATIVE = ["blas_adapter.c", "attention.cpp", "lanes.h"]  # the sources that blas.py and cpu_attention.py compile


def lint_imports(root):
    """lint-imports with the project's contract, on the package qwen2s found in root."""
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--config", str(HERE / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})


def test_imports_run_one_way():
    done = lint_imports(HERE)
    assert done.returncode == 0 and "1 kept, 0 broken" in done.stdout, done.stdout + done.stderr


def test_an_import_against_the_layers_breaks_the_contract(tmp_path):
    package = tmp_path / "qwen2s"
    shutil.copytree(PACKAGE, package)  # the links followed: copies of the modules
    with open(package / "weights.py", "a") as f:
        f.write("\nfrom qwen2s import chat  # weights may not import a room above it\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0 and "0 kept, 1 broken" in done.stdout and "weights -> " in done.stdout, done.stdout


def test_the_package_holds_every_module_of_the_repository_top_level():
    """qwen2s/ links to each top-level module (and the C and C++ sources), so nothing is left out of the install."""
    top = {p.stem for p in HERE.glob("*.py")} - {"conftest", "test_qwen2_scratch"}
    assert top == set(MODULES), top ^ set(MODULES)
    for name in [f"{m}.py" for m in MODULES] + NATIVE:
        assert (PACKAGE / name).resolve() == (HERE / name).resolve(), name


def imported_modules(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "qwen2s":  # our modules, by their own names
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.removeprefix("qwen2s.").split(".")[0])
    return names


def test_the_model_file_holds_the_model():
    path = HERE / "qwen2_scratch.py"
    imported = imported_modules(path)
    assert not imported & {"click", "subprocess", "ctypes", "weights", "chat", "bench", "cli"}, imported
    first = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.Import | ast.ImportFrom))
    assert first.names[0].name == "blas", "blas must be the first import"
    assert [m for m in MODULES if "click" in imported_modules(HERE / f"{m}.py")] == ["cli"]


def test_pip_builds_a_real_wheel(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(HERE, source, ignore=shutil.ignore_patterns(".venv", ".git", "*cache*", "build", "*.egg-info"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("qwen2_scratch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"qwen2s/{m}" for m in [f"{m}.py" for m in MODULES] + NATIVE + ["__init__.py"]} <= set(names), names
    assert not [n for n in names if "/" not in n], "nothing at the top of site-packages but the package"
    assert zipfile.ZipFile(wheel).read("qwen2s/qwen2_scratch.py") == (HERE / "qwen2_scratch.py").read_bytes()
    meta = {n.rsplit("/", 1)[-1]: zipfile.ZipFile(wheel).read(n).decode() for n in names if ".dist-info/" in n}
    assert "qwen2-scratch = qwen2s.cli:main" in meta["entry_points.txt"]
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
