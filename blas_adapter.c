/* MLX's CPU BLAS calls, answered by scipy-openblas32 (the OpenBLAS that numpy and scipy ship).
 *
 * MLX's Linux wheel links the netlib reference BLAS, about 60x slower than OpenBLAS. This
 * library defines the three BLAS entry points MLX calls (nm -D --undefined-only libmlx.so:
 * cblas_sgemm, cblas_dgemm, cblas_cgemm) and forwards them to scipy-openblas32, whose
 * symbols all carry a scipy_ prefix. It is linked to that library with an rpath, so loading
 * this one file (blas.py does, RTLD_GLOBAL, before mlx.core) brings OpenBLAS with it.
 *
 * Two more things. MLX computes every float32 product with sgemm, decoding's single-row
 * [1, E] @ W.T included, and OpenBLAS's sgemm reads the weights slowly for a few rows and rounds a
 * row differently depending on the rows beside it. So products of a few rows against a layer's
 * weights (a decode step, a batch's decode step, a verifier step) are computed by our own kernel
 * below: each element one dot product in a fixed order, the weights read once for all the rows,
 * split across a pool of threads. Attention's products (queries against keys, probabilities times values)
 * take our kernels too, for any number of rows, so that a query's result does not depend on how many were
 * computed with it. Other few-row layouts go row by row to sgemv; single-column products to sgemv too.
 *
 * Built once by blas.py: cc -O2 -ffp-contract=off -pthread -shared -fPIC -DADAPTER_KEY=... -L<lib>
 *                        -lscipy_openblas -Wl,-rpath,<lib>
 */
#ifndef ADAPTER_KEY
#define ADAPTER_KEY "unkeyed"
#endif

#define _GNU_SOURCE
#include <stddef.h>
#include <stdio.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
/* Products of at most KERNEL_ROWS rows against a layer's weights (a decode step of a batch, a verifier step, a short
 * prompt) are computed by our own kernel below, each element one dot product in a fixed order: as fast as OpenBLAS's
 * sgemm up to 64 rows, and 1.4-1.6x faster at 24-32 (measured). Other layouts of at most FEW_ROWS rows go row by
 * row to sgemv; larger products to OpenBLAS's sgemm. Products over at most SCORE_DEPTH (attention's queries
 * against its keys, K a head's dimension) take our kernel for any M: a query's scores are then the same bits
 * whatever the rows beside it, in a decode step or a prefill. */
enum { KERNEL_ROWS = 64, SCORE_DEPTH = 256, FEW_ROWS = 16, BLOCK_BYTES = 6 << 20, BLOCK_ALIGN = 64 };  /* 6 MB: best of 2, 6, 16 */

void scipy_cblas_sgemm(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                       float *, int);
void scipy_cblas_sgemv(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
void scipy_cblas_dgemm(int, int, int, int, int, int, double, const double *, int, const double *, int, double,
                       double *, int);
void scipy_cblas_cgemm(int, int, int, int, int, int, const void *, const void *, int, const void *, int,
                       const void *, void *, int);
void scipy_openblas_set_num_threads(int);

/* blas.py checks that a cached file is this adapter, built from this source for this library. */
const char *qwen2_scratch_blas_adapter_key(void) { return ADAPTER_KEY; }

/* ---------------------------------------------------------------------------------------------
 * C = alpha * A @ B.T + beta * C for A [M, K] (a few rows) and B [N, K] (a layer's weights).
 *
 * Each element C[i, j] is one dot product of A's row i and B's row j, summed in one fixed order:
 * eight lanes over K (k, k+8, ... into lane k % 8), the lanes added in a fixed tree, then the tail.
 * Nothing in that order depends on M, on the rows beside row i, on the thread that computes it or
 * on the CPU (AVX2 and AVX-512 machines run the same eight-lane code), so a row comes out the same
 * bits alone, in a batch of 16, or in a verifier step: one request, one answer. And unlike one sgemv
 * per row, the weights are read from memory once for all the rows: a batch's step costs little more
 * than one row's while it is bound by memory, not arithmetic.
 * --------------------------------------------------------------------------------------------- */

#include "lanes.h"  /* v8, madd, lanes_sum, lanes_sums: shared with attention.cpp */

static inline __attribute__((always_inline)) float madd1(float acc, float a, float b, int FUSED) {
    return FUSED ? __builtin_fmaf(a, b, acc) : acc + a * b;
}

struct product {
    const float *A, *B;
    float *C;
    int M, N, K, lda, ldb, ldc;
    float alpha, beta;
};

/* C[i:i+ROWS, j:j+COLS] (ROWS, COLS <= 4), ROWS x COLS dot products at once: each B load serves ROWS rows, each A load COLS
 * columns. ROWS and COLS are constants where it is inlined, so the accumulators live in registers. With `ahead` (the
 * first rows of a block) it also prefetches the next block's weight rows from memory into every cache level: 15-18%
 * faster for 4-16 rows on an AMD EPYC. Not as non-temporal (into L1 alone): on an Intel Xeon the rows of a block,
 * fetched once and read again for each group of rows, were then evicted before use, and 2-8 rows streamed 9-12 GB/s
 * against 20-28 with every level (benchmarks/README.md, "The prefetch's cache level"). */
static inline __attribute__((always_inline)) void dots(const struct product *p, int i, int j, int ROWS, int COLS,
                                                       int ahead, int FUSED) {
    v8 acc[4][4];  /* zeroed one by one: `= {0}` zeroed all 16 in memory (rep stos), 9% of a prefill's scores */
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
        for (int c = 0; c < COLS; c++) acc[r][c] = (v8){0};
    int K8 = p->K & ~7;
    const float *next = p->B + (size_t)(j + COLS) * p->ldb;  /* the next block's weight rows */
    int more = ahead && j + 2 * COLS <= p->N;
    for (int k = 0; k < K8; k += 8) {
        v8 b[4];
        if (more && (k & 15) == 0)  /* one cache line of each of the next block's rows */
            for (int c = 0; c < COLS; c++) __builtin_prefetch(next + (size_t)c * p->ldb + k, 0, 3);
#pragma GCC unroll 4
        for (int c = 0; c < COLS; c++) b[c] = *(const v8u *)(p->B + (size_t)(j + c) * p->ldb + k);
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            v8 a = *(const v8u *)(p->A + (size_t)(i + r) * p->lda + k);
#pragma GCC unroll 4
            for (int c = 0; c < COLS; c++) acc[r][c] = madd(acc[r][c], a, b[c], FUSED);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        v4 sums = COLS == 4 ? lanes_sums(acc[r][0], acc[r][1], acc[r][2], acc[r][3]) : (v4){0};
        for (int c = 0; c < COLS; c++) {
            const float *a = p->A + (size_t)(i + r) * p->lda, *b = p->B + (size_t)(j + c) * p->ldb;
            float s = COLS == 4 ? sums[c] : lanes_sum(acc[r][c]);
            for (int k = K8; k < p->K; k++) s = madd1(s, a[k], b[k], FUSED);
            float *y = p->C + (size_t)(i + r) * p->ldc + j + c;
            *y = p->beta == 0.0f ? p->alpha * s : p->alpha * s + p->beta * *y;
        }
    }
}

/* Columns [j0, j1) of every row: blocks of four weight rows, each read once for all of A's rows, ROWS rows
 * at a time (as many as the registers hold: 4 x 4 accumulators in AVX-512's 32 registers, 3 x 4 in AVX2's 16;
 * the same eight-lane arithmetic in both, so the same bits). */
static int one_row_interleaved;  /* one row: four weight rows at a time, or one after another (choose_kernel) */

static inline __attribute__((always_inline)) void columns(const struct product *p, int j0, int j1, int ROWS,
                                                          int FUSED) {
    int j = j0;
    if (p->M == 1) {  /* one row (a decode step): each sum is its own chain either way, so the same bits */
        if (one_row_interleaved)
            for (; j + 4 <= j1; j += 4) dots(p, 0, j, 1, 4, 1, FUSED);
        for (; j < j1; j++) dots(p, 0, j, 1, 1, 0, FUSED);
        return;
    }
    for (; j + 4 <= j1; j += 4) {
        int i = 0;
        for (; i + ROWS <= p->M; i += ROWS) dots(p, i, j, ROWS, 4, i == 0, FUSED);
        for (; i < p->M; i++) dots(p, i, j, 1, 4, i == 0, FUSED);
    }
    for (; j < j1; j++)
        for (int i = 0; i < p->M; i++) dots(p, i, j, 1, 1, 0, FUSED);
}

static void columns_baseline(const struct product *p, int j0, int j1) { columns(p, j0, j1, 2, 0); }

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512vl,avx2,fma"))) static void columns_avx512(const struct product *p, int j0,
                                                                                int j1) {
    columns(p, j0, j1, 4, 1);
}
__attribute__((target("avx2,fma"))) static void columns_avx2(const struct product *p, int j0, int j1) {
    columns(p, j0, j1, 3, 1);
}
#endif

typedef void (*columns_fn)(const struct product *, int, int);
typedef void (*values_fn)(const struct product *, float *);
static void values_baseline(const struct product *p, float *acc);
#if defined(__x86_64__)
static void values_avx512(const struct product *p, float *acc);
static void values_avx2(const struct product *p, float *acc);
#endif
static values_fn values_kernel;

static const char *kernel_name = "none yet";

/* The best kernel this CPU runs; QWEN2_SCRATCH_KERNEL=avx2 or baseline forces a lesser one (tests check that
 * AVX-512's and AVX2's give the same bits). One row reads four weight rows at a time on Intel CPUs, one after
 * another elsewhere: one row's sum is one chain of FMAs (each waits for the one before it), so one weight row at a
 * time streamed 13-14 GB/s on an Intel Xeon against 18-22 for four at a time, where an AMD EPYC had streamed one
 * row at a time best (24.6-28.8 GB/s; two at a time 18-25.6); QWEN2_SCRATCH_ONE_ROW=interleaved or sequential
 * forces either (benchmarks/README.md, "One row, four weight rows at a time"). */
static void choose_one_row(void) {
    const char *forced = getenv("QWEN2_SCRATCH_ONE_ROW");
    if (forced && !strcmp(forced, "interleaved")) one_row_interleaved = 1;
    else if (forced && !strcmp(forced, "sequential")) one_row_interleaved = 0;
    else {
#if defined(__x86_64__)
        one_row_interleaved = __builtin_cpu_is("intel");
#else
        one_row_interleaved = 0;
#endif
    }
}

static columns_fn choose_kernel(void) {
    choose_one_row();
#if defined(__x86_64__)
    const char *forced = getenv("QWEN2_SCRATCH_KERNEL");
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !(forced && !strcmp(forced, "baseline"));
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                 !(forced && !strcmp(forced, "avx2"));
    kernel_name = avx512 ? "avx512 4x4" : avx2 ? "avx2 3x4" : "baseline 2x4";
    values_kernel = avx512 ? values_avx512 : avx2 ? values_avx2 : values_baseline;
    return avx512 ? columns_avx512 : avx2 ? columns_avx2 : columns_baseline;
#else
    kernel_name = "baseline 2x4";
    values_kernel = values_baseline;
    return columns_baseline;
#endif
}

static columns_fn columns_kernel;

/* ---------------------------------------------------------------------------------------------
 * C = alpha * A @ B + beta * C for A [M, K] and B [K, N] with few columns (attention's probabilities
 * times its values: K the keys, N the head's dimension).
 *
 * Each element C[i, j] is one sum over k in increasing order, one fused multiply-add a step, whatever
 * M, the rows beside row i, the blocking or the CPU (AVX2 and AVX-512 both FMA): a query's output is the same bits in a decode step,
 * a verifier step or a prefill of any length, and keys past the query's position (probability 0 against
 * values 0) change nothing. B is read once for a block of rows, VALUE_KEYS keys at a time (kept in the
 * cache while every block of rows passes over them); the partial sums wait in `acc` between passes.
 * --------------------------------------------------------------------------------------------- */

enum { VALUE_COLUMNS = 256, VALUE_KEYS = 256 };  /* the layout's largest N (a head's dimension); keys a pass */

/* Rows [i, i + ROWS) by columns [j, j + 8 * VECS): acc[r][c] += sum over k in [k0, k1) of A[i + r, k] * B[k, c]. */
static inline __attribute__((always_inline)) void value_sums(const struct product *p, float *acc, int i, int j,
                                                             int k0, int k1, int ROWS, int VECS, int FUSED) {
    v8 s[4][8];
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < VECS; c++) s[r][c] = *(const v8u *)(acc + (size_t)(i + r) * p->N + j + 8 * c);
    for (int k = k0; k < k1; k++) {
        v8 a[4];
        for (int r = 0; r < ROWS; r++) a[r] = (v8){0} + p->A[(size_t)(i + r) * p->lda + k];
        const float *b = p->B + (size_t)k * p->ldb + j;
#pragma GCC unroll 8
        for (int c = 0; c < VECS; c++) {
            v8 bc = *(const v8u *)(b + 8 * c);
#pragma GCC unroll 4
            for (int r = 0; r < ROWS; r++) s[r][c] = madd(s[r][c], a[r], bc, FUSED);
        }
    }
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < VECS; c++) *(v8u *)(acc + (size_t)(i + r) * p->N + j + 8 * c) = s[r][c];
}

/* Every row over columns [j, j + 8 * VECS), ROWS rows at a time (the accumulators in registers), then the rest one by one. */
static inline __attribute__((always_inline)) void value_rows(const struct product *p, float *acc, int j, int k0,
                                                             int k1, int ROWS, int VECS, int FUSED) {
    int i = 0;
    for (; i + ROWS <= p->M; i += ROWS) value_sums(p, acc, i, j, k0, k1, ROWS, VECS, FUSED);
    for (; i < p->M; i++) value_sums(p, acc, i, j, k0, k1, 1, VECS, FUSED);
}

/* acc [M, N] = A @ B, VALUE_KEYS keys a pass: blocks of 4 rows x 32 columns in AVX-512's 32 registers, 3 x 16 in
 * AVX2's 16, 2 x 16 in the baseline's; N a multiple of 8. */
static inline __attribute__((always_inline)) void value_product(const struct product *p, float *acc, int ROWS,
                                                                int VECS, int FUSED) {
    for (int k0 = 0; k0 < p->K; k0 += VALUE_KEYS) {
        int k1 = p->K - k0 < VALUE_KEYS ? p->K : k0 + VALUE_KEYS;
        int j = 0;
        for (; j + 8 * VECS <= p->N; j += 8 * VECS) value_rows(p, acc, j, k0, k1, ROWS, VECS, FUSED);
        for (; j < p->N; j += 8) value_rows(p, acc, j, k0, k1, ROWS, 1, FUSED);
    }
}

static void values_baseline(const struct product *p, float *acc) { value_product(p, acc, 2, 2, 0); }
#if defined(__x86_64__)
__attribute__((target("avx512f,avx512vl,avx2,fma"))) static void values_avx512(const struct product *p, float *acc) {
    value_product(p, acc, 4, 4, 1);
}
__attribute__((target("avx2,fma"))) static void values_avx2(const struct product *p, float *acc) {
    value_product(p, acc, 3, 2, 1);
}
#endif


/* ---------------------------------------------------------------------------------------------
 * A pool of threads, one per core this process may run on, that split a product's columns.
 * Workers spin briefly for the next product (a decode step makes hundreds, microseconds apart),
 * then sleep on a futex, so an idle server or a busy machine costs nothing.
 * --------------------------------------------------------------------------------------------- */

enum { MAX_THREADS = 64, SPIN_NS = 200000, SMALL_PRODUCT = 1 << 16 };  /* spin 0.2 ms; one thread below 64K weights */

/* The product in hand, and its blocks of columns: `state` holds the product's number (high 32 bits) and the
 * next block to take (low 32), so a worker that wakes late cannot take a block of a product that is done. */
static struct product job;
static int job_block, job_blocks;  /* columns in a block (a multiple of 4); blocks in the product */
static void (*job_task)(void *, int);  /* or, for another kernel's job (qwen2_scratch_parallel), its task */
static void *job_context;
static _Atomic unsigned long long state;
static atomic_int job_number, blocks_done, workers_asleep;
static int workers;  /* started threads besides the caller */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER, caller_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int pool_ready;

static void futex_wait(atomic_int *at, int value) { syscall(SYS_futex, at, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0); }
static void futex_wake(atomic_int *at) { syscall(SYS_futex, at, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0); }

static void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Take blocks of product `number` until none is left. Any thread may compute any block (the bits do not
 * depend on who does), so a thread that the machine does not run just now (a busy machine) holds up one
 * block at most, never a share of the product. */
static void take_blocks(unsigned number) {
    for (;;) {
        unsigned long long seen = atomic_load(&state);
        if ((unsigned)(seen >> 32) != number || (int)(seen & 0xffffffffu) >= job_blocks) return;
        struct product p = job;  /* read before the claim: product `number` stays in place while it has blocks */
        void (*task)(void *, int) = job_task;
        void *context = job_context;
        int block = (int)(seen & 0xffffffffu), j0 = block * job_block;
        if (!atomic_compare_exchange_weak(&state, &seen, seen + 1)) continue;
        if (task)
            task(context, block);
        else
            columns_kernel(&p, j0, j0 + job_block < p.N ? j0 + job_block : p.N);
        atomic_fetch_add(&blocks_done, 1);
    }
}

static void *worker(void *arg) {
    (void)arg;
    int seen = atomic_load(&job_number);
    for (;;) {
        int number = atomic_load(&job_number);
        for (long start = now_ns(); number == seen; number = atomic_load(&job_number)) {
            if (now_ns() - start < SPIN_NS) {
                relax();
                continue;
            }
            atomic_fetch_add(&workers_asleep, 1);
            futex_wait(&job_number, seen);
            atomic_fetch_sub(&workers_asleep, 1);
        }
        seen = number;
        take_blocks((unsigned)number);
    }
    return NULL;
}

static int cores(void) {
    const char *forced = getenv("QWEN2_SCRATCH_THREADS");
    if (forced && atoi(forced) > 0) return atoi(forced) < MAX_THREADS ? atoi(forced) : MAX_THREADS;
    cpu_set_t set;
    int n = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    return n < 1 ? 1 : n < MAX_THREADS ? n : MAX_THREADS;
}

static void start_pool(void) {
    pthread_mutex_lock(&pool_lock);
    if (!atomic_load(&pool_ready)) {
        columns_kernel = choose_kernel();
        int wanted = cores() - 1;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 64 << 10);
        for (workers = 0; workers < wanted; workers++) {
            pthread_t t;
            if (pthread_create(&t, &attr, worker, NULL) != 0) break;
            pthread_detach(t);
        }
        pthread_attr_destroy(&attr);
        atomic_store(&pool_ready, 1);
    }
    pthread_mutex_unlock(&pool_lock);
}

/* Hand the job set up in job..job_blocks to the pool, take blocks too, and wait for all of them (the caller holds
 * caller_lock). */
static void run_job(void) {
    atomic_store(&blocks_done, 0);
    unsigned number = (unsigned)atomic_load(&job_number) + 1;
    atomic_store(&state, (unsigned long long)number << 32);
    atomic_store(&job_number, (int)number);
    if (atomic_load(&workers_asleep)) futex_wake(&job_number);
    take_blocks(number);
    for (int spins = 0; atomic_load(&blocks_done) < job_blocks; spins++)
        if (spins < 1000) relax(); else sched_yield();
    pthread_mutex_unlock(&caller_lock);
}

/* One product at a time goes to the pool (MLX calls from its one CPU stream; another caller meanwhile
 * computes on its own thread). */
static void few_rows_product(const struct product *p) {
    if (!atomic_load(&pool_ready)) start_pool();
    if (workers == 0 || (long)p->N * p->K < SMALL_PRODUCT || pthread_mutex_trylock(&caller_lock) != 0) {
        columns_kernel(p, 0, p->N);
        return;
    }
    job = *p;
    job_task = NULL;
    job_block = ((p->N + 8 * (workers + 1) - 1) / (8 * (workers + 1)) + 3) & ~3;  /* 8 blocks a thread */
    job_block = job_block < 16 ? 16 : job_block;
    job_blocks = (p->N + job_block - 1) / job_block;
    run_job();
}

/* task(context, i) for i in [0, items), spread over the same pool: attention.cpp's blocks of queries (found with
 * dlsym), so that one set of threads serves every kernel of a step instead of two sets spinning against each other
 * on the same cores. Any thread may run any item, so a task must not depend on which does. */
void qwen2_scratch_parallel(void (*task)(void *, int), void *context, int items) {
    if (!atomic_load(&pool_ready)) start_pool();
    if (workers == 0 || items < 2 || pthread_mutex_trylock(&caller_lock) != 0) {
        for (int i = 0; i < items; i++) task(context, i);
        return;
    }
    job_task = task;
    job_context = context;
    job_blocks = items;
    run_job();
}

/* ---------------------------------------------------------------------------------------------
 * The machine's read bandwidth, for bench's roofline: the best of `repeats` passes in which `threads`
 * threads each sum a contiguous share of x (eight-lane loads, four accumulators), in seconds.
 * --------------------------------------------------------------------------------------------- */

struct share {
    const float *x;
    long n;
    float sum;
};

static void *sum_share(void *arg) {
    struct share *s = arg;
    v8 acc[4] = {{0}};
    long i = 0;
    for (; i + 32 <= s->n; i += 32)
        for (int a = 0; a < 4; a++) acc[a] += *(const v8u *)(s->x + i + 8 * a);
    float sum = lanes_sum(acc[0] + acc[1] + acc[2] + acc[3]);
    for (; i < s->n; i++) sum += s->x[i];
    s->sum = sum;
    return NULL;
}

double qwen2_scratch_read_seconds(const float *x, long n, int threads, int repeats) {
    struct share shares[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    double best = 1e30;
    volatile float sink = 0;
    for (int r = 0; r < repeats; r++) {
        long start = now_ns();
        for (int t = 0; t < threads; t++) {
            long a = n * t / threads, b = n * (t + 1) / threads;
            shares[t] = (struct share){x + a, b - a, 0};
            if (t > 0 && pthread_create(&ids[t], NULL, sum_share, &shares[t]) != 0) return -1;
        }
        sum_share(&shares[0]);
        for (int t = 1; t < threads; t++) pthread_join(ids[t], NULL);
        double seconds = (now_ns() - start) * 1e-9;
        best = seconds < best ? seconds : best;
        for (int t = 0; t < threads; t++) sink += shares[t].sum;
    }
    (void)sink;
    return best;
}

/* OpenBLAS's threads wait for each other spinning: on a machine with more runnable threads than cores they
 * thrash (a 0.5B model's decode fell to 0.5 tok/s under a load of 6 on 2 cores, below the one-threaded
 * reference BLAS). So its products take as many threads as there are cores free: this process's cores minus
 * the other runnable tasks (/proc/loadavg's running count, less our caller and awake workers), read at most
 * every 100 ms. QWEN2_SCRATCH_THREADS, when set, is the count. */
static int free_cores(void) {
    static int count;
    static long checked;
    long now = now_ns();
    if (count && now - checked < 100000000L) return count;
    checked = now;
    int all = cores(), running = 0, total = 0, ours = 1 + workers - atomic_load(&workers_asleep);
    FILE *f = getenv("QWEN2_SCRATCH_THREADS") ? NULL : fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%*f %*f %*f %d/%d", &running, &total) != 2) running = 0;
        fclose(f);
    }
    int others = running > ours ? running - ours : 0;
    count = all - others > 1 ? all - others : 1;
    return count;
}

static int sgemm_threads;  /* OpenBLAS's thread count, as last set */

int qwen2_scratch_blas_sgemm_threads(void) { return sgemm_threads; }  /* for tests */

static void sgemm_on_free_cores(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                                const float *B, int ldb, float beta, float *C, int ldc) {
    int now = free_cores();
    if (now != sgemm_threads) scipy_openblas_set_num_threads(sgemm_threads = now);
    scipy_cblas_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* What runs few-row products here, for `qwen2-scratch --version`: the kernel and the threads. */
const char *qwen2_scratch_blas_kernel(void) {
    static char line[128];
    if (!atomic_load(&pool_ready)) start_pool();
    snprintf(line, sizeof line, "%s, %d threads%s", kernel_name, workers + 1,
             one_row_interleaved ? ", one row 4 weight rows at a time" : "");
    return line;
}

/* Columns [j0, j0 + n) of row i of C = op(A) @ op(B), by one sgemv: the layouts our kernel does not take
 * (B as [K, N], attention's values; a transposed A). Each element is one dot product whose order
 * depends on neither M nor the block. */
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

/* C = alpha * A @ B + beta * C through the value kernel (N a multiple of 8, at most VALUE_COLUMNS). */
static void values(const struct product *p) {
    if (!atomic_load(&pool_ready)) start_pool();
    float *acc = calloc((size_t)p->M * p->N, sizeof *acc);
    if (!acc) abort();
    values_kernel(p, acc);
    for (int i = 0; i < p->M; i++) {
        float *y = p->C + (size_t)i * p->ldc;
        const float *s = acc + (size_t)i * p->N;
        for (int j = 0; j < p->N; j++) y[j] = p->beta == 0.0f ? p->alpha * s[j] : p->alpha * s[j] + p->beta * y[j];
    }
    free(acc);
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    if (order == RowMajor && K > 0 && (M <= KERNEL_ROWS || K <= SCORE_DEPTH) && ta == NoTrans && tb != NoTrans) {
        struct product p = {A, B, C, M, N, K, lda, ldb, ldc, alpha, beta};
        few_rows_product(&p);
        return;
    }
    if (order == RowMajor && K > 0 && ta == NoTrans && tb == NoTrans && N % 8 == 0 && N <= VALUE_COLUMNS) {
        struct product p = {A, B, C, M, N, K, lda, ldb, ldc, alpha, beta};
        values(&p);
        return;
    }
    if (order == RowMajor && K > 0 && M <= FEW_ROWS) {
        /* The other layouts, row by row with sgemv; one row too goes block by block, so every row is the
         * same sgemv calls whatever M is (OpenBLAS may split one long sgemv's reduction across threads).
         * B as [K, N] (attention's values, N small) is walked whole: sgemv over a block of its columns
         * rounds differently from sgemv over all. */
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
    sgemm_on_free_cores(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_dgemm(int order, int ta, int tb, int M, int N, int K, double alpha, const double *A, int lda,
                 const double *B, int ldb, double beta, double *C, int ldc) {
    scipy_cblas_dgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_cgemm(int order, int ta, int tb, int M, int N, int K, const void *alpha, const void *A, int lda,
                 const void *B, int ldb, const void *beta, void *C, int ldc) {
    scipy_cblas_cgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
