"""Products of a few rows on a CUDA GPU, each row computed alone: the GPU's counterpart of blas_adapter.c.

MLX's CUDA backend multiplies one row with its own gemv and more rows with a cuBLAS algorithm chosen by
the shape, and each rounds differently: a row's result would depend on how many rows stand beside it.
This kernel computes every output as one dot product in one fixed order, whatever the number of rows:
a warp per weight row (or a few) and per block of input rows; each lane sums eight elements at a time (one
16-byte load of bfloat16), from its own offset, in float32 with one rounding per multiply-add (`__fmaf_rn`, never
left to the compiler), and the warp's 32 partial sums are added in one fixed butterfly. The blocks of input rows
that share weight rows are launched side by side (blockIdx.x), so that a weight row comes from memory once and
from L2 for the others. How many rows a block, weight rows a warp, loads in flight and warps a block (`Plan`) is
chosen by the product's shape (`plan_for`): no choice changes a bit, since no output's sum changes its order.

What a decode step adds to its products is done in the same kernel, before the one rounding: q, k and v's biases,
the residual stream that o_proj's and down_proj's outputs join, and SwiGLU's gate (`gated`: silu(x @ gate.T) *
(x @ up.T), both weights in one warp). On a GPU a small model's step is bound by the host sending its nodes off, not
by the device, so each node saved counts: seven a layer, a one-row 0.5B step 0.85x the time of the step that had them
as nodes of their own (`python tools/gpu_step_ab.py`, benchmarks/README.md "Fewer nodes a GPU step"). And q's, k's
and v's products are one launch (`qkv`): k's and v's alone are too small to fill the GPU (128 weight rows in the 0.5B;
at 32 rows 31 us a layer for the two, against 24 us for all three in one launch).

Measured on the H200 (`python tools/gpu_rows.py`, benchmarks/README.md "Each row alone on CUDA"): the same bits
for 1 to 64 rows of every Qwen2 0.5B and 7B product; one row of the 7B's down_proj and gate_proj 1.65x and 1.47x
MLX's gemv (1.89x and 1.87x with the first version: four elements a load, one load in flight); a one-row 0.5B
decode step 0.63x the step whose products are padded to 64 rows. At 64 rows the kernel is the slower one (the
head product 3.1 ms against cuBLAS's 0.16 ms): `--parallel` defaults to 32 on a GPU.

Built once per machine: NVRTC (CUDA's runtime compiler, which MLX's CUDA backend loads) compiles the source below
for this GPU, in a process of its own (`compile_apart` says why), and the machine code is kept in
~/.cache/qwen2-scratch/cuda, as blas.py keeps its adapter; a process then loads it in milliseconds. (Through
`mx.fast.cuda_kernel`, MLX compiled it again in every process: 1.4-2.4 s of a one-shot command's first decode step
on the H200, benchmarks/README.md; MLX keeps only its own kernels.)

One cubin per dtype, plan and kind, each holding one kernel: MLX names a precompiled kernel's module by a hash of
the whole cubin, computed at every launch (CustomKernel::eval_gpu, MLX 0.32.4), and its time is the cubin's size:
the first build's one cubin of three kernels (57 KB) cost about 10 us a product, doubling a one-row decode step on
the H200 (benchmarks/README.md, "Our kernel's launch").
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import math
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import NamedTuple

import mlx.core as mx

from qwen2s import blas

__all__ = ["takes", "product", "gated", "qkv"]

SOURCE = r"""
typedef unsigned short u16;
struct __align__(16) eight_u16 { u16 v[8]; };
struct __align__(32) eight_f32 { float v[8]; };

__device__ __forceinline__ float from_bfloat16(u16 b) { return __uint_as_float((unsigned)b << 16); }
__device__ __forceinline__ u16 to_bfloat16(float f) {  // to nearest, ties to even (as __float2bfloat16)
    const unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN
    return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float from_float16(u16 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ u16 to_float16(float f) {  // to nearest, ties to even
    u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float from_float32(float f) { return f; }
__device__ __forceinline__ float to_float32(float f) { return f; }

// acc[m][j] = x[r0 + j] . w[m] (m < M weight rows, j < J input rows below R), each one dot product in one fixed
// order: lane l sums elements 8l .. 8l + 7 of every 256 in turn, LOADS loads of each weight row in flight, then the
// warp's 32 sums are added in one fixed butterfly
#define DOT_ROWS(NAME, T, EIGHT, J, M, LOADS)                                                             \
__device__ __forceinline__ void dot_rows(const T* x, const T* const* w, int R, int K, int r0, int lane,   \
                                         float (*acc)[J])                                                 \
{                                                                                                         \
    _Pragma("unroll") for (int m = 0; m < M; m++) {                                                       \
        _Pragma("unroll") for (int j = 0; j < J; j++) acc[m][j] = 0.0f;                                   \
    }                                                                                                     \
    for (int k0 = lane * 8; k0 < K; k0 += 256 * LOADS) {                                                  \
        EIGHT wq[M][LOADS];                                                                               \
        _Pragma("unroll") for (int m = 0; m < M; m++) {                                                   \
            _Pragma("unroll") for (int u = 0; u < LOADS; u++) {                                           \
                if (k0 + u * 256 < K) wq[m][u] = *reinterpret_cast<const EIGHT*>(w[m] + k0 + u * 256);    \
            }                                                                                             \
        }                                                                                                 \
        _Pragma("unroll") for (int u = 0; u < LOADS; u++) {                                               \
            const int k = k0 + u * 256;                                                                   \
            if (k < K) {                                                                                  \
                _Pragma("unroll") for (int j = 0; j < J; j++) {                                           \
                    if (r0 + j < R) {                                                                     \
                        const EIGHT xq = *reinterpret_cast<const EIGHT*>(x + (size_t)(r0 + j) * K + k);   \
                        _Pragma("unroll") for (int m = 0; m < M; m++) {                                   \
                            _Pragma("unroll") for (int t = 0; t < 8; t++) {                               \
                                acc[m][j] = __fmaf_rn(from_##NAME(wq[m][u].v[t]), from_##NAME(xq.v[t]), acc[m][j]); \
                            }                                                                             \
                        }                                                                                 \
                    }                                                                                     \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
    _Pragma("unroll") for (int m = 0; m < M; m++) {                                                       \
        _Pragma("unroll") for (int j = 0; j < J; j++) {                                                   \
            float& a = acc[m][j];                                                                         \
            _Pragma("unroll") for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);   \
        }                                                                                                 \
    }                                                                                                     \
}

// y [R, N] = x [R, K] @ w [N, K].T (+ a), one warp per M weight rows n0 .. n0 + M - 1 and J rows of x; the addend a
// (a bias b [N] or a residual b [R, N]) added to each sum before its one rounding. ADDEND_INPUT is `, const T* b` and
// PLUS_ADDEND `+ from_NAME(b[...])`, or both empty (defined before the kernel's instance). M rows past N repeat the
// last one and are not written
#define PRODUCT(NAME, T, J, M)                                                                            \
extern "C" __global__ void few_rows_product(const T* x, const T* w ADDEND_INPUT, T* y, int R, int K, int N) \
{                                                                                                         \
    const int lane = threadIdx.x & 31;                                                                    \
    const int n0 = (blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5)) * M;                             \
    const int r0 = blockIdx.x * J;                                                                        \
    if (n0 >= N || r0 >= R) return;                                                                       \
    const T* rows[M];                                                                                     \
    _Pragma("unroll") for (int m = 0; m < M; m++) rows[m] = w + (size_t)min(n0 + m, N - 1) * K;           \
    float acc[M][J];                                                                                      \
    dot_rows(x, rows, R, K, r0, lane, acc);                                                               \
    _Pragma("unroll") for (int m = 0; m < M; m++) {                                                       \
        const int n = n0 + m;                                                                             \
        _Pragma("unroll") for (int j = 0; j < J; j++) {                                                   \
            if (lane == (m * J + j) % 32 && r0 + j < R && n < N)                                          \
                y[(size_t)(r0 + j) * N + n] = to_##NAME(acc[m][j] PLUS_ADDEND);                           \
        }                                                                                                 \
    }                                                                                                     \
}

// SwiGLU's gate: y [R, N] = silu(x @ g.T) * (x @ u.T), P outputs n0 .. n0 + P - 1 a warp, each sum as in PRODUCT
// (DOT_ROWS with M = 2P weight rows, gate and up in turn: the same order), one rounding at the end
#define GATED(NAME, T, J, P)                                                                              \
extern "C" __global__ void few_rows_gated(const T* x, const T* g, const T* u, T* y, int R, int K, int N)  \
{                                                                                                         \
    const int lane = threadIdx.x & 31;                                                                    \
    const int n0 = (blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5)) * P;                             \
    const int r0 = blockIdx.x * J;                                                                        \
    if (n0 >= N || r0 >= R) return;                                                                       \
    const T* rows[2 * P];                                                                                 \
    _Pragma("unroll") for (int p = 0; p < P; p++) {                                                       \
        rows[2 * p] = g + (size_t)min(n0 + p, N - 1) * K;                                                 \
        rows[2 * p + 1] = u + (size_t)min(n0 + p, N - 1) * K;                                             \
    }                                                                                                     \
    float acc[2 * P][J];                                                                                  \
    dot_rows(x, rows, R, K, r0, lane, acc);                                                               \
    _Pragma("unroll") for (int p = 0; p < P; p++) {                                                       \
        const int n = n0 + p;                                                                             \
        _Pragma("unroll") for (int j = 0; j < J; j++) {                                                   \
            const float silu = __fdiv_rn(acc[2 * p][j], __fadd_rn(1.0f, expf(-acc[2 * p][j])));          \
            if (lane == (p * J + j) % 32 && r0 + j < R && n < N)                                          \
                y[(size_t)(r0 + j) * N + n] = to_##NAME(__fmul_rn(silu, acc[2 * p + 1][j]));            \
        }                                                                                                 \
    }                                                                                                     \
}

// q, k and v's products in one launch, each output as PRODUCT's with a bias (the same sums in the same order, one
// rounding): yq [R, Nq], yk and yv [R, Nk] from x [R, K], wq [Nq, K], wk and wv [Nk, K]; the first Nq warps of a block
// row take q's weight rows, the next Nk k's, the last Nk v's. DOT_ROWS with M = 1
#define QKV(NAME, T, J)                                                                                   \
extern "C" __global__ void few_rows_qkv(const T* x, const T* wq, const T* wk, const T* wv, const T* bq,   \
                                        const T* bk, const T* bv, T* yq, T* yk, T* yv, int R, int K,     \
                                        int Nq, int Nk)                                                   \
{                                                                                                         \
    const int lane = threadIdx.x & 31;                                                                    \
    int n = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);                                          \
    const int r0 = blockIdx.x * J;                                                                        \
    if (n >= Nq + 2 * Nk || r0 >= R) return;                                                              \
    const T* w = wq; const T* b = bq; T* y = yq; int N = Nq;                                              \
    if (n >= Nq + Nk) { w = wv; b = bv; y = yv; N = Nk; n -= Nq + Nk; }                                   \
    else if (n >= Nq) { w = wk; b = bk; y = yk; N = Nk; n -= Nq; }                                        \
    const T* rows[1] = {w + (size_t)n * K};                                                               \
    float acc[1][J];                                                                                      \
    dot_rows(x, rows, R, K, r0, lane, acc);                                                               \
    _Pragma("unroll") for (int j = 0; j < J; j++) {                                                       \
        if (lane == j % 32 && r0 + j < R) y[(size_t)(r0 + j) * N + n] = to_##NAME(acc[0][j] + from_##NAME(b[n])); \
    }                                                                                                     \
}
"""
# the kernel's instance for each dtype: the macro's NAME, T and EIGHT
DTYPES = {mx.bfloat16: ("bfloat16", "u16", "eight_u16"), mx.float16: ("float16", "u16", "eight_u16"),
          mx.float32: ("float32", "float", "eight_f32")}
NVRTC = "libnvrtc.so.13"  # the CUDA 13 runtime compiler, as mlx-cuda-13 uses


def nvrtc() -> ctypes.CDLL:
    """NVRTC: the copy MLX's CUDA backend has loaded (by its name), else the nvidia-cuda-nvrtc package's."""
    try:
        return ctypes.CDLL(NVRTC)
    except OSError:
        for dist in ("nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu13"):
            try:
                return load(str(importlib.metadata.distribution(dist).locate_file(f"nvidia/cu13/lib/{NVRTC}")))
            except (importlib.metadata.PackageNotFoundError, OSError):
                continue
    raise RuntimeError(f"{NVRTC} (CUDA's runtime compiler, which MLX's CUDA backend needs) cannot be loaded")


def load(path: str) -> ctypes.CDLL:
    """NVRTC from path, with the builtins library beside it loaded first: NVRTC opens that one by its name, which
    the loader finds only on its search path or already loaded."""
    for builtins in sorted(pathlib.Path(path).parent.glob("libnvrtc-builtins.so.*")):
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(path)


def library_path(lib: ctypes.CDLL) -> str:
    """The file a loaded library came from (dlinfo's link map)."""
    class LinkMap(ctypes.Structure):
        _fields_ = [("l_addr", ctypes.c_void_p), ("l_name", ctypes.c_char_p)]
    link = ctypes.POINTER(LinkMap)()
    if ctypes.CDLL(None).dlinfo(ctypes.c_void_p(lib._handle), 2, ctypes.byref(link)) != 0:  # 2: RTLD_DI_LINKMAP
        raise RuntimeError(f"where {lib._name} was loaded from is unknown")
    return link.contents.l_name.decode()


# what a kernel adds to each sum: its ADDEND_INPUT and PLUS_ADDEND (T and NAME filled in)
ADDENDS = {"": ("", ""), "bias": (", const {t}* b", "+ from_{name}(b[n])"),
           "residual": (", const {t}* b", "+ from_{name}(b[(size_t)(r0 + j) * N + n])")}


class Plan(NamedTuple):
    """How a product's kernel is cut: J rows of x a block, `outputs` weight rows (gated: output pairs) a warp,
    `loads` 16-byte loads of each weight row in flight, `warps` a block. No choice changes a bit of any output: each
    is the same dot product in the same order (DOT_ROWS), whatever the plan."""
    rows_per_block: int
    outputs: int = 1
    loads: int = 4
    warps: int = 8


def instance(dtype: mx.Dtype, plan: Plan, kind: str) -> str:
    """SOURCE with one kernel for dtype and plan: `few_rows_gated` (kind "gated"), `few_rows_qkv` (kind "qkv", one
    weight row a warp), else `few_rows_product` with kind's addend ("", "bias" or "residual")."""
    name, t, eight = DTYPES[dtype]
    given, plus = ADDENDS[kind if kind in ADDENDS else ""]
    weights = plan.outputs * (2 if kind == "gated" else 1)  # weight rows a warp
    if kind == "qkv" and plan.outputs != 1:
        raise ValueError(f"few_rows_qkv takes one weight row a warp, not {plan.outputs}")
    kernel = {"gated": f"GATED({name}, {t}, {plan.rows_per_block}, {plan.outputs})",
              "qkv": f"QKV({name}, {t}, {plan.rows_per_block})"}.get(
                  kind, f"PRODUCT({name}, {t}, {plan.rows_per_block}, {plan.outputs})")
    return (f"{SOURCE}#define ADDEND_INPUT {given.format(t=t)}\n#define PLUS_ADDEND {plus.format(name=name)}\n"
            f"DOT_ROWS({name}, {t}, {eight}, {plan.rows_per_block}, {weights}, {plan.loads})\n{kernel}\n")


def compile_apart(lib: ctypes.CDLL, arch: str, source: str) -> bytes:
    """source compiled into a cubin for arch, as `compile_for`, by a process of our own (`main`) in a session of
    its own. While NVRTC compiles it takes SIGINT and SIGTERM for the whole process, then puts the handlers back
    (tests/test_gpu_products.py reads them): a Ctrl-C or a server's stop that came during a compile ended the
    process, with status 4 here and SIGSEGV on the H200, where a first run compiles for seconds (three of the
    server's stop tests, streams cut off without their error, 2026-12-04). Its own session keeps a terminal's
    Ctrl-C from the compiling process, which then ends alone."""
    done = subprocess.run([sys.executable, "-m", "qwen2s.gpu_products", arch, library_path(lib)],
                          input=source.encode(), capture_output=True, start_new_session=True)
    if done.returncode != 0:
        error = done.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {done.returncode}"]
        raise RuntimeError(f"the kernel's compile failed: {error[-1]}")
    return done.stdout


def compile_for(lib: ctypes.CDLL, arch: str, source: str) -> bytes:
    """source compiled by NVRTC into machine code (a cubin) for arch, e.g. "sm_90"."""
    program = ctypes.c_void_p()
    check = functools.partial(checked, lib, program)
    check(lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"gpu_products.cu", 0, None, None))
    try:
        options = [f"--gpu-architecture={arch}".encode()]
        check(lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options)))
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(program, cubin))
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def checked(lib: ctypes.CDLL, program: ctypes.c_void_p, status: int) -> None:
    """An NVRTC call's status, raised with the compiler's log when it is not success (0)."""
    if status == 0:
        return
    log = b""
    size = ctypes.c_size_t()
    if program and lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)) == 0:
        buffer = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(program, buffer)
        log = buffer.value
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    raise RuntimeError(f"NVRTC: {lib.nvrtcGetErrorString(status).decode()} {log.decode(errors='replace').strip()}")


def nvrtc_version(lib: ctypes.CDLL) -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def is_elf(data: bytes) -> bool:
    """A whole 64-bit ELF file (a cubin is one): its program or section headers, written last, end where it does."""
    if len(data) < 0x40 or data[:5] != b"\x7fELF\x02":
        return False
    field = functools.partial(int.from_bytes, byteorder="little")
    phoff, shoff = field(data[0x20:0x28]), field(data[0x28:0x30])
    phentsize, phnum, shentsize, shnum = (field(data[i : i + 2]) for i in (0x36, 0x38, 0x3A, 0x3C))
    return max(phoff + phentsize * phnum, shoff + shentsize * shnum) == len(data)


@functools.cache
def machine_code(dtype: mx.Dtype, plan: Plan, kind: str = "") -> bytes:
    """The kernel's cubin for this GPU, dtype, plan and kind (`instance`): from the cache folder, else compiled
    now and kept there (written to a temporary name, then renamed: a concurrent build writes the same file; a broken
    file is built again). One small cubin each, since MLX hashes the whole cubin at every launch (see `product`)."""
    lib = nvrtc()
    arch = mx.device_info()["architecture"]  # "sm_90" on an H200
    source = instance(dtype, plan, kind)
    key = hashlib.sha256(f"{source}\0{arch}\0{nvrtc_version(lib)}".encode()).hexdigest()[:16]
    which = f"{DTYPES[dtype][0]}-{'-'.join(map(str, plan[:3]))}{'-' * bool(kind)}{kind}"
    path = blas.cache_folder("cuda") / f"gpu_products-{arch}-{which}-{key}.cubin"
    try:
        data = path.read_bytes()
        if is_elf(data):
            return data
    except OSError:
        pass
    data = compile_apart(lib, arch, source)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache folder: compiled again in the next process
    return data


@functools.cache
def cuda() -> bool:
    return mx.cuda.is_available()


def takes(x: mx.array, weight: mx.array) -> bool:
    """Whether the kernel computes x @ weight.T here: the default device a CUDA GPU (tests move to the CPU and
    back), one dtype of the kernel's, rows of whole groups of eight."""
    return (mx.default_device() == mx.gpu and cuda() and x.dtype == weight.dtype and x.dtype in DTYPES
            and weight.shape[1] % 8 == 0)


def plan_for(rows: int, N: int, K: int, kind: str) -> Plan:
    """The plan for rows of x [rows, K] and N weight rows (gated: N output pairs), as `tools/product_plans.py` found
    fastest on the H200 (benchmarks/README.md, "How our kernel is cut"): one row, two loads in flight (the 7B's
    q_proj and down_proj 1.15x four); more rows, blocks of eight rows, one load in flight, four warps a block, and
    four weight rows a warp for the head (32 rows 1.36-1.54x the first plan, eight warps with four loads)."""
    if rows == 1:
        return Plan(1, 1, 2, 8)
    return Plan(8, 4 if N >= 16384 and kind in ADDENDS else 1, 1, 4)


def launch(kernel: str, kind: str, x: mx.array, weights: list[mx.array], addend: list[mx.array],
           plan: Plan | None = None) -> list[mx.array]:
    """A kernel of ours over x [..., K] and weights [N, K] -> [..., N], cut by plan (else `plan_for`'s): one output,
    or for kind "qkv" one for each weight (q's, k's and v's)."""
    *lead, K = x.shape
    rows = math.prod(lead)
    Ns = [w.shape[0] for w in weights] if kind == "qkv" else [weights[0].shape[0]]
    J, outputs, _, warps = plan = plan or plan_for(rows, sum(Ns), K, kind)
    ys = mx.fast.precompiled_cuda_kernel(
        name=kernel, compiled_source=machine_code(x.dtype, plan, kind), inputs=[x.reshape(rows, K), *weights, *addend],
        output_shapes=[(rows, N) for N in Ns], output_dtypes=[x.dtype] * len(Ns), scalars=[rows, K, *Ns[:2]],
        grid=((rows + J - 1) // J * 32 * warps, -(-sum(Ns) // (outputs * warps)), 1), threadgroup=(32 * warps, 1, 1),
        ensure_row_contiguous=True)
    return [y.reshape(*lead, N) for y, N in zip(ys, Ns, strict=True)]


def product(x: mx.array, weight: mx.array, bias: mx.array | None = None,
            residual: mx.array | None = None) -> mx.array:
    """[..., in] @ [out, in].T (+ [out]) (+ residual [..., out]) -> [..., out], each row alone (see the module's
    note). A bias or a residual is added in the kernel, one node fewer each (q, k and v have a bias, o_proj and
    down_proj take the residual stream)."""
    N = weight.shape[0]
    fits = lambda a, shape: a is not None and a.dtype == x.dtype and a.shape == shape  # noqa: E731
    if fits(residual, (*x.shape[:-1], N)) and bias is None:
        return launch("few_rows_product", "residual", x, [weight], [residual.reshape(-1, N)])[0]
    if fits(bias, (N,)):
        y = launch("few_rows_product", "bias", x, [weight], [bias])[0]
    else:
        y = launch("few_rows_product", "", x, [weight], [])[0]
        y = y if bias is None else y + bias
    return y if residual is None else residual + y


def gated(x: mx.array, gate: mx.array, up: mx.array) -> mx.array:
    """SwiGLU's gate, silu(x @ gate.T) * (x @ up.T): [..., in] -> [..., out] in one kernel, each row alone."""
    return launch("few_rows_gated", "gated", x, [gate, up], [])[0]


def qkv(x: mx.array, wq: mx.array, wk: mx.array, wv: mx.array, bq: mx.array, bk: mx.array,
        bv: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """x's queries, keys and values with their biases, [..., in] -> [..., Nq], [..., Nk], [..., Nk]: in one kernel,
    each output the bits of `product` (the same sums in the same order), each row alone. One launch in place of
    three: k's and v's products are small (128 weight rows in the 0.5B), so each alone leaves the GPU idle."""
    Nk = wk.shape[0]
    if wv.shape == wk.shape and all(b.dtype == x.dtype for b in (bq, bk, bv)) and \
            (bq.shape, bk.shape, bv.shape) == ((wq.shape[0],), (Nk,), (Nk,)) and wq.shape[1] == wk.shape[1]:
        return tuple(launch("few_rows_qkv", "qkv", x, [wq, wk, wv], [bq, bk, bv]))
    return product(x, wq, bq), product(x, wk, bk), product(x, wv, bv)


def main() -> None:
    """`python -m qwen2s.gpu_products ARCH NVRTC_PATH`: the source on stdin compiled, its cubin on stdout
    (compile_apart's process); a failure is one line on stderr and status 1."""
    arch, path = sys.argv[1:3]
    try:
        cubin = compile_for(load(path), arch, sys.stdin.read())
    except (OSError, RuntimeError) as e:
        sys.exit(" ".join(str(e).split()))
    sys.stdout.buffer.write(cubin)


if __name__ == "__main__":
    main()
