"""A real BLAS for MLX's CPU backend on Linux, loaded into this process before MLX; and freed memory kept.

MLX's Linux wheel links the netlib reference BLAS (about 5 GFLOP/s). `load()` (which the model
calls first, before it imports MLX) loads blas_adapter.c, built once with cc into the user cache
(by `make install`, or on first use), which defines the BLAS calls
MLX makes and answers them with scipy-openblas32: a DYNAMIC_ARCH OpenBLAS that picks its
kernels for the CPU at run time, so it runs on every x86-64 CPU. ctypes' RTLD_GLOBAL puts
the adapter's symbols in the global scope, which the dynamic linker searches before the
libraries MLX links: no LD_PRELOAD, no re-execution, no change to the environment.

Every failure is one warning line on stderr, and MLX keeps its own BLAS: no C compiler, a
cache folder that cannot be written, a broken cached file (rebuilt), the library missing.
macOS keeps Accelerate; QWEN2_SCRATCH_BLAS=reference opts out (openblas, or unset, opts in; any other value
is a warning line, then OpenBLAS).

`load()` also tells glibc's malloc to keep freed memory for reuse (`keep_freed_memory`): by default it
hands each large freed buffer back to the kernel, so an array of more than a million floats (attention's
scores over a long cache) was faulted in page by page on every call, and its ops ran 3-4x slower. And
`huge_pages_for` puts the weights in 2 MB pages, which a decode step streams with fewer TLB misses.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from qwen2s.say import say

__all__ = ["load", "describe", "in_use"]

ADAPTER = "blas_adapter.c"
LANES = "lanes.h"  # its eight-lane arithmetic, shared with attention.cpp
LIBRARY = "scipy-openblas32"


class State(NamedTuple):
    """What runs MLX's CPU matmuls: kind is "openblas", "reference" or "accelerate"."""

    kind: str
    why: str = ""  # why the fast BLAS is not in use, when it is not
    adapter: Path | None = None
    library: ctypes.CDLL | None = None




def cache_folder(what: str = "blas") -> Path:
    """Where machine code built here is kept: ~/.cache/qwen2-scratch/blas (the adapter), .../cuda (gpu_products)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").absolute()
    return root / "qwen2-scratch" / what


def adapter_source() -> Path | None:
    """blas_adapter.c beside this file (in the repository, or in the installed package)."""
    path = Path(__file__).parent / ADAPTER
    return path if path.is_file() and (path.parent / LANES).is_file() else None


def library_dir() -> Path | None:
    """The folder of libscipy_openblas.so, found through the package's metadata (its code is not run)."""
    try:
        dist = importlib.metadata.distribution(LIBRARY)
    except importlib.metadata.PackageNotFoundError:
        return None
    folder = Path(dist.locate_file("scipy_openblas32/lib"))
    return folder if (folder / "libscipy_openblas.so").is_file() else None


def adapter_key(source: bytes, lib_dir: Path) -> str:
    """The cached build's name: the adapter's source, the library's version and where it lies (the rpath)."""
    version = importlib.metadata.version(LIBRARY)
    return hashlib.sha256(source + f"\0{version}\0{lib_dir}".encode()).hexdigest()[:16]


def build(source: Path, lib_dir: Path, out: Path, key: str) -> str | None:
    """Compile the adapter into out: None, or why it failed."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return "no C compiler (install gcc)"
    return compile_into(out, lambda tmp: [
        compiler, "-O2", "-ffp-contract=off", "-Wno-psabi", "-pthread", "-shared", "-fPIC", f'-DADAPTER_KEY="{key}"',
        f"-I{source.parent}", "-o", tmp, str(source), f"-L{lib_dir}", "-lscipy_openblas", f"-Wl,-rpath,{lib_dir}"],
        source.name)


def compile_into(out: Path, command, what: str) -> str | None:
    """Run the compiler command(tmp) that writes a temporary file beside out, then rename it to out (atomic: a
    concurrent build of the same key writes the same file): None, or why it failed, in a line. cpu_attention.py
    builds its extension this way too."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        os.close(fd)
    except OSError as e:
        return f"cannot write the cache folder {out.parent} ({e.strerror or e})"
    try:
        done = subprocess.run(command(tmp), capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in (done.stderr or "").splitlines() if "error" in line]
            lines = lines or (done.stderr or "").strip().splitlines() or [str(done.returncode)]
            return f"building {what} failed ({lines[0].strip()[:200]})"
        os.replace(tmp, out)
    except OSError as e:
        return f"cannot write the cache folder {out.parent} ({e.strerror or e})"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return None


def intact(path: Path, key: str) -> bool:
    """A whole 64-bit ELF file (the section headers, written last, end where the file does) built with key.

    Checked before dlopen: the dynamic linker maps a truncated file and dies of SIGBUS reading it,
    and dlopen of a foreign file would keep it loaded under this path.
    """
    try:
        data = path.read_bytes()
        (shoff,) = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    except (OSError, struct.error):
        return False
    return data[:5] == b"\x7fELF\x02" and shoff + shentsize * shnum == len(data) and key.encode() in data


def open_adapter(path: Path, key: str) -> ctypes.CDLL | None:
    """Load a built adapter into the global scope, or None if the file is not the one we built."""
    if not intact(path, key):
        return None
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        check = lib.qwen2_scratch_blas_adapter_key
    except (OSError, AttributeError):
        return None
    check.restype = ctypes.c_char_p
    return lib if check() == key.encode() else None


LOADED: list[State] = []  # the one load() of this process
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameters (malloc.h)
KEPT_FREE_BYTES = 1 << 30  # the most freed memory malloc keeps at the heap's top
MADV_HUGEPAGE, HUGE_PAGE = 14, 2 << 20  # madvise's advice (mman.h); x86-64's transparent huge page


def load() -> State:
    """Load the adapter and OpenBLAS into this process (the first call; later calls say what it did)."""
    if not LOADED:
        keep_freed_memory()
        LOADED.append(find_or_build())
    return LOADED[0]


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every buffer from its heap (never a fresh mmap) and keep up to
    KEPT_FREE_BYTES freed there, so MLX's large temporaries reuse pages already mapped instead of
    faulting new ones in on every call (5 faults a page for an exp over 1.1M floats: 4 ns an element
    became 15). Linux with glibc only; False where malloc is another's."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    return bool(mallopt and mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES))


@contextmanager
def huge_pages_for(nbytes: int):
    """Within: the next nbytes malloc hands out (the weights being loaded) lie in 2 MB pages, where the kernel
    allows them (transparent huge pages "madvise" or "always"). The heap is grown by nbytes untouched, advised
    MADV_HUGEPAGE, and freed: kept at the heap's top (the trim threshold raised meanwhile), it serves the next
    allocations, whose first touch faults in huge pages. A decode step streams every weight, and with 4 KB pages
    each 4 KB read missed the TLB: the packaged model decoded 6% faster (benchmarks/README.md). It works where
    the heap has no large freed chunk that malloc would pick first (a command loading its weights at its start),
    on the main thread (another thread's allocations come from an arena of its own).
    Nothing happens where malloc is not glibc's heap as keep_freed_memory set it."""
    libc = ctypes.CDLL(None) if sys.platform == "linux" and LOADED and nbytes > 0 else None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not mallopt(M_TRIM_THRESHOLD, max(KEPT_FREE_BYTES, nbytes + 2 * HUGE_PAGE)):
        yield
        return
    try:
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes, libc.madvise.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        block = libc.malloc(nbytes + 2 * HUGE_PAGE)
        if block:
            start, end = -(-block // HUGE_PAGE) * HUGE_PAGE, (block + nbytes + 2 * HUGE_PAGE) // HUGE_PAGE * HUGE_PAGE
            libc.madvise(start, end - start, MADV_HUGEPAGE)  # refused (no THP in this kernel): 4 KB pages
            libc.free(block)
        yield
    finally:
        mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES)


def find_or_build() -> State:
    """What runs MLX's matmuls: the adapter and OpenBLAS, loaded now (built first if need be), or why not."""
    if sys.platform == "darwin":
        return State("accelerate")
    chosen = os.environ.get("QWEN2_SCRATCH_BLAS", "")
    if sys.platform != "linux" or chosen == "reference":
        return State("reference", "QWEN2_SCRATCH_BLAS=reference" if sys.platform == "linux" else sys.platform)
    if chosen not in ("", "openblas"):  # a typo must not pass for a choice
        say(f"warning: QWEN2_SCRATCH_BLAS={chosen[:40]!r} is neither 'reference' nor 'openblas': using openblas")
    if "mlx.core" in sys.modules:
        say("warning: MLX was imported before qwen2_scratch, so it keeps its slow reference BLAS; "
             "import qwen2_scratch (or any module of ours) before mlx")
        return State("reference", "mlx was imported first")
    source, lib_dir = adapter_source(), library_dir()
    if source is None or lib_dir is None:
        missing = ADAPTER if source is None else f"the package {LIBRARY}"
        return fallback(f"{missing} is missing (run make install)")
    key = adapter_key(source.read_bytes() + (source.parent / LANES).read_bytes(), lib_dir)
    path = cache_folder() / f"libqwen2_blas_adapter-{key}.so"
    lib = open_adapter(path, key) if path.is_file() else None
    if lib is None:  # not built yet, or a truncated or foreign file: build it (again)
        why = build(source, lib_dir, path, key)
        if why:
            return fallback(why)
        lib = open_adapter(path, key)
        if lib is None:
            return fallback(f"{path} does not load after building it")
    return State("openblas", adapter=path, library=lib)


def fallback(why: str) -> State:
    say(f"warning: MLX runs on its slow reference BLAS: {why}")
    return State("reference", why)


def in_use() -> str:
    """The BLAS answering MLX's calls, read from this process's memory map (for reports and tests)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "accelerate" if sys.platform == "darwin" else "reference"
    return "openblas" if "libqwen2_blas_adapter" in maps and "libscipy_openblas" in maps else "reference"


def describe() -> str:
    """One line: the BLAS, its build configuration and the core it chose (OPENBLAS_CORETYPE shows here)."""
    state = load()
    if state.kind != "openblas":
        return {"accelerate": "Accelerate (macOS)"}.get(state.kind, f"MLX's reference BLAS ({state.why})")
    get_config, get_core = state.library.scipy_openblas_get_config, state.library.scipy_openblas_get_corename
    kernel = state.library.qwen2_scratch_blas_kernel
    get_config.restype = get_core.restype = kernel.restype = ctypes.c_char_p
    return (f"{get_config().decode().strip()} (core: {get_core().decode()}; "
            f"{LIBRARY} {importlib.metadata.version(LIBRARY)}; 1-64 rows on our kernel, {kernel().decode()})")

