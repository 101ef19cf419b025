/* Attention over a KV cache in one pass a query, for MLX's CPU backend: an MLX primitive (cpu_attention.py builds
 * and loads it).
 *
 * The model's own attention (qwen2_scratch.scaled_dot_product_attention) is MLX ops: a product for the scores, a
 * mask, the softmax's row maximum, exp, sum and division, a product for the values. On the CPU each op is a pass
 * over all the [G * L, S] scores, and MLX's element-wise kernels there run one element at a time: over a long
 * cache most of a chat turn went to those passes (10-14 ns a score). Here each query reads its own keys once for
 * its scores, exponentiates them in eight lanes and sums its values, with nothing of [L, S] between ops.
 *
 * One request, one answer: each query's output is computed alone, in one fixed order that depends on nothing but
 * its own position. Query i of row b sits at position start[b] + i and sees keys 0 .. start[b] + i, read in
 * increasing order; keys past it (later tokens of its chunk, unfilled cache slots) are never read. So a query
 * comes out the same bits in a prefill chunk of any length, in a decode step, in a verifier step and in a batch
 * of any rows, whatever the cache's capacity or the threads that compute it.
 *
 *   scores   s_j = lanes_sum(sum over d in eight lanes of (q_d * scale) * k_jd), j < n (n = position + 1)
 *   softmax  p_j = exp(s_j - max_j s_j), summed in eight lanes (j mod 8), the lanes in a fixed tree, then the tail
 *   values   o_d = (sum over j in increasing order of p_j * v_jd) / sum_j p_j
 *
 * exp is exp_of_nonpositive's arithmetic (Cephes' expf, 1e-7 relative). Float32, a head dimension that is a
 * multiple of 8 (at most 256): the Python side keeps MLX's ops for anything else.
 *
 * Built by cpu_attention.py: g++ -std=c++20 -O2 -ffp-contract=off -shared -fPIC -DNB_DOMAIN=mlx ... with
 * nanobind (the version MLX's own bindings were built with, so that an mx.array passes between them).
 */
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <dlfcn.h>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

#include "lanes.h"  // v8, madd, lanes_sum, lanes_sums: shared with blas_adapter.c

#ifndef ATTENTION_KEY
#define ATTENTION_KEY "unkeyed"
#endif

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

typedef int32_t i8 __attribute__((vector_size(32)));  // eight exponents' bits

constexpr int ROWS = 64, MAX_D = 256;  // queries that read the keys together; the widest head
constexpr int TILE = 256;  // keys whose scores and values every row of a block computes before the next ones

inline __attribute__((always_inline)) v8 load(const float *p) { return *(const v8u *)p; }
inline __attribute__((always_inline)) void store(float *p, v8 x) { *(v8u *)p = x; }
inline __attribute__((always_inline)) v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }

/* exp(x) for x <= 0 (-inf too): qwen2_scratch.exp_parts_of's arithmetic, eight at a time. */
inline __attribute__((always_inline)) v8 exp_nonpositive(v8 x) {
    x = x < -88.0f ? splat(-88.0f) : x;  // exp(-88) is 6e-39: below it, 0
    v8 n = (x * 1.4426950408889634f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
    v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8 p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    v8 e = p * (r * r) + r + 1.0f;
    i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;  // 2^n, 0 for n = -127
    v8 two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return e * two_n;
}

struct Job {
    const float *q, *k, *v;
    float *out;
    const int32_t *start;
    int B, H, K, L, S, D;
    float scale;
    int rows, blocks;  // G * L query rows a key head serves, in blocks of ROWS
};

/* Scores of rows [0, nr) (queries qs, scaled) against keys [j0, j1): s[r * TILE + j - j0]. Four keys and two rows
 * at a time (eight sums in flight), each score eight lanes over d summed in lanes_sum's tree. */
template <int FUSED>
inline __attribute__((always_inline)) void scores(const float *qs, int nr, const float *keys, int D, int j0, int j1,
                                                  float *s) {
    const int D8 = D / 8;
    int j = j0;
    for (; j + 4 <= j1; j += 4) {
        const float *k0 = keys + (size_t)j * D;
        for (int r = 0; r < nr; r += 2) {
            const float *q0 = qs + r * D, *q1 = r + 1 < nr ? q0 + D : q0;  // an odd last row: computed twice
            v8 acc0[4] = {splat(0), splat(0), splat(0), splat(0)}, acc1[4] = {splat(0), splat(0), splat(0), splat(0)};
            for (int c = 0; c < D8; c++) {
                v8 a0 = load(q0 + 8 * c), a1 = load(q1 + 8 * c);
#pragma GCC unroll 4
                for (int t = 0; t < 4; t++) {
                    v8 kt = load(k0 + t * D + 8 * c);
                    acc0[t] = madd(acc0[t], a0, kt, FUSED);
                    acc1[t] = madd(acc1[t], a1, kt, FUSED);
                }
            }
            v4 four = lanes_sums(acc0[0], acc0[1], acc0[2], acc0[3]);
            memcpy(s + (size_t)r * TILE + j - j0, &four, sizeof four);
            if (r + 1 < nr) {
                four = lanes_sums(acc1[0], acc1[1], acc1[2], acc1[3]);
                memcpy(s + (size_t)(r + 1) * TILE + j - j0, &four, sizeof four);
            }
        }
    }
    for (; j < j1; j++)
        for (int r = 0; r < nr; r++) {
            v8 acc = splat(0);
            for (int c = 0; c < D8; c++)
                acc = madd(acc, load(qs + r * D + 8 * c), load(keys + (size_t)j * D + 8 * c), FUSED);
            s[(size_t)r * TILE + j - j0] = lanes_sum(acc);
        }
}

/* acc[r] += sum over j in [j0, end[r]) of p[r * TILE + j - j0] * values[j], j in increasing order: two rows at a time
 * while both have keys (eight sums in flight for a head of 32 dims), four vectors of a row at a time. */
template <int FUSED>
inline __attribute__((always_inline)) void weighted_values(v8 (*acc)[MAX_D / 8], int nr, const float *values, int D,
                                                           int j0, const int *end, const float *p) {
    const int D8 = D / 8;
    for (int r = 0; r < nr; r += 2) {
        int two = std::min(2, nr - r);
        for (int c0 = 0; c0 < D8; c0 += 4) {
            int cs = std::min(4, D8 - c0);
            v8 a[2][4] = {{splat(0), splat(0), splat(0), splat(0)}, {splat(0), splat(0), splat(0), splat(0)}};
            for (int x = 0; x < two; x++)
                for (int c = 0; c < cs; c++) a[x][c] = acc[r + x][c0 + c];
            const float *p0 = p + (size_t)r * TILE - j0, *p1 = p0 + (two == 2 ? TILE : 0);
            int end0 = end[r], end1 = two == 2 ? end[r + 1] : j0, both = std::min(end0, end1), j = j0;
            if (cs == 4) {
                v8 s0 = a[0][0], s1 = a[0][1], s2 = a[0][2], s3 = a[0][3];
                v8 t0 = a[1][0], t1 = a[1][1], t2 = a[1][2], t3 = a[1][3];
                for (; j < both; j++) {
                    const float *vj = values + (size_t)j * D + 8 * c0;
                    v8 w0 = splat(p0[j]), w1 = splat(p1[j]), x0 = load(vj), x1 = load(vj + 8), x2 = load(vj + 16),
                       x3 = load(vj + 24);
                    s0 = madd(s0, w0, x0, FUSED), t0 = madd(t0, w1, x0, FUSED);
                    s1 = madd(s1, w0, x1, FUSED), t1 = madd(t1, w1, x1, FUSED);
                    s2 = madd(s2, w0, x2, FUSED), t2 = madd(t2, w1, x2, FUSED);
                    s3 = madd(s3, w0, x3, FUSED), t3 = madd(t3, w1, x3, FUSED);
                }
                a[0][0] = s0, a[0][1] = s1, a[0][2] = s2, a[0][3] = s3;
                a[1][0] = t0, a[1][1] = t1, a[1][2] = t2, a[1][3] = t3;
            }
            for (int x = 0; x < two; x++) {  // the rest of each row (all of it for a head of fewer than 32 dims)
                const float *px = x ? p1 : p0;
                for (int jj = cs == 4 ? j : j0; jj < (x ? end1 : end0); jj++)
                    for (int c = 0; c < cs; c++)
                        a[x][c] = madd(a[x][c], splat(px[jj]), load(values + (size_t)jj * D + 8 * (c0 + c)),
                                       FUSED);
            }
            for (int x = 0; x < two; x++)
                for (int c = 0; c < cs; c++) acc[r + x][c0 + c] = a[x][c];
        }
    }
}

/* One block of up to ROWS query rows of one key head of one batch row: the keys a tile (TILE) at a time, each tile's
 * keys and values read from memory once for all the rows, the softmax kept online (each row's running maximum m,
 * its sum l and its weighted values rescaled by exp(m_old - m_new) when a tile raises the maximum). The tiles start
 * at multiples of TILE from position 0, so a row's arithmetic depends on its position only. */
template <int FUSED>  // inlined into each target's function below, so that its FMAs are that target's instructions
inline __attribute__((always_inline)) void attend(const Job &J, int item, std::vector<float> &scratch) {
    const int D = J.D, D8 = J.D / 8, G = J.H / J.K;
    const int bk = item / J.blocks, b = bk / J.K, kh = bk % J.K;
    const int r0 = item % J.blocks * ROWS, nr = std::min(ROWS, J.rows - r0);
    const float *keys = J.k + (size_t)bk * J.S * D, *values = J.v + (size_t)bk * J.S * D;
    float *orow[ROWS], m[ROWS], l[ROWS];
    int n[ROWS], nmax = 0;
    scratch.resize((size_t)ROWS * (TILE + D) + sizeof(v8[ROWS][MAX_D / 8]) / sizeof(float) + 16);
    float *qs = scratch.data(), *s = qs + (size_t)ROWS * D;  // the scaled queries, then a tile's scores a row
    auto *acc = reinterpret_cast<v8(*)[MAX_D / 8]>(((uintptr_t)(s + (size_t)ROWS * TILE) + 31) & ~(uintptr_t)31);
    for (int r = 0; r < nr; r++) {
        int g = (r0 + r) / J.L, i = (r0 + r) % J.L;
        size_t at = (((size_t)b * J.H + (size_t)kh * G + g) * J.L + i) * D;
        orow[r] = J.out + at;
        for (int d = 0; d < D; d++) qs[r * D + d] = J.q[at + d] * J.scale;
        n[r] = std::max(std::min(J.start[b] + i + 1, J.S), 1);
        nmax = std::max(nmax, n[r]);
        m[r] = -INFINITY;
        l[r] = 0;
        for (int c = 0; c < D8; c++) acc[r][c] = splat(0);
    }
    for (int j0 = 0; j0 < nmax; j0 += TILE) {
        int j1 = std::min(j0 + TILE, nmax), end[ROWS];  // each row's keys in this tile end at end[r]
        scores<FUSED>(qs, nr, keys, D, j0, j1, s);
        for (int r = 0; r < nr; r++) {
            end[r] = std::max(std::min(j1, n[r]), j0);
            float *sr = s + (size_t)r * TILE - j0;
            if (end[r] == j0) continue;
            v8 top = splat(sr[j0]);
            int t = j0;
            for (; t + 8 <= end[r]; t += 8) {
                v8 x = load(sr + t);
                top = x > top ? x : top;
            }
            float mt = m[r];
            for (int lane = 0; lane < 8; lane++) mt = top[lane] > mt ? top[lane] : mt;
            for (; t < end[r]; t++) mt = sr[t] > mt ? sr[t] : mt;
            float rescale = exp_nonpositive(splat(m[r] - mt))[0];  // 0 for the first tile (m = -inf)
            v8 lanes = splat(0);
            for (t = j0; t + 8 <= end[r]; t += 8) {
                v8 e = exp_nonpositive(load(sr + t) - mt);
                store(sr + t, e);
                lanes += e;
            }
            float sum = lanes_sum(lanes);
            for (; t < end[r]; t++) {
                float e = exp_nonpositive(splat(sr[t] - mt))[0];
                sr[t] = e;
                sum += e;
            }
            l[r] = l[r] * rescale + sum;
            m[r] = mt;
            if (rescale != 1.0f)
                for (int c = 0; c < D8; c++) acc[r][c] *= rescale;
        }
        weighted_values<FUSED>(acc, nr, values, D, j0, end, s);
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < D8; c++) store(orow[r] + 8 * c, acc[r][c] / l[r]);
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void attend_fused(const Job &J, int item, std::vector<float> &scratch) {
    attend<1>(J, item, scratch);
}
#endif
void attend_baseline(const Job &J, int item, std::vector<float> &scratch) { attend<0>(J, item, scratch); }

using attend_fn = void (*)(const Job &, int, std::vector<float> &);

const char *kernel_name = "baseline";

attend_fn choose_kernel() {
#if defined(__x86_64__)
    const char *forced = getenv("QWEN2_SCRATCH_KERNEL");
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !(forced && !strcmp(forced, "baseline"))) {
        kernel_name = "avx2";
        return attend_fused;
    }
#endif
    return attend_baseline;
}

/* The blocks of a job run on the BLAS adapter's pool of threads (blas_adapter.c's qwen2_scratch_parallel, in the
 * process's global scope where blas.py loaded it): one set of threads for every kernel of a step, not a second set
 * spinning against it on the same cores. Without the adapter (QWEN2_SCRATCH_BLAS=reference), on this thread. */
using parallel_fn = void (*)(void (*)(void *, int), void *, int);

parallel_fn find_parallel() {
    static parallel_fn found = (parallel_fn)dlsym(RTLD_DEFAULT, "qwen2_scratch_parallel");
    return found;
}

struct Run {
    const Job *job;
    attend_fn kernel;
};

void run_block(void *context, int item) {
    thread_local std::vector<float> scratch;  // each thread's scores, kept between calls
    auto *run = static_cast<Run *>(context);
    run->kernel(*run->job, item, scratch);
}

void run(const Job &job) {
    static attend_fn kernel = choose_kernel();
    Run context{&job, kernel};
    int items = job.B * job.K * job.blocks;
    if (parallel_fn parallel = find_parallel())
        parallel(run_block, &context, items);
    else
        for (int i = 0; i < items; i++) run_block(&context, i);
}

/* a's elements (4 bytes each) in row-major order into dst, whatever a's strides (a view, a broadcast). */
void copy_dense(const mx::array &a, uint32_t *dst) {
    const uint32_t *src = a.data<uint32_t>();
    const int n = a.ndim();
    std::vector<int64_t> index(n, 0);
    for (size_t i = 0, size = a.size(); i < size; i++) {
        int64_t at = 0;
        for (int d = 0; d < n; d++) at += index[d] * a.strides()[d];
        dst[i] = src[at];
        for (int d = n - 1; d >= 0 && ++index[d] == a.shape(d); d--) index[d] = 0;
    }
}

class CachedAttention : public mx::Primitive {
  public:
    CachedAttention(mx::Stream stream, float scale) : mx::Primitive(stream), scale_(scale) {}

    void eval_cpu(const std::vector<mx::array> &inputs, std::vector<mx::array> &outputs) override {
        auto &out = outputs[0];
        out.set_data(mx::allocator::malloc(out.nbytes()));
        auto &encoder = mx::cpu::get_command_encoder(stream());
        for (const auto &a : inputs) encoder.set_input_array(a);
        encoder.set_output_array(out);
        std::vector<mx::array> dense;  // the inputs, or row-contiguous copies of those that are not (made here, not
        for (const auto &a : inputs) {  // by contiguous() nodes: a decode step's are already, a node costs microseconds)
            if (a.flags().row_contiguous) {
                dense.push_back(a);
                continue;
            }
            mx::array copy(a.shape(), a.dtype(), nullptr, {});
            copy.set_data(mx::allocator::malloc(copy.nbytes()));
            encoder.dispatch([a = mx::array::unsafe_weak_copy(a), copy = mx::array::unsafe_weak_copy(copy)]() mutable {
                copy_dense(a, copy.data<uint32_t>());
            });
            encoder.add_temporary(copy);
            dense.push_back(copy);
        }
        const auto &q = dense[0], &k = dense[1], &v = dense[2], &start = dense[3];
        Job job{q.data<float>(), k.data<float>(), v.data<float>(), out.data<float>(), start.data<int32_t>(),
                q.shape(0), q.shape(1), k.shape(1), q.shape(2), k.shape(2), q.shape(3), scale_, 0, 0};
        job.rows = job.H / job.K * job.L;
        job.blocks = (job.rows + ROWS - 1) / ROWS;
        encoder.dispatch([job]() { run(job); });
    }

    void eval_gpu(const std::vector<mx::array> &, std::vector<mx::array> &) override {
        throw std::runtime_error("[cached_attention] runs on the CPU only");
    }

    const char *name() const override { return "CachedAttention"; }

    bool is_equivalent(const mx::Primitive &other) const override {
        return scale_ == static_cast<const CachedAttention &>(other).scale_;
    }

    std::vector<mx::Shape> output_shapes(const std::vector<mx::array> &inputs) override { return {inputs[0].shape()}; }

  private:
    float scale_;
};

/* q [B, H, L, D], k and v [B, K, S, D] (float32), start [B] (int32: each row's first query's position)
 * -> [B, H, L, D]. */
mx::array cached_attention(const mx::array &q, const mx::array &k, const mx::array &v, const mx::array &start,
                           float scale) {
    if (q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape() || q.shape(0) != k.shape(0) ||
        q.shape(3) != k.shape(3) || k.shape(1) == 0 || q.shape(1) % k.shape(1) != 0 || q.shape(3) % 8 != 0 ||
        q.shape(3) > MAX_D || start.ndim() != 1 || start.shape(0) != q.shape(0))
        throw std::invalid_argument("[cached_attention] expects q [B, H, L, D], k and v [B, K, S, D], start [B]");
    auto s = mx::to_stream(mx::StreamOrDevice{});  // the default stream: the CPU's (the Python side checks)
    std::vector<mx::array> inputs = {mx::astype(q, mx::float32, s), mx::astype(k, mx::float32, s),
                                     mx::astype(v, mx::float32, s), mx::astype(start, mx::int32, s)};
    return mx::array(q.shape(), mx::float32, std::make_shared<CachedAttention>(s, scale), std::move(inputs));
}

}  // namespace

NB_MODULE(qwen2_cpu_attention, m) {
    m.def("cached_attention", &cached_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("start"),
          nb::arg("scale"));
    m.def("key", [] { return ATTENTION_KEY; });
    m.def("kernel", [] {
        choose_kernel();
        return std::string(kernel_name) + (find_parallel() ? ", on the BLAS adapter's threads" : ", one thread");
    });
}
