/* Paged attention for decode rows, and the KV cache write, for pdmix/runtime/attention.py on CPUs.

   The cache (pdmix/runtime/kv_cache.py), fp32 or bf16, per layer: keys [num_blocks, KV, D, block] (each
   block's keys transposed), values [num_blocks, KV, block, D]; slot = block * block_size + offset.

   Decode: one query row per sequence, q [B, H, D] (bf16 or fp32), H = KV * G (grouped-query heads:
   head h reads kv head h / G). For each sequence and head, in fp32: scores s_t = (q . k_t) * scale
   over its `lengths[b]` tokens, e_t = exp(s_t - max s), out = (sum_t e_t v_t) / (sum_t e_t), in a fixed
   order (token by token, blocks in table order). A sequence's output depends only on its own q, its
   blocks and its length: never on the batch, the thread count or the blocks' padding. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "pdmix.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define PDMIX_X86 1
#include <immintrin.h>
#endif


/* The cache holds fp32, or bf16 (bf16 models: their keys and values are bf16 already, so storing them
   so is exact and halves what a decode step reads); every value is read as fp32, and the math is the
   same for both. */
static inline float kv_at(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline const void *kv_ptr(const void *p, int bf16, int64_t i) {
    return (const char *)p + i * (bf16 ? 2 : 4);
}

/* Cache lines to fetch ahead (sequence_heads sets them), a line or two per iteration of the loops
   below: issued all at once, a slice's prefetches filled the queue of outstanding misses and stalled
   the loads behind them, so reading the cache and computing took turns instead of overlapping (cold,
   SmolLM2's layers at 576 tokens: 51 -> 37 us a layer). */
struct ahead {
    const char *p;
    int64_t lines;
};

static inline void ahead_step(struct ahead *a) {
    for (int i = 0; i < 2 && a->lines > 0; i++, a->lines--, a->p += 64) __builtin_prefetch(a->p, 0, 2);
}

/* Scores of the group's G query heads q [G, D] against one block's keys k [D, block] (n tokens):
   s[j * stride + t] = sum_d q[j][d] * k[d][t], summed over d in order (the AVX2 form does the same
   multiplications and additions, 8 tokens a lane each, so both give the same bits). */
static void block_scores_plain(const float *q, int64_t G, int64_t D, const void *k, int bf16, int64_t block,
                               int64_t n, float *s, int64_t stride) {
    for (int64_t j = 0; j < G; j++)
        for (int64_t t = 0; t < n; t++) {
            float acc = 0.0f;
            for (int64_t d = 0; d < D; d++) acc += q[j * D + d] * kv_at(k, bf16, d * block + t);
            s[j * stride + t] = acc;
        }
}

/* One block's part of o[j][d] = sum_t e[j * stride + t] * v[t][d], d in [d0, D): the block's n tokens
   added in order to the running sums in o (v: the block's values [block, D] of one kv head). Blocks
   are added in table order, so each sum runs token by token over the whole sequence. */
static void block_values_plain(const float *e, int64_t G, int64_t D, const void *v, int bf16, int64_t n,
                               int64_t stride, int64_t d0, float *o) {
    for (int64_t j = 0; j < G; j++)
        for (int64_t d = d0; d < D; d++) {
            float acc = o[j * D + d];
            for (int64_t u = 0; u < n; u++) acc += e[j * stride + u] * kv_at(v, bf16, u * D + d);
            o[j * D + d] = acc;
        }
}

#ifdef PDMIX_X86
/* The AVX2 forms: each lane does the plain loops' multiplications and additions in their order (a
   lane is a token of the scores, or a dimension of the output), so both give the same bits. The
   lanes of several tokens, heads and dimensions run side by side only to keep more independent sums
   in flight: each sum is a chain of dependent additions, and one chain at a time is latency-bound. */
#define LANES 8
#define AVX2 __attribute__((target("avx2")))
#define MADD8(acc, a, b) acc = _mm256_add_ps(acc, _mm256_mul_ps(a, b))

/* 8 cache values from element i on, as fp32 (bf16: its bits are the upper half of the fp32's) */
AVX2 static inline __m256 load8(const void *p, int bf16, int64_t i) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* up to 2 groups of 8 tokens (T) x up to 4 heads (J), constants after inlining */
AVX2 static inline __attribute__((always_inline)) void scores_tile(const float *q, int J, int64_t D, const void *k,
                                                                    int BF, int64_t block, int T, float *s,
                                                                    int64_t stride, struct ahead *ah) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    for (int64_t d = 0; d < D; d++) {
        ahead_step(ah);
        __m256 k0 = load8(k, BF, d * block), k1 = T > 1 ? load8(k, BF, d * block + LANES) : k0;
#define HEAD(j)                                                                                            \
        if (J > j) {                                                                                       \
            __m256 qd = _mm256_set1_ps(q[j * D + d]);                                                      \
            MADD8(a0##j, qd, k0);                                                                          \
            if (T > 1) MADD8(a1##j, qd, k1);                                                               \
        }
        HEAD(0) HEAD(1) HEAD(2) HEAD(3)
#undef HEAD
    }
#define STORE(j)                                                                                           \
    if (J > j) {                                                                                           \
        _mm256_storeu_ps(s + j * stride, a0##j);                                                           \
        if (T > 1) _mm256_storeu_ps(s + j * stride + LANES, a1##j);                                        \
    }
    STORE(0) STORE(1) STORE(2) STORE(3)
#undef STORE
}

AVX2 static inline __attribute__((always_inline)) void block_scores_avx2(const float *q, int64_t G, int64_t D,
                                                                          const void *k, int BF, int64_t block,
                                                                          int64_t n, float *s, int64_t stride,
                                                                          struct ahead *ah) {
    int64_t t = 0;
    for (; t + LANES <= n; t += 2 * LANES) {
        int two = t + 2 * LANES <= n;
        const void *kt = kv_ptr(k, BF, t);
        for (int64_t j0 = 0; j0 < G; j0 += 4) {
            int64_t gj = G - j0 < 4 ? G - j0 : 4;
            const float *qj = q + j0 * D;
            float *sj = s + j0 * stride + t;
            if (two) {
                if (gj == 4) scores_tile(qj, 4, D, kt, BF, block, 2, sj, stride, ah);
                else if (gj == 3) scores_tile(qj, 3, D, kt, BF, block, 2, sj, stride, ah);
                else if (gj == 2) scores_tile(qj, 2, D, kt, BF, block, 2, sj, stride, ah);
                else scores_tile(qj, 1, D, kt, BF, block, 2, sj, stride, ah);
            } else {
                if (gj == 4) scores_tile(qj, 4, D, kt, BF, block, 1, sj, stride, ah);
                else if (gj == 3) scores_tile(qj, 3, D, kt, BF, block, 1, sj, stride, ah);
                else if (gj == 2) scores_tile(qj, 2, D, kt, BF, block, 1, sj, stride, ah);
                else scores_tile(qj, 1, D, kt, BF, block, 1, sj, stride, ah);
            }
        }
        if (!two) t -= LANES; /* one group of 8 done: the loop's step assumed two */
    }
    if (t < n) block_scores_plain(q, G, D, kv_ptr(k, BF, t), BF, block, n - t, s + t, stride);
}

AVX2 static void block_scores_f32(const float *q, int64_t G, int64_t D, const void *k, int64_t block, int64_t n,
                                  float *s, int64_t stride, struct ahead *ah) {
    block_scores_avx2(q, G, D, k, 0, block, n, s, stride, ah);
}

AVX2 static void block_scores_bf16(const float *q, int64_t G, int64_t D, const void *k, int64_t block, int64_t n,
                                   float *s, int64_t stride, struct ahead *ah) {
    block_scores_avx2(q, G, D, k, 1, block, n, s, stride, ah);
}

/* block_values_plain for dimensions [d0, d0 + 8 * W) of one head, W (1-8) groups of 8 lanes at once */
AVX2 static inline __attribute__((always_inline)) void values_tile(const float *e, int64_t D, const void *v, int BF,
                                                                    int64_t n, int64_t d0, int W, float *o,
                                                                    struct ahead *ah) {
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
#define IN(w) if (W > w) c##w = _mm256_loadu_ps(o + d0 + w * LANES);
    IN(0) IN(1) IN(2) IN(3) IN(4) IN(5) IN(6) IN(7)
#undef IN
    for (int64_t u = 0; u < n; u++) {
        ahead_step(ah);
        __m256 et = _mm256_set1_ps(e[u]);
        int64_t vu = u * D + d0;
#define DIM(w) if (W > w) MADD8(c##w, et, load8(v, BF, vu + w * LANES));
        DIM(0) DIM(1) DIM(2) DIM(3) DIM(4) DIM(5) DIM(6) DIM(7)
#undef DIM
    }
#define OUT(w) if (W > w) _mm256_storeu_ps(o + d0 + w * LANES, c##w);
    OUT(0) OUT(1) OUT(2) OUT(3) OUT(4) OUT(5) OUT(6) OUT(7)
#undef OUT
}

AVX2 static inline __attribute__((always_inline)) void block_values_avx2(const float *e, int64_t G, int64_t D,
                                                                          const void *v, int BF, int64_t n,
                                                                          int64_t stride, float *o, struct ahead *ah) {
    int64_t groups = D / LANES;
    for (int64_t j = 0; j < G; j++)
        for (int64_t d0 = 0, left = groups; left > 0; d0 += 8 * LANES, left -= 8) {
            const float *ej = e + j * stride;
            float *oj = o + j * D;
            switch (left < 8 ? left : 8) {
            case 8: values_tile(ej, D, v, BF, n, d0, 8, oj, ah); break;
            case 7: values_tile(ej, D, v, BF, n, d0, 7, oj, ah); break;
            case 6: values_tile(ej, D, v, BF, n, d0, 6, oj, ah); break;
            case 5: values_tile(ej, D, v, BF, n, d0, 5, oj, ah); break;
            case 4: values_tile(ej, D, v, BF, n, d0, 4, oj, ah); break;
            case 3: values_tile(ej, D, v, BF, n, d0, 3, oj, ah); break;
            case 2: values_tile(ej, D, v, BF, n, d0, 2, oj, ah); break;
            default: values_tile(ej, D, v, BF, n, d0, 1, oj, ah); break;
            }
        }
    block_values_plain(e, G, D, v, BF, n, stride, groups * LANES, o); /* the last dimensions */
}

AVX2 static void block_values_f32(const float *e, int64_t G, int64_t D, const void *v, int64_t n, int64_t stride,
                                  float *o, struct ahead *ah) {
    block_values_avx2(e, G, D, v, 0, n, stride, o, ah);
}

AVX2 static void block_values_bf16(const float *e, int64_t G, int64_t D, const void *v, int64_t n, int64_t stride,
                                   float *o, struct ahead *ah) {
    block_values_avx2(e, G, D, v, 1, n, stride, o, ah);
}

/* The AVX-512 forms: the same lanes' operations again, 16 lanes wide, and the values pass reads each
   value once for all the heads of its tile (the AVX2 one converts it again for every head). */
#define WIDE __attribute__((target("avx512f,avx512bw,avx512vl")))
#define MADD16(acc, a, b) acc = _mm512_add_ps(acc, _mm512_mul_ps(a, b))

WIDE static inline __m512 load16(const void *p, int bf16, int64_t i) {
    if (!bf16) return _mm512_loadu_ps((const float *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* up to 2 groups of 16 tokens (T) x up to 4 heads (J) */
WIDE static inline __attribute__((always_inline)) void scores_tile16(const float *q, int J, int64_t D, const void *k,
                                                                      int BF, int64_t block, int T, float *s,
                                                                      int64_t stride, struct ahead *ah) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    for (int64_t d = 0; d < D; d++) {
        ahead_step(ah);
        __m512 k0 = load16(k, BF, d * block), k1 = T > 1 ? load16(k, BF, d * block + 16) : k0;
#define HEAD(j)                                                                                            \
        if (J > j) {                                                                                       \
            __m512 qd = _mm512_set1_ps(q[j * D + d]);                                                      \
            MADD16(a0##j, qd, k0);                                                                         \
            if (T > 1) MADD16(a1##j, qd, k1);                                                              \
        }
        HEAD(0) HEAD(1) HEAD(2) HEAD(3)
#undef HEAD
    }
#define STORE(j)                                                                                           \
    if (J > j) {                                                                                           \
        _mm512_storeu_ps(s + j * stride, a0##j);                                                           \
        if (T > 1) _mm512_storeu_ps(s + j * stride + 16, a1##j);                                           \
    }
    STORE(0) STORE(1) STORE(2) STORE(3)
#undef STORE
}

#define SCORES16(T)                                                                                        \
    for (int64_t j0 = 0; j0 < G; j0 += 4) {                                                                \
        int64_t gj = G - j0 < 4 ? G - j0 : 4;                                                              \
        const float *qj = q + j0 * D;                                                                      \
        float *sj = s + j0 * stride + t;                                                                   \
        if (gj == 4) scores_tile16(qj, 4, D, kt, BF, block, T, sj, stride, ah);                                \
        else if (gj == 3) scores_tile16(qj, 3, D, kt, BF, block, T, sj, stride, ah);                           \
        else if (gj == 2) scores_tile16(qj, 2, D, kt, BF, block, T, sj, stride, ah);                           \
        else scores_tile16(qj, 1, D, kt, BF, block, T, sj, stride, ah);                                        \
    }

WIDE static inline __attribute__((always_inline)) void block_scores_wide(const float *q, int64_t G, int64_t D,
                                                                          const void *k, int BF, int64_t block,
                                                                          int64_t n, float *s, int64_t stride,
                                                                          struct ahead *ah) {
    int64_t t = 0;
    for (; t + 32 <= n; t += 32) {
        const void *kt = kv_ptr(k, BF, t);
        SCORES16(2)
    }
    for (; t + 16 <= n; t += 16) {
        const void *kt = kv_ptr(k, BF, t);
        SCORES16(1)
    }
    if (t < n) block_scores_avx2(q, G, D, kv_ptr(k, BF, t), BF, block, n - t, s + t, stride, ah);
}
#undef SCORES16

WIDE static void block_scores_f32_wide(const float *q, int64_t G, int64_t D, const void *k, int64_t block, int64_t n,
                                       float *s, int64_t stride, struct ahead *ah) {
    block_scores_wide(q, G, D, k, 0, block, n, s, stride, ah);
}

WIDE static void block_scores_bf16_wide(const float *q, int64_t G, int64_t D, const void *k, int64_t block, int64_t n,
                                        float *s, int64_t stride, struct ahead *ah) {
    block_scores_wide(q, G, D, k, 1, block, n, s, stride, ah);
}

/* dimensions [d0, d0 + 16 W) of J heads (W, J 1-4): each token's values read once for the J heads */
WIDE static inline __attribute__((always_inline)) void values_tile16(const float *e, int64_t stride, int J, int64_t D,
                                                                      const void *v, int BF, int64_t n, int64_t d0,
                                                                      int W, float *o, struct ahead *ah) {
    __m512 c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33;
#define IN(j, w) if (J > j && W > w) c##j##w = _mm512_loadu_ps(o + j * D + d0 + w * 16);
    IN(0, 0) IN(0, 1) IN(0, 2) IN(0, 3) IN(1, 0) IN(1, 1) IN(1, 2) IN(1, 3)
    IN(2, 0) IN(2, 1) IN(2, 2) IN(2, 3) IN(3, 0) IN(3, 1) IN(3, 2) IN(3, 3)
#undef IN
    for (int64_t u = 0; u < n; u++) {
        ahead_step(ah);
        int64_t vu = u * D + d0;
        __m512 v0 = load16(v, BF, vu), v1 = W > 1 ? load16(v, BF, vu + 16) : v0;
        __m512 v2 = W > 2 ? load16(v, BF, vu + 32) : v0, v3 = W > 3 ? load16(v, BF, vu + 48) : v0;
#define HEAD(j)                                                                                            \
        if (J > j) {                                                                                       \
            __m512 et = _mm512_set1_ps(e[j * stride + u]);                                                 \
            MADD16(c##j##0, et, v0);                                                                       \
            if (W > 1) MADD16(c##j##1, et, v1);                                                            \
            if (W > 2) MADD16(c##j##2, et, v2);                                                            \
            if (W > 3) MADD16(c##j##3, et, v3);                                                            \
        }
        HEAD(0) HEAD(1) HEAD(2) HEAD(3)
#undef HEAD
    }
#define OUT(j, w) if (J > j && W > w) _mm512_storeu_ps(o + j * D + d0 + w * 16, c##j##w);
    OUT(0, 0) OUT(0, 1) OUT(0, 2) OUT(0, 3) OUT(1, 0) OUT(1, 1) OUT(1, 2) OUT(1, 3)
    OUT(2, 0) OUT(2, 1) OUT(2, 2) OUT(2, 3) OUT(3, 0) OUT(3, 1) OUT(3, 2) OUT(3, 3)
#undef OUT
}

#define VALUES16(J)                                                                                        \
    switch (left < 4 ? left : 4) {                                                                         \
    case 4: values_tile16(ej, stride, J, D, v, BF, n, d0, 4, oj, ah); break;                                   \
    case 3: values_tile16(ej, stride, J, D, v, BF, n, d0, 3, oj, ah); break;                                   \
    case 2: values_tile16(ej, stride, J, D, v, BF, n, d0, 2, oj, ah); break;                                   \
    default: values_tile16(ej, stride, J, D, v, BF, n, d0, 1, oj, ah); break;                                  \
    }

WIDE static inline __attribute__((always_inline)) void block_values_wide(const float *e, int64_t G, int64_t D,
                                                                          const void *v, int BF, int64_t n,
                                                                          int64_t stride, float *o, struct ahead *ah) {
    int64_t groups = D / 16;
    for (int64_t j0 = 0; j0 < G; j0 += 4) {
        int64_t gj = G - j0 < 4 ? G - j0 : 4;
        const float *ej = e + j0 * stride;
        float *oj = o + j0 * D;
        for (int64_t d0 = 0, left = groups; left > 0; d0 += 64, left -= 4) {
            if (gj == 4) { VALUES16(4) }
            else if (gj == 3) { VALUES16(3) }
            else if (gj == 2) { VALUES16(2) }
            else { VALUES16(1) }
        }
    }
    block_values_plain(e, G, D, v, BF, n, stride, groups * 16, o); /* the last dimensions */
}
#undef VALUES16

WIDE static void block_values_f32_wide(const float *e, int64_t G, int64_t D, const void *v, int64_t n, int64_t stride,
                                       float *o, struct ahead *ah) {
    block_values_wide(e, G, D, v, 0, n, stride, o, ah);
}

WIDE static void block_values_bf16_wide(const float *e, int64_t G, int64_t D, const void *v, int64_t n, int64_t stride,
                                        float *o, struct ahead *ah) {
    block_values_wide(e, G, D, v, 1, n, stride, o, ah);
}
#endif

/* ---- Softmax numerators e_t = exp(s_t * scale - max) in place, and their sum. The plain and AVX2
   forms do the same operations on each element (no fused multiply-add: the library is built with
   -ffp-contract=off), so they give the same bits: exp is Cephes' expf polynomial written out (glibc's
   expf is scalar and was a third of a layer's time), and the sum runs in 8 lanes, token t into lane
   t % 8 in token order, the lanes then added pairwise. */
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define EXP_MIN -87.0f /* below, 0 (expf is subnormal there, and the sum is at least 1) */
static const float EXP_POLY[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

/* exp(x) for x <= 0 */
static inline float exp_nonpositive(float x) {
    if (x != x) return x;
    if (x < EXP_MIN) return 0.0f;
    float n = nearbyintf(x * LOG2E), r = x - n * LN2_HI, p = EXP_POLY[0];
    r = r - n * LN2_LO;
    for (int i = 1; i < 6; i++) p = p * r + EXP_POLY[i];
    p = p * (r * r) + r + 1.0f;
    union { uint32_t u; float f; } two = {(uint32_t)((int32_t)n + 127) << 23};
    return p * two.f;
}

static inline float lanes_sum(const float *part) {
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

static float softmax_plain(float *s, int64_t len, float scale) {
    float top = -INFINITY, part[8] = {0};
    for (int64_t t = 0; t < len; t++) {
        s[t] *= scale;
        top = s[t] > top ? s[t] : top;
    }
    for (int64_t t = 0; t < len; t++) {
        s[t] = exp_nonpositive(s[t] - top);
        part[t % 8] += s[t];
    }
    return lanes_sum(part);
}

#ifdef PDMIX_X86
__attribute__((target("avx2"))) static float softmax_avx2(float *s, int64_t len, float scale) {
    __m256 sc = _mm256_set1_ps(scale), top8 = _mm256_set1_ps(-INFINITY);
    int64_t full = len / 8 * 8;
    for (int64_t t = 0; t < full; t += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + t), sc);
        _mm256_storeu_ps(s + t, v);
        top8 = _mm256_max_ps(v, top8); /* v > top ? v : top, lane by lane, as the plain loop */
    }
    float lanes[8], top = -INFINITY, part[8];
    _mm256_storeu_ps(lanes, top8);
    for (int l = 0; l < 8; l++) top = lanes[l] > top ? lanes[l] : top;
    for (int64_t t = full; t < len; t++) {
        s[t] *= scale;
        top = s[t] > top ? s[t] : top;
    }
    __m256 m = _mm256_set1_ps(top), sum8 = _mm256_setzero_ps(), l2e = _mm256_set1_ps(LOG2E);
    for (int64_t t = 0; t < full; t += 8) {
        __m256 x = _mm256_sub_ps(_mm256_loadu_ps(s + t), m);
        __m256 n = _mm256_round_ps(_mm256_mul_ps(x, l2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))), p = _mm256_set1_ps(EXP_POLY[0]);
        r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)));
        for (int i = 1; i < 6; i++) p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(EXP_POLY[i]));
        p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.0f));
        __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
        y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(EXP_MIN), _CMP_LT_OQ));
        y = _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        _mm256_storeu_ps(s + t, y);
        sum8 = _mm256_add_ps(sum8, y);
    }
    _mm256_storeu_ps(part, sum8);
    for (int64_t t = full; t < len; t++) {
        s[t] = exp_nonpositive(s[t] - top);
        part[t % 8] += s[t];
    }
    return lanes_sum(part);
}
#endif

static float softmax_numerators(float *s, int64_t len, float scale, int fast) {
#ifdef PDMIX_X86
    if (fast) return softmax_avx2(s, len, scale);
#endif
    (void)fast;
    return softmax_plain(s, len, scale);
}

/* Both passes walk the blocks in table order, each block's kv heads in turn: a walk of (block, head)
   pieces of D * block values each (16 KB in bf16 for D 64, block 128), the keys' then the values'. Table
   order can jump between blocks, where the hardware prefetcher stops, and a piece of keys is read rows a
   stride apart; so the piece AHEAD_PIECES ahead is fetched into L2 by hand (into L1 the prefetches queue
   behind its few outstanding misses), a slice per SLICE tokens computed: fetched all at once, a large
   block's prefetches stalled the loads behind them (cold, 30 layers of SmolLM2 at 512 tokens: 74 -> 65 us
   a layer at block 128 whole, 53 -> 37 us at block 16). */
#ifndef AHEAD_PIECES
#define AHEAD_PIECES 2
#endif
#define SLICE 16
struct walk {
    const void *kc, *vc;
    const int64_t *table;
    int64_t KV, g0, heads, pieces, span, slices; /* heads: g1 - g0; pieces: blocks * heads, per pass */
    int bf16;
};

/* at: the piece being computed; slice: its part [slice * SLICE, slice * SLICE + SLICE) of the block. The
   slice's lines of the piece AHEAD_PIECES ahead become a's, to be fetched as the slice is computed (what
   is left of a's previous lines first, at once). */
static void fetch_ahead(const struct walk *w, int64_t at, int64_t slice, struct ahead *a) {
    while (a->lines > 0) ahead_step(a);
    int64_t p = at + AHEAD_PIECES, bytes = w->span * (w->bf16 ? 2 : 4) / w->slices;
    if (p >= 2 * w->pieces) return;
    const void *c = p < w->pieces ? w->kc : w->vc;
    p %= w->pieces;
    const char *start = (const char *)kv_ptr(c, w->bf16, (w->table[p / w->heads] * w->KV + w->g0 + p % w->heads) * w->span);
    a->p = start + slice * bytes;
    a->lines = (bytes + 63) / 64;
}

/* One sequence's kv heads [g0, g1) (G query heads each): q [(g1 - g0) * G, D] -> o, the same shape, and
   den, one per query head; scores: (g1 - g0) * G * stride floats, stride >= len. Each head's sums run in
   the order the file's header gives, whichever heads share the call. */
static void sequence_heads(const float *q, int64_t G, int64_t D, int64_t KV, int64_t g0, int64_t g1, const void *kc,
                           const void *vc, int bf16, int64_t block, const int64_t *table, int64_t len, float scale,
                           float *scores, int64_t stride, float *o, float *den) {
    int fast = 0, wide = 0;
#ifdef PDMIX_X86
    fast = pdmix_s8gemm_isa() >= 2;
    wide = pdmix_s8gemm_isa() == 3;
#endif
    int64_t span = D * block, heads = (g1 - g0) * G, blocks = (len + block - 1) / block;
    int64_t slices = block % SLICE ? 1 : block / SLICE, width = block / slices; /* tokens per slice */
    struct walk w = {kc, vc, table, KV, g0, g1 - g0, blocks * (g1 - g0), span, slices, bf16};
    struct ahead ah = {0, 0};
    for (int64_t p = -AHEAD_PIECES; p < 0; p++)
        for (int64_t i = 0; i < slices; i++) fetch_ahead(&w, p, i, &ah);
    for (int64_t b = 0; b < blocks; b++) /* the keys: scores */
        for (int64_t g = g0; g < g1; g++) {
            const void *k = kv_ptr(kc, bf16, (table[b] * KV + g) * span); /* [D, block] */
            const float *qg = q + (g - g0) * G * D;
            float *s = scores + (g - g0) * G * stride + b * block;
            for (int64_t i = 0, t = 0; i < slices; i++, t += width) {
                fetch_ahead(&w, b * w.heads + g - g0, i, &ah);
                int64_t n = len - b * block - t < width ? len - b * block - t : width;
                if (n <= 0) continue;
#ifdef PDMIX_X86
                if (wide) {
                    (bf16 ? block_scores_bf16_wide : block_scores_f32_wide)(qg, G, D, kv_ptr(k, bf16, t), block, n, s + t, stride, &ah);
                    continue;
                }
                if (fast) {
                    (bf16 ? block_scores_bf16 : block_scores_f32)(qg, G, D, kv_ptr(k, bf16, t), block, n, s + t, stride, &ah);
                    continue;
                }
#endif
                block_scores_plain(qg, G, D, kv_ptr(k, bf16, t), bf16, block, n, s + t, stride);
            }
        }
    for (int64_t j = 0; j < heads; j++) den[j] = softmax_numerators(scores + j * stride, len, scale, fast);
    memset(o, 0, (size_t)(heads * D) * sizeof(float));
    for (int64_t b = 0; b < blocks; b++) /* the values: running sums in o, token by token */
        for (int64_t g = g0; g < g1; g++) {
            const void *v = kv_ptr(vc, bf16, (table[b] * KV + g) * span); /* [block, D] */
            const float *e = scores + (g - g0) * G * stride + b * block;
            float *og = o + (g - g0) * G * D;
            for (int64_t i = 0, t = 0; i < slices; i++, t += width) {
                fetch_ahead(&w, w.pieces + b * w.heads + g - g0, i, &ah);
                int64_t n = len - b * block - t < width ? len - b * block - t : width;
                if (n <= 0) continue;
#ifdef PDMIX_X86
                if (wide) {
                    (bf16 ? block_values_bf16_wide : block_values_f32_wide)(e + t, G, D, kv_ptr(v, bf16, t * D), n, stride, og, &ah);
                    continue;
                }
                if (fast) {
                    (bf16 ? block_values_bf16 : block_values_f32)(e + t, G, D, kv_ptr(v, bf16, t * D), n, stride, og, &ah);
                    continue;
                }
#endif
                block_values_plain(e + t, G, D, kv_ptr(v, bf16, t * D), bf16, n, stride, 0, og);
            }
        }
    for (int64_t j = 0; j < heads; j++)
        for (int64_t d = 0; d < D; d++) o[j * D + d] /= den[j];
}

/* out [B, H, D] (bf16 if io_bf16, else fp32) from q [B, H, D] in the same dtype; the cache kc, vc in bf16
   if cache_bf16, else fp32; tables [B, table_width] int64, lengths [B] int64 (tokens in the cache, the new
   one included). With k_new (not null), the step's new rows k_new, v_new [B, KV, D] (q's dtype, rows
   k_row and v_row elements apart) are first written at slots [B], as pdmix_kv_write writes them: a
   decode step's write and attention in one call. Returns 0, or -1 if out of memory. */
int pdmix_decode_attention(const void *q, int io_bf16, int64_t B, int64_t H, int64_t KV, int64_t D, void *kc,
                           void *vc, int cache_bf16, int64_t block, const int64_t *tables, int64_t table_width,
                           const int64_t *lengths, float scale, void *out, int threads, const void *k_new,
                           const void *v_new, int64_t k_row, int64_t v_row, const int64_t *slots) {
    if (k_new) pdmix_kv_write(k_new, v_new, io_bf16, k_row, v_row, B, KV, D, slots, kc, vc, cache_bf16, block);
    int64_t G = H / KV, longest = 0;
    for (int64_t b = 0; b < B; b++) longest = lengths[b] > longest ? lengths[b] : longest;
    /* a task: one sequence's kv heads, all of them, or a share of them where the sequences are fewer than the threads */
    int64_t parts = B < threads ? (KV < threads ? KV : threads) : 1, tasks = B * parts;
    int64_t stride = ((longest + block - 1) / block) * block, most = (KV + parts - 1) / parts * G;
    int64_t scratch = most * (stride + 2 * D + 1);
    int failed = 0, parallel = threads > 1 && tasks > 1 && longest * H * D * B >= (1 << 16);
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : failed) if (parallel)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t b = task / parts, p = task % parts, g0 = KV * p / parts, g1 = KV * (p + 1) / parts;
        float *buf = (float *)malloc((size_t)scratch * sizeof(float));
        if (!buf) { failed = 1; continue; }
        float *qf = buf + most * stride, *o = qf + most * D, *den = o + most * D;
        int64_t first = (b * H + g0 * G) * D, count = (g1 - g0) * G * D;
        for (int64_t i = 0; i < count; i++)
            qf[i] = io_bf16 ? bf16_to_float(((const uint16_t *)q)[first + i]) : ((const float *)q)[first + i];
        sequence_heads(qf, G, D, KV, g0, g1, kc, vc, cache_bf16, block, tables + b * table_width, lengths[b], scale,
                       buf, stride, o, den);
        for (int64_t i = 0; i < count; i++) {
            if (io_bf16) ((uint16_t *)out)[first + i] = float_to_bf16(o[i]);
            else ((float *)out)[first + i] = o[i];
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* The step's new keys and values into the cache: k, v [T, KV, D] (bf16 if in_bf16, else fp32; row t at
   k + t * k_row, each row's [KV, D] contiguous), slots [T]; the cache in bf16 if cache_bf16 (fp32
   values rounded to nearest even, as torch converts them; bf16 ones stored as they are). */
static inline void kv_store(void *c, int bf16, int64_t i, float x) {
    if (bf16) ((uint16_t *)c)[i] = float_to_bf16(x);
    else ((float *)c)[i] = x;
}

void pdmix_kv_write(const void *k, const void *v, int in_bf16, int64_t k_row, int64_t v_row, int64_t T, int64_t KV,
                    int64_t D, const int64_t *slots, void *kc, void *vc, int cache_bf16, int64_t block) {
    for (int64_t t = 0; t < T; t++) {
        int64_t blk = slots[t] / block, off = slots[t] % block;
        for (int64_t g = 0; g < KV; g++)
            for (int64_t d = 0; d < D; d++) {
                int64_t i = g * D + d;
                kv_store(kc, cache_bf16, ((blk * KV + g) * D + d) * block + off, kv_at(k, in_bf16, t * k_row + i));
                kv_store(vc, cache_bf16, ((blk * KV + g) * block + off) * D + d, kv_at(v, in_bf16, t * v_row + i));
            }
    }
}
