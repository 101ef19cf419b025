"""Products of a few rows on a CUDA GPU, each row computed alone: the GPU's counterpart of blas_adapter.c.

MLX's CUDA backend multiplies one row with its own gemv and more rows with a cuBLAS algorithm chosen by
the shape, and each rounds differently: a row's result would depend on how many rows stand beside it.
This kernel computes every output as one dot product in one fixed order, whatever the number of rows:
a warp per weight row and per block of eight input rows; each lane sums eight elements at a time (one
16-byte load of bfloat16), from its own offset, with four such loads of the weight row in flight, in
float32 with one rounding per multiply-add (`__fmaf_rn`, never left to the compiler), and the warp's 32
partial sums are added in one fixed butterfly. The blocks of input rows that share weight rows are
launched side by side (blockIdx.x), so that a weight row comes from memory once and from L2 for the others.

Measured on the H200 (`python tools/gpu_rows.py`, benchmarks/README.md "Each row alone on CUDA"): the same bits
for 1 to 64 rows of every Qwen2 0.5B and 7B product; one row of the 7B's down_proj and gate_proj 1.65x and 1.47x
MLX's gemv (1.89x and 1.87x with the first version: four elements a load, one load in flight); a one-row 0.5B
decode step 0.63x the step whose products are padded to 64 rows. At 64 rows the kernel is the slower one (the
head product 3.1 ms against cuBLAS's 0.16 ms): `--parallel` defaults to 32 on a GPU.
"""

import functools

import mlx.core as mx

__all__ = ["takes", "product"]

HEADER = r"""
template <typename U> struct alignas(8 * sizeof(U)) eight { U v[8]; };
"""

SOURCE = r"""
    const int R = x_shape[0];
    const int K = x_shape[1];
    const int N = w_shape[0];
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int r0 = blockIdx.x * 8;
    if (n >= N || r0 >= R) return;
    const T* wn = w + (size_t)n * K;
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j] = 0.0f;
    for (int k0 = lane * 8; k0 < K; k0 += 1024) {
        eight<T> wq[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            if (k0 + u * 256 < K) wq[u] = *reinterpret_cast<const eight<T>*>(wn + k0 + u * 256);
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int k = k0 + u * 256;
            if (k < K) {
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    if (r0 + j < R) {
                        const eight<T> xq = *reinterpret_cast<const eight<T>*>(x + (size_t)(r0 + j) * K + k);
#pragma unroll
                        for (int t = 0; t < 8; t++) {
                            acc[j] = __fmaf_rn(static_cast<float>(wq[u].v[t]), static_cast<float>(xq.v[t]), acc[j]);
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < 8; j++) {
        float s = acc[j];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0 && r0 + j < R) y[(size_t)(r0 + j) * N + n] = static_cast<T>(s);
    }
"""


@functools.cache
def kernel():
    """Compiled by MLX on its first call (NVRTC), once per dtype."""
    return mx.fast.cuda_kernel(name="few_rows_product", input_names=["x", "w"], output_names=["y"],
                               source=SOURCE, header=HEADER)


@functools.cache
def cuda() -> bool:
    return mx.cuda.is_available()


def takes(x: mx.array, weight: mx.array) -> bool:
    """Whether the kernel computes x @ weight.T here: the default device a CUDA GPU (tests move to the CPU and
    back), one dtype, rows of whole groups of eight."""
    return mx.default_device() == mx.gpu and cuda() and x.dtype == weight.dtype and weight.shape[1] % 8 == 0


def product(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """[..., in] @ [out, in].T (+ [out]) -> [..., out], each row alone (see the module's note)."""
    *lead, E = x.shape
    rows = 1
    for d in lead:
        rows *= d
    N = weight.shape[0]
    y = kernel()(inputs=[x.reshape(rows, E), weight], template=[("T", x.dtype)],
                 grid=((rows + 7) // 8 * 256, (N + 7) // 8, 1), threadgroup=(256, 1, 1),
                 output_shapes=[(rows, N)], output_dtypes=[x.dtype])[0]
    y = y.reshape(*lead, N)
    return y if bias is None else y + bias
