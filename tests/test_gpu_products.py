"""The GPU's products whose rows do not depend on each other (gpu_products.py): on a CUDA GPU its kernel,
bit for bit the same rows for any number of rows; elsewhere the fixed-shape step's padded products."""

from qwen2s import qwen2_scratch as q  # first: the fast BLAS before MLX

# isort: split
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from qwen2s import gpu_products

SHAPES = [(896, 896), (128, 896), (4864, 896), (896, 4864), (40, 72)]  # the 0.5B's products; a test model's


def as_float32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


@pytest.mark.parametrize("addend", ["none", "bias", "residual"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("N,K", SHAPES)
def test_each_row_is_computed_alone_whatever_the_rows_beside_it(N, K, dtype, addend):
    """Rows 1 to 64: each row the same bits as in the 64-row product, and close to a float32 product (with a bias,
    as q, k and v have, or added to the residual stream, as o_proj and down_proj are). On a CUDA GPU by the kernel;
    elsewhere the kernel is not taken and the step's padded product does it."""
    w = (mx.random.normal((N, K), key=mx.random.key(1)) * 0.05).astype(dtype)
    x = mx.random.normal((64, K), key=mx.random.key(2)).astype(dtype)
    b = mx.random.normal((N,), key=mx.random.key(3)).astype(dtype) if addend == "bias" else None
    r = mx.random.normal((64, N), key=mx.random.key(4)).astype(dtype) if addend == "residual" else None
    assert gpu_products.takes(x, w) == (mx.default_device() == mx.gpu and mx.cuda.is_available())
    product = q.rows_alone(64)
    full = as_float32(product(x, w, b, r))
    for rows in (1, 2, 3, 8, 9, 33, 64):
        assert np.array_equal(as_float32(product(x[:rows], w, b, None if r is None else r[:rows])), full[:rows]), rows
    exact = as_float32(x) @ as_float32(w).T + (0 if b is None else as_float32(b)) + (0 if r is None else as_float32(r))
    tolerance = 1e-4 if dtype == mx.float32 else 2e-2  # bfloat16 rounds the output to 8 bits of mantissa
    np.testing.assert_allclose(full, exact, rtol=tolerance, atol=tolerance * np.abs(exact).max())


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_swiglus_gate_is_computed_alone_for_each_row(dtype):
    """silu(x @ gate.T) * (x @ up.T), the MLP's hidden layer, in one kernel on a CUDA GPU (elsewhere by the step's
    products): each of 1 to 64 rows the same bits as among 64, and close to float32."""
    F, E = 4864, 896  # the 0.5B's
    gate, up = ({"weight": (mx.random.normal((F, E), key=mx.random.key(i)) * 0.05).astype(dtype)} for i in (1, 2))
    x = mx.random.normal((64, E), key=mx.random.key(3)).astype(dtype)
    full = as_float32(q.gate_alone(x, gate, up, q.rows_alone(64)))
    for rows in (1, 2, 3, 8, 9, 33, 64):
        assert np.array_equal(as_float32(q.gate_alone(x[:rows], gate, up, q.rows_alone(64))), full[:rows]), rows
    g, u = as_float32(x) @ as_float32(gate["weight"]).T, as_float32(x) @ as_float32(up["weight"]).T
    exact = g / (1 + np.exp(-g)) * u
    tolerance = 1e-4 if dtype == mx.float32 else 3e-2
    np.testing.assert_allclose(full, exact, rtol=tolerance, atol=tolerance * np.abs(exact).max())


def test_the_kernel_is_not_taken_off_a_cuda_gpu(on_cpu):
    assert not gpu_products.takes(mx.zeros((2, 16), mx.bfloat16), mx.zeros((8, 16), mx.bfloat16))


def test_the_kernel_is_not_taken_for_mixed_dtypes_or_ragged_rows():
    """(On a CUDA GPU the default device; elsewhere never taken at all.)"""
    w = mx.zeros((8, 16), mx.bfloat16)
    assert gpu_products.takes(mx.zeros((2, 16), mx.bfloat16), w) == (mx.default_device() == mx.gpu
                                                                       and mx.cuda.is_available())
    assert not gpu_products.takes(mx.zeros((2, 16), mx.float32), w)
    assert not gpu_products.takes(mx.zeros((2, 18), mx.bfloat16), mx.zeros((8, 18), mx.bfloat16))


def elf(tables_end: int, size: int) -> bytes:
    """A 64-bit ELF header whose section headers end at tables_end (no program headers), padded to size."""
    header = bytearray(0x40)
    header[:5] = b"\x7fELF\x02"
    header[0x28:0x30] = (tables_end - 64 * 3).to_bytes(8, "little")  # 3 section headers of 64 bytes
    header[0x3A:0x3C], header[0x3C:0x3E] = (64).to_bytes(2, "little"), (3).to_bytes(2, "little")
    return bytes(header) + bytes(size - 0x40)


def test_a_cubin_counts_as_whole_only_up_to_its_last_table():
    assert gpu_products.is_elf(elf(4096, 4096))
    assert not gpu_products.is_elf(elf(4096, 4095))  # cut short (a write that did not finish)
    assert not gpu_products.is_elf(elf(4096, 4097))
    assert not gpu_products.is_elf(b"\x7fELF\x01" + bytes(100))  # 32-bit
    assert not gpu_products.is_elf(b"")


def test_the_kernels_are_compiled_once_per_machine_and_kept(tmp_path, monkeypatch):
    """machine_code() compiles on the first call and keeps the cubin in the cache folder; a later process (the
    function's cache cleared) loads it; a broken file is compiled again. NVRTC itself is replaced here: it runs
    only where MLX's CUDA backend does (tests/test_gpu_products' products on the H200 use the real one)."""
    compiled = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(gpu_products, "nvrtc", lambda: None)
    monkeypatch.setattr(gpu_products, "nvrtc_version", lambda lib: "13.0")
    monkeypatch.setattr(gpu_products, "compile_apart",
                        lambda lib, arch, source: compiled.append(arch) or elf(4096, 4096))
    monkeypatch.setattr(gpu_products.mx, "device_info", lambda: {"architecture": "sm_90"})
    gpu_products.machine_code.cache_clear()
    plan = gpu_products.Plan(8)
    try:
        assert gpu_products.machine_code(mx.bfloat16, plan) == elf(4096, 4096) and compiled == ["sm_90"]
        [kept] = (tmp_path / "qwen2-scratch" / "cuda").iterdir()
        assert kept.name.startswith("gpu_products-sm_90-bfloat16-8-1-4-") and kept.read_bytes() == elf(4096, 4096)
        gpu_products.machine_code.cache_clear()  # as a new process
        assert gpu_products.machine_code(mx.bfloat16, plan) == elf(4096, 4096) and compiled == ["sm_90"]
        kept.write_bytes(elf(4096, 4096)[:1000])  # cut short
        gpu_products.machine_code.cache_clear()
        assert gpu_products.machine_code(mx.bfloat16, plan) == elf(4096, 4096) and compiled == ["sm_90", "sm_90"]
        assert kept.read_bytes() == elf(4096, 4096)
    finally:
        gpu_products.machine_code.cache_clear()


def test_each_cubin_is_small_since_mlx_hashes_it_at_every_launch():
    """One kernel a cubin, of one dtype and one plan: MLX hashes the whole cubin at each launch (about 7 us for the
    first build's 57 KB of three kernels here). Every instance the plans make, compiled for the H200 (sm_90) by the
    real NVRTC, here too (the nvidia-cuda-nvrtc package) where no GPU runs it."""
    lib = gpu_products.nvrtc()
    for dtype in gpu_products.DTYPES:
        for kind in ("", "bias", "residual", "gated", "qkv"):
            for rows, N, most in ((1, 896, 11_000), (8, 896, 24_000), (8, 151936, 33_000)):  # the head's: once a step
                if kind == "qkv" and N > 896 + 2 * 128:
                    continue
                plan = gpu_products.plan_for(rows, N, 896, kind)
                cubin = gpu_products.compile_for(lib, "sm_90", gpu_products.instance(dtype, plan, kind))
                assert gpu_products.is_elf(cubin) and len(cubin) < most, (dtype, kind, plan, len(cubin))


SIGNALS_DURING_COMPILES = """
import os, signal, sys, threading, time
import mlx.core as mx
from qwen2s import gpu_products as g
caught, done = [], threading.Event()
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, lambda n, frame: caught.append(n))
def compile_all():
    try:
        compile = g.compile_apart if sys.argv[1] == "apart" else g.compile_for
        for plan in (g.Plan(8, 1, 1, 4), g.Plan(8, 4, 2, 8), g.Plan(1, 2, 4, 8)):
            assert g.is_elf(compile(g.nvrtc(), "sm_90", g.instance(mx.bfloat16, plan, "residual")))
    finally:
        done.set()
threading.Thread(target=compile_all).start()
while not done.wait(0.003):
    os.kill(os.getpid(), (signal.SIGINT, signal.SIGTERM)[len(caught) % 2])
print("compiled, signals caught:", len(caught))
"""


@pytest.mark.parametrize("where", ["apart", "in the process"])
def test_a_signal_during_the_kernels_compile_is_the_process_own(where):
    """While NVRTC compiles it takes SIGINT and SIGTERM for the whole process (its own handlers): a Ctrl-C or a
    server's stop then ended the process (status 4 here, SIGSEGV on the H200). Compiled apart (compile_apart, what
    machine_code uses) every signal reaches the process's own handlers, and every compile ends whole; compiled in
    the process, the same signals end it."""
    run = subprocess.run([sys.executable, "-c", SIGNALS_DURING_COMPILES, where.split()[0]], capture_output=True,
                         text=True, timeout=300)
    if where == "apart":
        assert run.returncode == 0 and "compiled, signals caught:" in run.stdout, run.stderr[-2000:]
        assert int(run.stdout.split(":")[-1]) > 10
    else:
        assert run.returncode != 0 and "compiled" not in run.stdout


@pytest.mark.parametrize("kind", ["", "residual", "gated"])
def test_no_plan_changes_a_bit(kind):
    """Rows a block, weight rows a warp, loads in flight and warps a block change no output's order of sums: each
    plan gives the default plan's bits (tools/product_plans.py checks 394 plans on the real shapes). Off a CUDA GPU
    the kernel is never taken."""
    N, K = 200, 1032  # N not a multiple of any plan's weight rows a block; K not of 256
    w, u = ((mx.random.normal((N, K), key=mx.random.key(i)) * 0.05).astype(mx.bfloat16) for i in (1, 2))
    x = mx.random.normal((21, K), key=mx.random.key(3)).astype(mx.bfloat16)
    r = mx.random.normal((21, N), key=mx.random.key(4)).astype(mx.bfloat16)
    if not gpu_products.takes(x, w):
        assert not (mx.default_device() == mx.gpu and mx.cuda.is_available())
        return
    kernel = "few_rows_gated" if kind == "gated" else "few_rows_product"
    weights, addend = ([w, u] if kind == "gated" else [w]), ([r] if kind == "residual" else [])
    for rows in (1, 21):
        [default] = gpu_products.launch(kernel, kind, x[:rows], weights, [a[:rows] for a in addend])
        for plan in [(1, 1, 4, 8), (1, 3, 8, 4), (8, 1, 1, 4), (8, 4, 2, 8), (16, 2, 1, 4), (32, 1, 4, 2)]:
            if (rows == 1) == (plan[0] == 1):
                [y] = gpu_products.launch(kernel, kind, x[:rows], weights, [a[:rows] for a in addend],
                                          gpu_products.Plan(*plan))
                assert np.array_equal(as_float32(y), as_float32(default)), (rows, plan)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_q_k_and_v_in_one_launch_are_the_products_bits(dtype):
    """gpu_products.qkv: q's, k's and v's products with their biases in one kernel, each output the bits of
    `product`'s (the same sums in the same order), at 1, 3 and 21 rows, with k's rows not a multiple of a block's
    warps. Off a CUDA GPU the kernel is never taken (the CPU's tests compile it: the test above)."""
    E, Nq, Nk = 1032, 200, 36
    wq, wk, wv = ((mx.random.normal((n, E), key=mx.random.key(i)) * 0.05).astype(dtype)
                  for i, n in ((1, Nq), (2, Nk), (3, Nk)))
    bq, bk, bv = (mx.random.normal((n,), key=mx.random.key(i)).astype(dtype) for i, n in ((4, Nq), (5, Nk), (6, Nk)))
    x = mx.random.normal((21, E), key=mx.random.key(7)).astype(dtype)
    if not gpu_products.takes(x, wq):
        assert not (mx.default_device() == mx.gpu and mx.cuda.is_available())
        return
    for rows in (1, 3, 21):
        fused = gpu_products.qkv(x[:rows], wq, wk, wv, bq, bk, bv)
        alone = [gpu_products.product(x[:rows], w, b) for w, b in ((wq, bq), (wk, bk), (wv, bv))]
        for y, z in zip(fused, alone, strict=True):
            assert y.shape == z.shape and np.array_equal(as_float32(y), as_float32(z)), rows
