/* Route single-row and single-column float32 matrix products to matrix-vector products.
 *
 * MLX's CPU backend computes every float32 matmul with cblas_sgemm, decoding included, where
 * one operand is a single row ([1, E] @ W.T). OpenBLAS forwards such calls to its gemv kernels
 * on ARM64 (GEMM_GEMV_FORWARD) but not on x86-64, where its sgemm reads the weights at about
 * 11 GB/s and its sgemv at about 27 GB/s on the same matrix (2 cores). Preloaded ahead of
 * OpenBLAS, this file does that forwarding; every other call goes to OpenBLAS unchanged.
 *
 * Built on first use by qwen2_scratch.py (cc -O2 -shared -fPIC); see openblas_env().
 */
#define _GNU_SOURCE
#include <dlfcn.h>

enum { RowMajor = 101, NoTrans = 111 };

typedef void sgemm_t(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                     float *, int);
typedef void sgemv_t(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    static sgemm_t *sgemm;
    static sgemv_t *sgemv;
    if (!sgemm) {
        sgemv = (sgemv_t *)dlsym(RTLD_NEXT, "cblas_sgemv");
        sgemm = (sgemm_t *)dlsym(RTLD_NEXT, "cblas_sgemm");
    }
    int trans_a = ta != NoTrans, trans_b = tb != NoTrans;
    if (sgemv && order == RowMajor && K > 0 && M == 1) {
        /* C[0, :] = op(B).T @ op(A)[0, :] */
        int inc_x = trans_a ? lda : 1;
        if (trans_b)  /* B is [N, K] */
            sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, inc_x, beta, C, 1);
        else          /* B is [K, N] */
            sgemv(RowMajor, 112, K, N, alpha, B, ldb, A, inc_x, beta, C, 1);
        return;
    }
    if (sgemv && order == RowMajor && K > 0 && N == 1) {
        /* C[:, 0] = op(A) @ op(B)[:, 0] */
        int inc_x = trans_b ? 1 : ldb;
        if (trans_a)  /* A is [K, M] */
            sgemv(RowMajor, 112, K, M, alpha, A, lda, B, inc_x, beta, C, ldc);
        else          /* A is [M, K] */
            sgemv(RowMajor, NoTrans, M, K, alpha, A, lda, B, inc_x, beta, C, ldc);
        return;
    }
    sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
