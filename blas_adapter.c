/* MLX's CPU BLAS calls, answered by scipy-openblas32 (the OpenBLAS that numpy and scipy ship).
 *
 * MLX's Linux wheel links the netlib reference BLAS, about 60x slower than OpenBLAS. This
 * library defines the three BLAS entry points MLX calls (nm -D --undefined-only libmlx.so:
 * cblas_sgemm, cblas_dgemm, cblas_cgemm) and forwards them to scipy-openblas32, whose
 * symbols all carry a scipy_ prefix. It is linked to that library with an rpath, so loading
 * this one file (blas.py does, RTLD_GLOBAL, before mlx.core) brings OpenBLAS with it.
 *
 * One more thing: MLX computes every float32 product with sgemm, decoding's single-row
 * [1, E] @ W.T included. OpenBLAS forwards such calls to gemv on ARM64 but not on x86-64,
 * where its sgemv reads the weights about 2x faster than its sgemm; so we forward them here.
 *
 * Built once by blas.py: cc -O2 -shared -fPIC -DADAPTER_KEY=... -L<lib> -lscipy_openblas -Wl,-rpath,<lib>
 */
#ifndef ADAPTER_KEY
#define ADAPTER_KEY "unkeyed"
#endif

#include <stdlib.h>

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
/* Products of at most FEW_ROWS rows into at most FEW_ROWS_MAX_N columns are taken transposed
 * (below); the lm_head's 151936 columns measured faster as they are. */
enum { FEW_ROWS = 16, FEW_ROWS_MAX_N = 16384 };

void scipy_cblas_sgemm(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                       float *, int);
void scipy_cblas_sgemv(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
void scipy_cblas_dgemm(int, int, int, int, int, int, double, const double *, int, const double *, int, double,
                       double *, int);
void scipy_cblas_cgemm(int, int, int, int, int, int, const void *, const void *, int, const void *, int,
                       const void *, void *, int);

/* blas.py checks that a cached file is this adapter, built from this source for this library. */
const char *qwen2_scratch_blas_adapter_key(void) { return ADAPTER_KEY; }

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    int trans_a = ta != NoTrans, trans_b = tb != NoTrans;
    if (order == RowMajor && K > 0 && M == 1) {
        /* C[0, :] = op(B).T @ op(A)[0, :] */
        int inc_x = trans_a ? lda : 1;
        if (trans_b)  /* B is [N, K] */
            scipy_cblas_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, inc_x, beta, C, 1);
        else          /* B is [K, N] */
            scipy_cblas_sgemv(RowMajor, Trans, K, N, alpha, B, ldb, A, inc_x, beta, C, 1);
        return;
    }
    if (order == RowMajor && K > 0 && N == 1) {
        /* C[:, 0] = op(A) @ op(B)[:, 0] */
        int inc_x = trans_b ? 1 : ldb;
        if (trans_a)  /* A is [K, M] */
            scipy_cblas_sgemv(RowMajor, Trans, K, M, alpha, A, lda, B, inc_x, beta, C, ldc);
        else          /* A is [M, K] */
            scipy_cblas_sgemv(RowMajor, NoTrans, M, K, alpha, A, lda, B, inc_x, beta, C, ldc);
        return;
    }
    if (order == RowMajor && K > 0 && M > 1 && M <= FEW_ROWS && N <= FEW_ROWS_MAX_N) {
        /* A few rows (a verifier step's k+1 tokens): OpenBLAS x86-64 runs op(A) @ op(B) with
         * small M far slower than the same product the other way round (measured 10x for the
         * MLP's down projection), so take T = op(B).T @ op(A).T [N, M] and write C = T.T. */
        float *t = malloc(sizeof(float) * (size_t)N * M);
        if (t) {
            scipy_cblas_sgemm(RowMajor, trans_b ? NoTrans : Trans, trans_a ? NoTrans : Trans, N, M, K, alpha, B, ldb,
                              A, lda, 0.0f, t, M);
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++)
                    C[(size_t)i * ldc + j] = t[(size_t)j * M + i] + (beta != 0.0f ? beta * C[(size_t)i * ldc + j] : 0.0f);
            free(t);
            return;
        }
    }
    scipy_cblas_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_dgemm(int order, int ta, int tb, int M, int N, int K, double alpha, const double *A, int lda,
                 const double *B, int ldb, double beta, double *C, int ldc) {
    scipy_cblas_dgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_cgemm(int order, int ta, int tb, int M, int N, int K, const void *alpha, const void *A, int lda,
                 const void *B, int ldb, const void *beta, void *C, int ldc) {
    scipy_cblas_cgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
