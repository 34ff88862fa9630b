/* Exact int8 GEMM for pdmix's cpu_int8 kernel backend (pdmix/kernels/cpu_int8.py).

   out[i][j] = sum_p x[i][p] * w[j][p] as int32, for int8 x [m, k] and int8 w [n, k] (row-major,
   the checkpoint's layout). Every product is summed exactly, so the result does not depend on the
   order of summation, the blocking or the number of threads.

   The AVX2 path widens both operands to int16 and multiplies with vpmaddwd (pairs of int16
   products summed into int32: exact for any int8 codes, unlike vpmaddubsw's saturating int16
   sums). It is compiled for AVX2 by function attribute and chosen at run time, so one build runs on
   any x86-64 CPU; others run the plain C loop. */

#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define PDMIX_X86 1
#include <immintrin.h>
#endif

#define MB 64   /* rows of x per block: their int16 copy (64 x k x 2 bytes) stays in L2 */
#define AHEAD 8 /* weight rows prefetched ahead: rows are short (k bytes), too short for the
                   hardware prefetcher to follow four of them at once (1.4x at decode here) */

/* One call's operands; out is int32 (s8gemm) or fp32 (q8_0, with the block scales dx, dw). */
struct problem {
    const int8_t *x, *w;
    const float *dx, *dw;
    int64_t m, n, k;
    void *out;
};

static void gemm_plain(const struct problem *a, int64_t n0, int64_t n1) {
    const int8_t *x = a->x, *w = a->w;
    int64_t m = a->m, n = a->n, k = a->k;
    int32_t *out = (int32_t *)a->out;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = n0; j < n1; j++) {
            int32_t s = 0;
            for (int64_t p = 0; p < k; p++) s += (int32_t)x[i * k + p] * (int32_t)w[j * k + p];
            out[i * n + j] = s;
        }
}

#ifdef PDMIX_X86
__attribute__((target("avx2"))) static inline int32_t hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

#define WROW(q) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + (j + (q)) * k + p)))
#define MADD(c, a, b) c = _mm256_add_epi32(c, _mm256_madd_epi16(a, b))
/* the cache line at offset p of rows j + AHEAD .. j + AHEAD + 3, once per line */
#define PREFETCH(ahead)                                                                                    \
    if ((ahead) && (p & 63) == 0)                                                                         \
        for (int q = 0; q < 4; q++) _mm_prefetch((const char *)((ahead) + q * k + p), _MM_HINT_T0)

/* rows x [mb, k] int8 -> x16 [mb, k] int16, k % 16 == 0 */
__attribute__((target("avx2"))) static void widen(const int8_t *x, int64_t mb, int64_t k, int16_t *x16) {
    for (int64_t p = 0; p < mb * k; p += 16)
        _mm256_storeu_si256((__m256i *)(x16 + p), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(x + p))));
}

/* two rows of x against four rows of w */
__attribute__((target("avx2"))) static void tile_2x4(const int16_t *x0, const int16_t *x1, const int8_t *w,
                                                       int64_t j, int64_t k, int32_t *o0, int32_t *o1,
                                                       const int8_t *ahead) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c03 = c00;
    __m256i c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    for (int64_t p = 0; p < k; p += 16) {
        PREFETCH(ahead);
        __m256i a0 = _mm256_loadu_si256((const __m256i *)(x0 + p));
        __m256i a1 = _mm256_loadu_si256((const __m256i *)(x1 + p));
        __m256i b = WROW(0);
        MADD(c00, a0, b); MADD(c10, a1, b);
        b = WROW(1);
        MADD(c01, a0, b); MADD(c11, a1, b);
        b = WROW(2);
        MADD(c02, a0, b); MADD(c12, a1, b);
        b = WROW(3);
        MADD(c03, a0, b); MADD(c13, a1, b);
    }
    o0[j] = hsum(c00); o0[j + 1] = hsum(c01); o0[j + 2] = hsum(c02); o0[j + 3] = hsum(c03);
    o1[j] = hsum(c10); o1[j + 1] = hsum(c11); o1[j + 2] = hsum(c12); o1[j + 3] = hsum(c13);
}

/* one row of x against four rows of w (decode's GEMV) */
__attribute__((target("avx2"))) static void tile_1x4(const int16_t *x0, const int8_t *w, int64_t j, int64_t k,
                                                       int32_t *o0, const int8_t *ahead) {
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t p = 0; p < k; p += 16) {
        PREFETCH(ahead);
        __m256i a0 = _mm256_loadu_si256((const __m256i *)(x0 + p));
        MADD(c0, a0, WROW(0)); MADD(c1, a0, WROW(1)); MADD(c2, a0, WROW(2)); MADD(c3, a0, WROW(3));
    }
    o0[j] = hsum(c0); o0[j + 1] = hsum(c1); o0[j + 2] = hsum(c2); o0[j + 3] = hsum(c3);
}

__attribute__((target("avx2"))) static void tile_1x1(const int16_t *x0, const int8_t *w, int64_t j, int64_t k,
                                                       int32_t *o0) {
    __m256i c0 = _mm256_setzero_si256();
    for (int64_t p = 0; p < k; p += 16) MADD(c0, _mm256_loadu_si256((const __m256i *)(x0 + p)), WROW(0));
    o0[j] = hsum(c0);
}

/* k % 16 == 0; columns [n0, n1) of out. x16: the block's rows widened to int16 (a per-thread buffer). */
__attribute__((target("avx2"))) static void gemm_avx2(const struct problem *a, int64_t n0, int64_t n1,
                                                        int16_t *x16) {
    const int8_t *x = a->x, *w = a->w;
    int64_t m = a->m, n = a->n, k = a->k;
    int32_t *out = (int32_t *)a->out;
    for (int64_t i0 = 0; i0 < m; i0 += MB) {
        int64_t mb = m - i0 < MB ? m - i0 : MB;
        widen(x + i0 * k, mb, k, x16);
        int64_t j = n0;
        for (; j + 4 <= n1; j += 4) {
            /* the first pass over a group of rows fetches them (the others find them in L1) */
            const int8_t *ahead = j + AHEAD + 4 <= n1 ? w + (j + AHEAD) * k : 0;
            int64_t r = 0;
            for (; r + 2 <= mb; r += 2, ahead = 0)
                tile_2x4(x16 + r * k, x16 + (r + 1) * k, w, j, k, out + (i0 + r) * n, out + (i0 + r + 1) * n, ahead);
            if (r < mb) tile_1x4(x16 + r * k, w, j, k, out + (i0 + r) * n, ahead);
        }
        for (; j < n1; j++)
            for (int64_t r = 0; r < mb; r++) tile_1x1(x16 + r * k, w, j, k, out + (i0 + r) * n);
    }
}

/* ---- Blocks of 32 with their own scales (llama.cpp's Q8_0 x Q8_0): out[i][j] =
   sum_b dx[i][b] * dw[j][b] * (integer dot product of block b), the block sums exact in int32, the
   scaled sum in fp32 in a fixed order (lanes, then blocks, then a fixed lane reduction), so a row's
   result does not depend on the other rows, the blocking or the thread count. */

__attribute__((target("avx2,fma"))) static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define QBLOCK(acc, a_lo, a_hi, q, d)                                                                      \
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(a_lo, WQ(q, 0)),           \
                                                               _mm256_madd_epi16(a_hi, WQ(q, 16)))),        \
                          _mm256_set1_ps(d), acc)
#define WQ(q, off) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + (j + (q)) * k + p + (off))))

/* one row of x against four rows of w */
__attribute__((target("avx2,fma"))) static void q8_tile_1x4(const int16_t *x0, const float *dx0, const int8_t *w,
                                                              const float *dw, int64_t j, int64_t k, float *o0,
                                                              const int8_t *ahead) {
    int64_t nb = k / 32;
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t b = 0, p = 0; b < nb; b++, p += 32) {
        PREFETCH(ahead);
        __m256i lo = _mm256_loadu_si256((const __m256i *)(x0 + p)), hi = _mm256_loadu_si256((const __m256i *)(x0 + p + 16));
        QBLOCK(c0, lo, hi, 0, dx0[b] * dw[(j + 0) * nb + b]);
        QBLOCK(c1, lo, hi, 1, dx0[b] * dw[(j + 1) * nb + b]);
        QBLOCK(c2, lo, hi, 2, dx0[b] * dw[(j + 2) * nb + b]);
        QBLOCK(c3, lo, hi, 3, dx0[b] * dw[(j + 3) * nb + b]);
    }
    o0[j] = hsum_ps(c0); o0[j + 1] = hsum_ps(c1); o0[j + 2] = hsum_ps(c2); o0[j + 3] = hsum_ps(c3);
}

__attribute__((target("avx2,fma"))) static void q8_tile_1x1(const int16_t *x0, const float *dx0, const int8_t *w,
                                                              const float *dw, int64_t j, int64_t k, float *o0) {
    int64_t nb = k / 32;
    __m256 c0 = _mm256_setzero_ps();
    for (int64_t b = 0, p = 0; b < nb; b++, p += 32) {
        __m256i lo = _mm256_loadu_si256((const __m256i *)(x0 + p)), hi = _mm256_loadu_si256((const __m256i *)(x0 + p + 16));
        QBLOCK(c0, lo, hi, 0, dx0[b] * dw[j * nb + b]);
    }
    o0[j] = hsum_ps(c0);
}

__attribute__((target("avx2,fma"))) static void q8_gemm_avx2(const struct problem *a, int64_t n0, int64_t n1,
                                                               int16_t *x16) {
    const int8_t *x = a->x, *w = a->w;
    const float *dx = a->dx, *dw = a->dw;
    int64_t m = a->m, n = a->n, k = a->k, nb = k / 32;
    float *out = (float *)a->out;
    for (int64_t i0 = 0; i0 < m; i0 += MB) {
        int64_t mb = m - i0 < MB ? m - i0 : MB;
        widen(x + i0 * k, mb, k, x16);
        int64_t j = n0;
        for (; j + 4 <= n1; j += 4) {
            const int8_t *ahead = j + AHEAD + 4 <= n1 ? w + (j + AHEAD) * k : 0;
            for (int64_t r = 0; r < mb; r++, ahead = 0)
                q8_tile_1x4(x16 + r * k, dx + (i0 + r) * nb, w, dw, j, k, out + (i0 + r) * n, ahead);
        }
        for (; j < n1; j++)
            for (int64_t r = 0; r < mb; r++) q8_tile_1x1(x16 + r * k, dx + (i0 + r) * nb, w, dw, j, k, out + (i0 + r) * n);
    }
}
#endif

/* Which path runs: 2 = AVX2, 1 = plain C (also when PDMIX_S8GEMM_PLAIN is set, for the tests).
   Decided once per process: every GEMM call asks. */
int pdmix_s8gemm_isa(void) {
    static int isa = 0; /* set once, whole: a thread never sees a half-made choice */
    if (!isa) {
        int chosen = 1;
#ifdef PDMIX_X86
        if (!getenv("PDMIX_S8GEMM_PLAIN") && __builtin_cpu_supports("avx2")) chosen = 2;
#endif
        isa = chosen;
    }
    return isa;
}

typedef void (*avx2_part)(const struct problem *, int64_t, int64_t, int16_t *);
typedef void (*plain_part)(const struct problem *, int64_t, int64_t);

/* Columns split over `threads` threads (groups of 4), each with its own int16 buffer for the AVX2 path.
   Returns 0, or -1 if a buffer could not be allocated. */
static int run(const struct problem *a, int threads, avx2_part avx2, plain_part plain) {
    int64_t n = a->n, parts = threads > 1 && n >= 64 * threads ? threads : 1;
    int failed = 0;
#pragma omp parallel for num_threads(parts) schedule(static) reduction(| : failed) if (parts > 1)
    for (int64_t t = 0; t < parts; t++) {
        int64_t n0 = (n * t / parts) & ~(int64_t)3, n1 = t == parts - 1 ? n : (n * (t + 1) / parts) & ~(int64_t)3;
        if (avx2) {
            int64_t rows = a->m < MB ? a->m : MB;
            int16_t *x16 = (int16_t *)malloc((size_t)(rows * a->k) * sizeof(int16_t));
            if (!x16) { failed = 1; continue; }
            avx2(a, n0, n1, x16);
            free(x16);
        } else {
            plain(a, n0, n1);
        }
    }
    return failed ? -1 : 0;
}

static void q8_gemm_plain(const struct problem *a, int64_t n0, int64_t n1) {
    const int8_t *x = a->x, *w = a->w;
    const float *dx = a->dx, *dw = a->dw;
    int64_t n = a->n, k = a->k, nb = k / 32;
    float *out = (float *)a->out;
    for (int64_t i = 0; i < a->m; i++)
        for (int64_t j = n0; j < n1; j++) {
            float s = 0;
            for (int64_t b = 0; b < nb; b++) {
                int32_t t = 0;
                for (int64_t p = b * 32; p < b * 32 + 32; p++) t += (int32_t)x[i * k + p] * (int32_t)w[j * k + p];
                s += (float)t * (dx[i * nb + b] * dw[j * nb + b]);
            }
            out[i * n + j] = s;
        }
}

#ifdef PDMIX_X86
#define AVX2_OR_NULL(fn, ok) ((ok) && pdmix_s8gemm_isa() == 2 ? (fn) : (avx2_part)0)
#else
#define AVX2_OR_NULL(fn, ok) ((avx2_part)0)
#endif

/* out [m, n] int32 = x [m, k] int8 @ w [n, k]^T int8. Returns 0, or -1 if out of memory. */
int pdmix_s8gemm(const int8_t *x, int64_t m, const int8_t *w, int64_t n, int64_t k, int32_t *out, int threads) {
    struct problem a = {x, w, 0, 0, m, n, k, out};
    return run(&a, threads, AVX2_OR_NULL(gemm_avx2, k % 16 == 0), gemm_plain);
}

/* out [m, n] fp32 from 32-wide blocks: x [m, k] int8 with scales dx [m, k/32], w [n, k] int8 with
   scales dw [n, k/32]; k % 32 == 0. Returns 0, or -1 if out of memory. */
int pdmix_q8_0_gemm(const int8_t *x, const float *dx, int64_t m, const int8_t *w, const float *dw, int64_t n,
                    int64_t k, float *out, int threads) {
    struct problem a = {x, w, dx, dw, m, n, k, out};
    return run(&a, threads, AVX2_OR_NULL(q8_gemm_avx2, 1), q8_gemm_plain);
}
