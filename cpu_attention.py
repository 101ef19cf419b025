"""Attention over a KV cache in one kernel on the CPU: attention.cpp, an MLX primitive, built once and loaded here.

The model's own attention is MLX ops, one pass each over the [G * L, S] scores; on the CPU MLX's element-wise
kernels take one element at a time, so over a long cache a step's time went to those passes (a piped chat at
16,000-32,000 tokens of history: 10-14 ns a score). attention.cpp computes each query alone (its scores, the
softmax, its values) in one fixed order that depends only on its position: the same bits in a prefill chunk of
any length, a decode step, a verifier step or a batch (docs/engine.md, "One request, one answer").

`attention(q, k, v, start, scale)` is what the model calls where `runs_here(dtype, head_dim)`: on the CPU, in
float32, with a head dimension that is a multiple of 8 (at most 256), once the extension is built. Elsewhere (a
GPU, bfloat16, QWEN2_SCRATCH_ATTENTION=mlx, no compiler) the model keeps MLX's ops.

Built on first use (or by `make install`) with g++ against MLX's headers and library and nanobind's sources (the
version MLX's own bindings use, pinned in requirements.txt, so that an mx.array passes between the two), about
15 s on two cores, into ~/.cache/qwen2-scratch/attention as blas.py keeps its adapter. A build that fails is one
warning line, then MLX's ops.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import mlx.core as mx

from qwen2s import blas
from qwen2s.say import say

__all__ = ["attention", "runs_here", "describe"]

SOURCE = "attention.cpp"
MODULE = "qwen2_cpu_attention"
NANOBIND = "nanobind"


def source() -> Path | None:
    path = Path(__file__).parent / SOURCE
    return path if path.is_file() and (path.parent / blas.LANES).is_file() else None


def package_dir(name: str, inner: str) -> Path | None:
    """A package's folder, found through its metadata (nothing of it is imported)."""
    try:
        folder = Path(importlib.metadata.distribution(name).locate_file(inner))
    except importlib.metadata.PackageNotFoundError:
        return None
    return folder if folder.is_dir() else None


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def build_key(code: bytes) -> str:
    """The cached build's name: the source, MLX's and nanobind's versions, this Python's ABI and MLX's folder."""
    parts = [version(p) for p in ("mlx", NANOBIND)]
    parts += [sysconfig.get_config_var("EXT_SUFFIX") or "", str(package_dir("mlx", "mlx"))]
    return hashlib.sha256(code + "\0".join(parts).encode()).hexdigest()[:16]


def build(code: Path, out: Path, key: str) -> str | None:
    """Compile the extension into out (blas.compile_into): None, or why it failed."""
    compiler = shutil.which("g++") or shutil.which("c++")
    mlx_dir, nanobind_dir = package_dir("mlx", "mlx"), package_dir(NANOBIND, NANOBIND)
    if compiler is None:
        return "no C++ compiler (install g++)"
    if mlx_dir is None or not (mlx_dir / "include").is_dir() or nanobind_dir is None:
        return "MLX's headers or the package nanobind are missing (run make install)"
    return blas.compile_into(out, lambda tmp: [
        compiler, "-std=c++20", "-O2", "-ffp-contract=off", "-Wno-psabi", "-fPIC", "-shared", "-fvisibility=hidden",
        "-pthread", "-DNB_DOMAIN=mlx", f'-DATTENTION_KEY="{key}"', f"-I{code.parent}", f"-I{mlx_dir / 'include'}",
        f"-I{nanobind_dir / 'include'}", f"-I{nanobind_dir / 'ext' / 'robin_map' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}", str(code), str(nanobind_dir / "src" / "nb_combined.cpp"), "-o", tmp,
        f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}"], code.name)


def open_module(path: Path, key: str) -> ModuleType | None:
    """Import a built extension, or None if the file is not the one we built (blas.intact checks it whole first)."""
    if not blas.intact(path, key):
        return None
    try:
        spec = importlib.util.spec_from_file_location(MODULE, path,
                                                      loader=importlib.machinery.ExtensionFileLoader(MODULE, str(path)))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError):
        return None
    return module if getattr(module, "key", lambda: "")() == key else None


@functools.cache
def load() -> ModuleType | None:
    """The extension, built first if need be; None (with one warning line, once) where it cannot be."""
    if os.environ.get("QWEN2_SCRATCH_ATTENTION", "") == "mlx" or sys.platform != "linux":
        return None
    code = source()
    if code is None:
        return fallback(f"{SOURCE} is missing")
    key = build_key(code.read_bytes() + (code.parent / blas.LANES).read_bytes())
    path = blas.cache_folder("attention") / f"{MODULE}-{key}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    module = open_module(path, key) if path.is_file() else None
    if module is None:  # not built yet, or a truncated or foreign file: build it (again)
        why = build(code, path, key)
        if why:
            return fallback(why)
        module = open_module(path, key)
        if module is None:
            return fallback(f"{path} does not load after building it")
    return module


def fallback(why: str) -> None:
    say(f"warning: attention on the CPU runs as MLX's ops, several times slower over a long cache: {why}")
    return None


def runs_here(dtype: mx.Dtype, head_dim: int) -> bool:
    """Whether `attention` computes this model's attention: on the CPU, in float32, heads of 8k <= 256 dims."""
    return (mx.default_device() == mx.cpu and dtype == mx.float32 and head_dim % 8 == 0 and head_dim <= 256
            and load() is not None)


def attention(q: mx.array, k: mx.array, v: mx.array, start: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale, causal) v for each row's queries over its own cache: [B, H, L, D], [B, K, S, D] ->
    [B, H, L, D]. Query i of row b sits at position start[b] + i ([B] int32) and sees keys 0 .. start[b] + i."""
    return load().cached_attention(q, k, v, start, scale)


def describe() -> str:
    """One line for `--version`: what computes attention on the CPU."""
    module = load()
    return f"ours ({module.kernel()})" if module is not None else "MLX's ops"
