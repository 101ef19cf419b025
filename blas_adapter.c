/* MLX's CPU BLAS calls, answered by scipy-openblas32 (the OpenBLAS that numpy and scipy ship).
 *
 * MLX's Linux wheel links the netlib reference BLAS, about 60x slower than OpenBLAS. This
 * library defines the three BLAS entry points MLX calls (nm -D --undefined-only libmlx.so:
 * cblas_sgemm, cblas_dgemm, cblas_cgemm) and forwards them to scipy-openblas32, whose
 * symbols all carry a scipy_ prefix. It is linked to that library with an rpath, so loading
 * this one file (blas.py does, RTLD_GLOBAL, before mlx.core) brings OpenBLAS with it.
 *
 * Two more things. MLX computes every float32 product with sgemm, decoding's single-row
 * [1, E] @ W.T included. OpenBLAS forwards such calls to gemv on ARM64 but not on x86-64,
 * where its sgemv reads the weights about 2x faster than its sgemm; so we forward them here.
 * And products of a few rows are computed row by row with the same sgemv, so that a row's
 * result does not depend on the rows beside it (see row_block).
 *
 * Built once by blas.py: cc -O2 -shared -fPIC -DADAPTER_KEY=... -L<lib> -lscipy_openblas -Wl,-rpath,<lib>
 */
#ifndef ADAPTER_KEY
#define ADAPTER_KEY "unkeyed"
#endif

#include <stddef.h>

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
/* Products of at most FEW_ROWS rows (a decode step of a batch, a verifier step) are computed row by
 * row with sgemv; the weights are walked in blocks of about BLOCK_BYTES, so each block is read from
 * memory once and from the cache for the other rows. (Larger batches are not row by row: sgemm.) */
enum { FEW_ROWS = 16, BLOCK_BYTES = 6 << 20, BLOCK_ALIGN = 64 };  /* 6 MB: measured best of 2, 6 and 16 */

void scipy_cblas_sgemm(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                       float *, int);
void scipy_cblas_sgemv(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
void scipy_cblas_dgemm(int, int, int, int, int, int, double, const double *, int, const double *, int, double,
                       double *, int);
void scipy_cblas_cgemm(int, int, int, int, int, int, const void *, const void *, int, const void *, int,
                       const void *, void *, int);

/* blas.py checks that a cached file is this adapter, built from this source for this library. */
const char *qwen2_scratch_blas_adapter_key(void) { return ADAPTER_KEY; }

/* Columns [j0, j0 + n) of row i of C = op(A) @ op(B), by one sgemv. Each element is one dot product
 * over K whose order depends on neither M nor the block (checked bit for bit in tests/test_blas.py),
 * so a row comes out the same alone, in a batch, or in a verifier step: one request, one answer. */
static void row_block(int ta, int tb, int i, int j0, int n, int K, float alpha, const float *A, int lda,
                      const float *B, int ldb, float beta, float *C, int ldc) {
    const float *x = ta != NoTrans ? A + i : A + (size_t)i * lda;
    int inc_x = ta != NoTrans ? lda : 1;
    float *y = C + (size_t)i * ldc + j0;
    if (tb != NoTrans)  /* B is [N, K]: its rows j0.. */
        scipy_cblas_sgemv(RowMajor, NoTrans, n, K, alpha, B + (size_t)j0 * ldb, ldb, x, inc_x, beta, y, 1);
    else                /* B is [K, N]: its columns j0.. */
        scipy_cblas_sgemv(RowMajor, Trans, K, n, alpha, B + j0, ldb, x, inc_x, beta, y, 1);
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    if (order == RowMajor && K > 0 && M <= FEW_ROWS) {
        /* One row too goes block by block: every row is the same sgemv calls whatever M is (OpenBLAS may split
         * one long sgemv's reduction across threads otherwise: seen on a 16-core machine) */
        /* B as [N, K] (a layer's weights): blocks of its rows. B as [K, N] (attention's values, N small)
         * is walked whole: sgemv over a block of its columns rounds differently from sgemv over all. */
        int block = tb != NoTrans ? BLOCK_BYTES / (4 * K) / BLOCK_ALIGN * BLOCK_ALIGN : N;
        block = block < BLOCK_ALIGN && block < N ? BLOCK_ALIGN : block;
        for (int j0 = 0; j0 < N; j0 += block)
            for (int i = 0; i < M; i++)
                row_block(ta, tb, i, j0, N - j0 < block ? N - j0 : block, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    if (order == RowMajor && K > 0 && N == 1) {
        /* C[:, 0] = op(A) @ op(B)[:, 0] */
        int inc_x = tb != NoTrans ? 1 : ldb;
        if (ta != NoTrans)  /* A is [K, M] */
            scipy_cblas_sgemv(RowMajor, Trans, K, M, alpha, A, lda, B, inc_x, beta, C, ldc);
        else                /* A is [M, K] */
            scipy_cblas_sgemv(RowMajor, NoTrans, M, K, alpha, A, lda, B, inc_x, beta, C, ldc);
        return;
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
