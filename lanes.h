/* Eight-lane float arithmetic shared by blas_adapter.c and attention.cpp (C and C++): the vector types, one
 * multiply-add, and the fixed tree that adds a vector's eight lanes. Every sum of ours runs in eight lanes and
 * ends in lanes_sum's tree, so a result does not depend on the CPU kind (AVX2 and AVX-512 run the same code). */
#ifndef QWEN2_SCRATCH_LANES_H
#define QWEN2_SCRATCH_LANES_H

#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias)); /* an unaligned load */
typedef float v4 __attribute__((vector_size(16)));
typedef int i4 __attribute__((vector_size(16)));

/* acc + a * b, rounded once (FUSED: an FMA instruction, in the kernels built for FMA) or twice (the baseline's).
 * Written out, not left to the compiler's contraction (built with -ffp-contract=off): left to it, GCC 13.3 (the
 * H200's host) gave a row alone and the same row among others different bits, GCC 12.2 the same; contraction is
 * the compiler's only freedom in these loops, and nothing binds it to use it alike in every inlined copy. FUSED
 * is a constant where this is inlined. */
static inline __attribute__((always_inline)) v8 madd(v8 acc, v8 a, v8 b, int FUSED) {
    if (!FUSED) return acc + a * b;
    v8 r;
#pragma GCC unroll 8
    for (int l = 0; l < 8; l++) r[l] = __builtin_fmaf(a[l], b[l], acc[l]); /* one vfmadd...ps, vectorized */
    return r;
}

static inline __attribute__((always_inline)) float lanes_sum(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* lanes_sum of four vectors at once, as four lanes: the same additions in the same tree, so the same bits, but
 * done across the vectors (halves added, then pairs twice) in six vector additions instead of 21 lone ones. */
static inline __attribute__((always_inline)) v4 lanes_sums(v8 a, v8 b, v8 c, v8 d) {
    const i4 even = {0, 2, 4, 6}, odd = {1, 3, 5, 7};
    v8 x[4] = {a, b, c, d};
    v4 h[4]; /* [v0 + v4, v1 + v5, v2 + v6, v3 + v7] of each */
    for (int n = 0; n < 4; n++) {
        v4 low, high;
        memcpy(&low, &x[n], sizeof low);
        memcpy(&high, (const float *)&x[n] + 4, sizeof high);
        h[n] = low + high;
    }
    v4 ab = __builtin_shuffle(h[0], h[1], even) + __builtin_shuffle(h[0], h[1], odd); /* [a01, a23, b01, b23] */
    v4 cd = __builtin_shuffle(h[2], h[3], even) + __builtin_shuffle(h[2], h[3], odd); /* [c01, c23, d01, d23] */
    return __builtin_shuffle(ab, cd, even) + __builtin_shuffle(ab, cd, odd);          /* [a, b, c, d] */
}

#endif
