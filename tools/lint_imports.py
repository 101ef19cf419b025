"""Check the import-linter contract in pyproject.toml on this project's top-level modules.

import-linter (through grimp) analyses packages only: a single-file module cannot be one of
its root packages (import-linter issue 349, grimp issue 300). So this gathers the modules
named in [tool.setuptools] py-modules into a temporary package, `qwen2_scratch_rooms`, with
`import weights` rewritten as `from qwen2_scratch_rooms import weights` (and likewise for
every module of ours), and runs lint-imports there with the contract as written.

    python tools/lint_imports.py [SOURCE_FOLDER]     (exit code: lint-imports')
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

PACKAGE = "qwen2_scratch_rooms"
HERE = Path(__file__).resolve().parent.parent


def as_package_module(text: str, ours: list[str]) -> str:
    """`import m [as x]` and `from m import y` of our modules -> imports from the package."""
    names = "|".join(map(re.escape, ours))
    text = re.sub(rf"^(\s*)import ({names})\b(?! as)", rf"\1from {PACKAGE} import \2", text, flags=re.M)
    text = re.sub(rf"^(\s*)import ({names}) as (\w+)", rf"\1from {PACKAGE} import \2 as \3", text, flags=re.M)
    return re.sub(rf"^(\s*)from ({names}) import", rf"\1from {PACKAGE}.\2 import", text, flags=re.M)


def main(source: Path) -> int:
    config = HERE / "pyproject.toml"
    ours = tomllib.loads(config.read_text())["tool"]["setuptools"]["py-modules"]
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / PACKAGE
        package.mkdir()
        (package / "__init__.py").write_text("")
        for name in ours:
            path = source / f"{name}.py"
            if path.is_file():
                (package / path.name).write_text(as_package_module(path.read_text(), ours))
        lint = Path(sys.executable).with_name("lint-imports")
        return subprocess.run([str(lint), "--config", str(config), "--no-cache"], cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE))
