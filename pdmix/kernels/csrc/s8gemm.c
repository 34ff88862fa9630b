/* Exact int8 GEMM for pdmix's cpu_int8 kernel backend (pdmix/kernels/cpu_int8.py).

   out[i][j] = sum_p x[i][p] * w[j][p] as int32, for int8 x [m, k] and int8 w [n, k] (row-major,
   the checkpoint's layout). Every product is summed exactly, so the result does not depend on the
   order of summation, the blocking or the number of threads.

   The AVX2 path widens both operands to int16 and multiplies with vpmaddwd (pairs of int16
   products summed into int32: exact for any int8 codes, unlike vpmaddubsw's saturating int16
   sums). The AVX-512 VNNI path multiplies unsigned codes x + 128 with vpdpbusd and takes the
   excess off (see its section). Both are compiled by function attribute and chosen at run time, so
   one build runs on any x86-64 CPU; others run the plain C loop. */

#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "bf16.h"
#include "pdmix.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define PDMIX_X86 1
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define MB 64   /* rows of x per block: their int16 copy (64 x k x 2 bytes) stays in L2 */
#define STREAM_ROWS 4 /* blocks of up to this many rows of x take the streaming GEMV */
#define STREAM_ROWS_VNNI 8 /* the same on the VNNI path, which keeps 8 rows' sums in registers, */
#define TILE_K_VNNI 4096   /* except 8 rows with k up to this: two 4 x 4 tiles, whose one reduction serves
                              16 outputs, ran 1.15-1.2x the stream there (and 0.86x at k = 14336, where
                              the tile's rows no longer stay in L1) */
#define AHEAD 8 /* weight rows prefetched ahead: rows are short (k bytes), too short for the
                   hardware prefetcher to follow four of them at once (1.4x at decode here) */

struct epilogue;
struct quantize;

/* One call's operands; out is int32 (s8gemm) or fp32 (q8_0, with the block scales dx, dw); ep, when
   set, turns each thread's columns of the int32 out into a linear's output (w8a8_linear). */
struct problem {
    const int8_t *x, *w;
    const float *dx, *dw;
    int64_t m, n, k;
    void *out;
    const struct epilogue *ep;
    int packed; /* w is VNNI-packed (pdmix_s8pack; only where the VNNI path runs, which alone reads it) */
    const struct quantize *qz; /* set: x is first made from these activations (w8a8_linear), rows split over
                                  the threads */
};

#define PACK_T 3 /* column blocks of 16 per group of the VNNI-packed layout (see gemm_vnni_packed) */

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

/* one row of x against one row of w, read front to back: at decode (a few rows of x) the weight is
   read as one sequential stream, row after row, which the hardware prefetcher follows best (a 4-row
   tile reads four strided streams: 0.5x of the read bandwidth here, against 0.7x this way) */
#define X16(q) _mm256_loadu_si256((const __m256i *)(x0 + p + (q)))
#define STREAM_AHEAD 4096 /* bytes of weight prefetched ahead of the stream */
__attribute__((target("avx2"))) static int32_t row_stream(const int16_t *x0, const int8_t *wr, int64_t k) {
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
    int64_t p = 0;
    for (; p + 64 <= k; p += 64) {
        _mm_prefetch((const char *)(wr + p + STREAM_AHEAD), _MM_HINT_T0);
        __m256i a = _mm256_loadu_si256((const __m256i *)(wr + p)), b = _mm256_loadu_si256((const __m256i *)(wr + p + 32));
        MADD(c0, X16(0), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(a)));
        MADD(c1, X16(16), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(a, 1)));
        MADD(c2, X16(32), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(b)));
        MADD(c3, X16(48), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(b, 1)));
    }
    for (; p < k; p += 16) MADD(c0, X16(0), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wr + p))));
    return hsum(_mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3)));
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
        if (mb <= STREAM_ROWS) {
            for (; j < n1; j++)
                for (int64_t r = 0; r < mb; r++) out[(i0 + r) * n + j] = row_stream(x16 + r * k, w + j * k, k);
            continue;
        }
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
        if (mb <= STREAM_ROWS) { /* the weight as one stream, as in gemm_avx2 (the same sums as the tiles) */
            for (; j < n1; j++) {
                for (int64_t p = 0; p < k; p += 64) _mm_prefetch((const char *)(w + j * k + p + STREAM_AHEAD), _MM_HINT_T0);
                for (int64_t r = 0; r < mb; r++) q8_tile_1x1(x16 + r * k, dx + (i0 + r) * nb, w, dw, j, k, out + (i0 + r) * n);
            }
            continue;
        }
        for (; j + 4 <= n1; j += 4) {
            const int8_t *ahead = j + AHEAD + 4 <= n1 ? w + (j + AHEAD) * k : 0;
            for (int64_t r = 0; r < mb; r++, ahead = 0)
                q8_tile_1x4(x16 + r * k, dx + (i0 + r) * nb, w, dw, j, k, out + (i0 + r) * n, ahead);
        }
        for (; j < n1; j++)
            for (int64_t r = 0; r < mb; r++) q8_tile_1x1(x16 + r * k, dx + (i0 + r) * nb, w, dw, j, k, out + (i0 + r) * n);
    }
}

/* ---- AVX-512 VNNI (vpdpbusd: four u8 x s8 products summed into each int32 lane, exactly). x's codes
   are made unsigned, u = x + 128, and the excess is taken off with the same instruction:
   sum(u * w) - sum(128 * w) = sum(x * w), every partial sum exact in int32 (|sum| <= k * 255 * 128).
   Any k: the last 64-byte chunk of a row is read with a mask. */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define DP(c, a, b) c = _mm512_dpbusd_epi32(c, a, b)
/* the same in place, by inline assembly, for the 4 x 4 tile: there, with the intrinsic, GCC 12 copied
   every accumulator twice per step (its three-operand form of a two-operand instruction), half the
   tile's speed */
#define DP_INPLACE(c, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a), "v"(b))

/* rows x [mb, k] int8 -> u [mb, k] uint8 = x + 128 */
VNNI static void to_unsigned(const int8_t *x, int64_t mb, int64_t k, uint8_t *u) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    int64_t p = 0, all = mb * k;
    for (; p + 64 <= all; p += 64)
        _mm512_storeu_si512(u + p, _mm512_xor_si512(_mm512_loadu_si512(x + p), flip));
    for (; p < all; p++) u[p] = (uint8_t)(x[p] ^ 0x80);
}

VNNI static inline __mmask64 tail_mask(int64_t left) { return left >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << left) - 1; }

/* R (1-8) rows of u against one row of w, read front to back as one stream (see row_stream) */
VNNI static inline __attribute__((always_inline)) void stream_vnni(const uint8_t *u, int R, const int8_t *wr,
                                                                   int64_t k, int32_t *res) {
    const __m512i h = _mm512_set1_epi8((char)0x80);
    __m512i z = _mm512_setzero_si512(), c0 = z, c1 = z, c2 = z, c3 = z, c4 = z, c5 = z, c6 = z, c7 = z;
    __m512i e = z;
#define STREAM_STEP(LOAD)                                                                                  \
    {                                                                                                      \
        __m512i b = LOAD(wr + p);                                                                          \
        DP(e, h, b);                                                                                       \
        DP(c0, LOAD(u + p), b);                                                                            \
        if (R > 1) DP(c1, LOAD(u + k + p), b);                                                             \
        if (R > 2) DP(c2, LOAD(u + 2 * k + p), b);                                                         \
        if (R > 3) DP(c3, LOAD(u + 3 * k + p), b);                                                         \
        if (R > 4) DP(c4, LOAD(u + 4 * k + p), b);                                                         \
        if (R > 5) DP(c5, LOAD(u + 5 * k + p), b);                                                         \
        if (R > 6) DP(c6, LOAD(u + 6 * k + p), b);                                                         \
        if (R > 7) DP(c7, LOAD(u + 7 * k + p), b);                                                         \
    }
#define WHOLE(ptr) _mm512_loadu_si512(ptr)
#define MASKED(ptr) _mm512_maskz_loadu_epi8(m, ptr)
    int64_t p = 0;
    for (; p + 64 <= k; p += 64) { /* whole chunks: plain loads (masked ones are slower) */
        _mm_prefetch((const char *)(wr + p + STREAM_AHEAD), _MM_HINT_T0);
        STREAM_STEP(WHOLE)
    }
    if (p < k) {
        __mmask64 m = tail_mask(k - p);
        STREAM_STEP(MASKED)
    }
    res[0] = _mm512_reduce_add_epi32(_mm512_sub_epi32(c0, e));
    if (R > 1) res[1] = _mm512_reduce_add_epi32(_mm512_sub_epi32(c1, e));
    if (R > 2) res[2] = _mm512_reduce_add_epi32(_mm512_sub_epi32(c2, e));
    if (R > 3) res[3] = _mm512_reduce_add_epi32(_mm512_sub_epi32(c3, e));
    if (R > 4) res[4] = _mm512_reduce_add_epi32(_mm512_sub_epi32(c4, e));
    if (R > 5) res[5] = _mm512_reduce_add_epi32(_mm512_sub_epi32(c5, e));
    if (R > 6) res[6] = _mm512_reduce_add_epi32(_mm512_sub_epi32(c6, e));
    if (R > 7) res[7] = _mm512_reduce_add_epi32(_mm512_sub_epi32(c7, e));
}

/* the sums of the 16 lanes of each v[i], as lane i of one vector (exact: int32 adds) */
VNNI static inline __m512i sum16(__m512i *v) {
    __m512i t[8], q[4];
    for (int i = 0; i < 8; i++) /* lanes of 128-bit quarter: [v2i, v2i+1, v2i, v2i+1] */
        t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* [v4i, v4i+1, v4i+2, v4i+3] in every quarter */
        q[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]), _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
    __m512i a = _mm512_add_epi32(_mm512_shuffle_i32x4(q[0], q[1], 0x88), _mm512_shuffle_i32x4(q[0], q[1], 0xdd));
    __m512i b = _mm512_add_epi32(_mm512_shuffle_i32x4(q[2], q[3], 0x88), _mm512_shuffle_i32x4(q[2], q[3], 0xdd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xdd));
}

/* 128 * (the sum of row j + q of w), q = 0 .. 3: what the unsigned codes add to each dot product */
VNNI static __m512i excess4(const int8_t *w, int64_t j, int64_t k) {
    const __m512i h = _mm512_set1_epi8((char)0x80);
    __m512i e[4];
    for (int q = 0; q < 4; q++) {
        __m512i t = _mm512_setzero_si512();
        for (int64_t p = 0; p < k; p += 64) DP(t, h, _mm512_maskz_loadu_epi8(tail_mask(k - p), w + (j + q) * k + p));
        e[q] = _mm512_set1_epi32(_mm512_reduce_add_epi32(t));
    }
    /* lane 4r + q holds row q's excess, the layout of sum16's result */
    return _mm512_mask_blend_epi32(0x8888, _mm512_mask_blend_epi32(0x4444, _mm512_mask_blend_epi32(0x2222, e[0], e[1]),
                                                                   e[2]), e[3]);
}

/* rows r .. r+3 of u (row stride k) against rows j .. j+3 of w -> out[r][j .. j+3] (row stride n):
   16 accumulators, each chunk of x and w loaded once */
#define COL(q)                                                                                             \
    {                                                                                                      \
        __m512i b = _mm512_maskz_loadu_epi8(m, w + (j + q) * k + p);                                       \
        DP_INPLACE(c0##q, a0, b); DP_INPLACE(c1##q, a1, b); DP_INPLACE(c2##q, a2, b);                      \
        DP_INPLACE(c3##q, a3, b);                                                                          \
    }
VNNI static void tile_4x4_vnni(const uint8_t *u, const int8_t *w, int64_t j, int64_t k, __m512i excess, int32_t *out,
                               int64_t n, const int8_t *ahead) {
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    __m512i c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
    int64_t p = 0;
    for (; p + 64 <= k; p += 64) { /* whole chunks: plain loads */
        if (ahead)
            for (int q = 0; q < 4; q++) _mm_prefetch((const char *)(ahead + q * k + p), _MM_HINT_T0);
        __mmask64 m = ~(__mmask64)0;
        __m512i a0 = _mm512_loadu_si512(u + p), a1 = _mm512_loadu_si512(u + k + p);
        __m512i a2 = _mm512_loadu_si512(u + 2 * k + p), a3 = _mm512_loadu_si512(u + 3 * k + p);
        COL(0) COL(1) COL(2) COL(3)
    }
    if (p < k) { /* the last, partial chunk */
        __mmask64 m = tail_mask(k - p);
        __m512i a0 = _mm512_maskz_loadu_epi8(m, u + p), a1 = _mm512_maskz_loadu_epi8(m, u + k + p);
        __m512i a2 = _mm512_maskz_loadu_epi8(m, u + 2 * k + p), a3 = _mm512_maskz_loadu_epi8(m, u + 3 * k + p);
        COL(0) COL(1) COL(2) COL(3)
    }
    __m512i v[16] = {c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33};
    int32_t lanes[16];
    _mm512_storeu_si512(lanes, _mm512_sub_epi32(sum16(v), excess));
    for (int r = 0; r < 4; r++) memcpy(out + r * n + j, lanes + 4 * r, 4 * sizeof(int32_t));
}

VNNI static void stream_vnni_rows(const uint8_t *u, int64_t R, const int8_t *wr, int64_t k, int32_t *res) {
    switch (R) {
    case 8: stream_vnni(u, 8, wr, k, res); break;
    case 7: stream_vnni(u, 7, wr, k, res); break;
    case 6: stream_vnni(u, 6, wr, k, res); break;
    case 5: stream_vnni(u, 5, wr, k, res); break;
    case 4: stream_vnni(u, 4, wr, k, res); break;
    case 3: stream_vnni(u, 3, wr, k, res); break;
    case 2: stream_vnni(u, 2, wr, k, res); break;
    default: stream_vnni(u, 1, wr, k, res); break;
    }
}

/* R (1-8) rows of u against two adjacent rows of w (wr, wr + k) at once: each loaded chunk of u serves
   both, which halves the reads of u (from L2 once R rows of k no longer fit in L1) */
VNNI static inline __attribute__((always_inline)) void stream2_vnni(const uint8_t *u, int R, const int8_t *wr,
                                                                    int64_t k, int32_t *res0, int32_t *res1) {
    const __m512i h = _mm512_set1_epi8((char)0x80);
    __m512i z = _mm512_setzero_si512(), c0 = z, c1 = z, c2 = z, c3 = z, c4 = z, c5 = z, c6 = z, c7 = z;
    __m512i d0 = z, d1 = z, d2 = z, d3 = z, d4 = z, d5 = z, d6 = z, d7 = z, e = z, f = z;
#define ROW2(r, LOAD) if (R > r) { __m512i a = LOAD(u + r * k + p); DP(c##r, a, b0); DP(d##r, a, b1); }
#define STEP2(LOAD)                                                                                        \
    {                                                                                                      \
        __m512i b0 = LOAD(wr + p), b1 = LOAD(wr + k + p);                                                  \
        DP(e, h, b0); DP(f, h, b1);                                                                        \
        ROW2(0, LOAD) ROW2(1, LOAD) ROW2(2, LOAD) ROW2(3, LOAD) ROW2(4, LOAD) ROW2(5, LOAD) ROW2(6, LOAD)   \
        ROW2(7, LOAD)                                                                                      \
    }
    int64_t p = 0;
    for (; p + 64 <= k; p += 64) {
        _mm_prefetch((const char *)(wr + p + STREAM_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(wr + k + p + STREAM_AHEAD), _MM_HINT_T0);
        STEP2(WHOLE)
    }
    if (p < k) {
        __mmask64 m = tail_mask(k - p);
        STEP2(MASKED)
    }
#define OUT2(r)                                                                                            \
    if (R > r) {                                                                                           \
        res0[r] = _mm512_reduce_add_epi32(_mm512_sub_epi32(c##r, e));                                      \
        res1[r] = _mm512_reduce_add_epi32(_mm512_sub_epi32(d##r, f));                                      \
    }
    OUT2(0) OUT2(1) OUT2(2) OUT2(3) OUT2(4) OUT2(5) OUT2(6) OUT2(7)
}

VNNI static void stream2_vnni_rows(const uint8_t *u, int64_t R, const int8_t *wr, int64_t k, int32_t *res0,
                                   int32_t *res1) {
    switch (R) {
    case 8: stream2_vnni(u, 8, wr, k, res0, res1); break;
    case 7: stream2_vnni(u, 7, wr, k, res0, res1); break;
    case 6: stream2_vnni(u, 6, wr, k, res0, res1); break;
    case 5: stream2_vnni(u, 5, wr, k, res0, res1); break;
    case 4: stream2_vnni(u, 4, wr, k, res0, res1); break;
    case 3: stream2_vnni(u, 3, wr, k, res0, res1); break;
    case 2: stream2_vnni(u, 2, wr, k, res0, res1); break;
    default: stream2_vnni(u, 1, wr, k, res0, res1); break;
    }
}

/* columns [n0, n1) of out, any k; buf: the block's rows as unsigned codes (a per-thread buffer) */
VNNI static void gemm_vnni(const struct problem *a, int64_t n0, int64_t n1, int16_t *buf) {
    const int8_t *x = a->x, *w = a->w;
    int64_t m = a->m, n = a->n, k = a->k;
    int32_t *out = (int32_t *)a->out;
    uint8_t *u = (uint8_t *)buf;
    for (int64_t i0 = 0; i0 < m; i0 += MB) {
        int64_t mb = m - i0 < MB ? m - i0 : MB;
        to_unsigned(x + i0 * k, mb, k, u);
        int64_t j = n0;
        if (mb <= STREAM_ROWS_VNNI && !(mb == 8 && k <= TILE_K_VNNI)) {
            int32_t res[STREAM_ROWS_VNNI] = {0}, res1[STREAM_ROWS_VNNI] = {0};
            for (; mb > 1 && j + 2 <= n1; j += 2) { /* two weight rows a pass once they share rows of x */
                stream2_vnni_rows(u, mb, w + j * k, k, res, res1);
                for (int64_t r = 0; r < mb; r++) out[(i0 + r) * n + j] = res[r], out[(i0 + r) * n + j + 1] = res1[r];
            }
            for (; j < n1; j++) {
                stream_vnni_rows(u, mb, w + j * k, k, res);
                for (int64_t r = 0; r < mb; r++) out[(i0 + r) * n + j] = res[r];
            }
            continue;
        }
        for (; j + 4 <= n1; j += 4) {
            const int8_t *ahead = j + AHEAD + 4 <= n1 ? w + (j + AHEAD) * k : 0;
            __m512i excess = excess4(w, j, k);
            int64_t r = 0;
            for (; r + 4 <= mb; r += 4, ahead = 0)
                tile_4x4_vnni(u + r * k, w, j, k, excess, out + (i0 + r) * n, n, ahead);
            for (int64_t q = 0; q < 4 && r < mb; q++) { /* the last rows, by weight row */
                int32_t res[4];
                stream_vnni_rows(u + r * k, mb - r, w + (j + q) * k, k, res);
                for (int64_t i = r; i < mb; i++) out[(i0 + i) * n + j + q] = res[i - r];
            }
        }
        for (; j < n1; j++)
            for (int64_t r = 0; r < mb; r += 4) {
                int32_t res[4];
                int64_t R = mb - r < 4 ? mb - r : 4;
                stream_vnni_rows(u + r * k, R, w + j * k, k, res);
                for (int64_t q = 0; q < R; q++) out[(i0 + r + q) * n + j] = res[q];
            }
    }
}

/* ---- The VNNI-packed weight (pdmix_s8pack), for n % 16 == 0 and k % 4 == 0. It holds the codes as
   unsigned bytes, w + 128. Columns come in blocks of 16 and blocks in groups of PACK_T (the last group may
   have fewer, t). A 64-byte chunk holds 4 codes of each of a block's 16 columns, w[16b + q][4c .. 4c+3] at
   bytes 4q .. 4q+3, and a group is its blocks' chunks interleaved, c by c: chunk c of its block i at
   (c t + i) 64 bytes from the group's start. One vpdpbusd of a chunk with 4 codes of a row of x
   broadcast adds to the 16 columns' sums at once, each in its own lane: no reduction across lanes, every
   loaded weight byte serves every row of the tile, and a tile reads its group front to back as one
   stream. sum((w + 128) x) - 128 sum(x) = sum(w x), the row's excess counted once per row of x. */
#define PACK_R 8 /* rows of x per tile: 8 x 3 accumulators, 3 weight chunks and the broadcast fit 32 registers */
#define PACK_AHEAD 4096 /* bytes prefetched (into L2) ahead of the stream: 1.2x at M = 1 over 2048 on cold weights */
/* the same for tiles of 2-4 rows: cold, 1024 bytes took M = 2, 3, 4 from 0.68, 0.67, 0.64 of the read
   bandwidth to 0.78, 0.77, 0.76 (medians of 5 alternating runs, Zen 4); and for tiles of 5-8 rows, which spend
   longest on each line: 8192 bytes took M = 8 from 6.02 to 5.11 ms and M = 16 from 9.81 to 9.03 ms on SmolLM2's
   106 MB (medians of 5; 2048 made M = 8 20% slower) */
#define PACK_AHEAD_FEW_ROWS 1024
#define PACK_AHEAD_MANY_ROWS 8192

/* R (1-8) rows of x (row stride k) against the T (1-3) blocks of the group at blk -> out[r][16 t + q]
   (row stride n), less each row's excess[r] */
VNNI static inline __attribute__((always_inline)) void packed_tile(int R, int T, const int8_t *x, int64_t k,
                                                                   const int8_t *blk, const int32_t *excess,
                                                                   int32_t *out, int64_t n) {
    const __m512i z = _mm512_setzero_si512();
    __m512i c00 = z, c01 = z, c02 = z, c10 = z, c11 = z, c12 = z, c20 = z, c21 = z, c22 = z, c30 = z, c31 = z, c32 = z;
    __m512i c40 = z, c41 = z, c42 = z, c50 = z, c51 = z, c52 = z, c60 = z, c61 = z, c62 = z, c70 = z, c71 = z, c72 = z;
    const int64_t ahead = R == 1 ? PACK_AHEAD : R <= 4 ? PACK_AHEAD_FEW_ROWS : PACK_AHEAD_MANY_ROWS;
    for (int64_t p = 0; p < k; p += 4) {
        const int8_t *b = blk + 16 * T * p;
        __m512i w0 = z, w1 = z, w2 = z;
        _mm_prefetch((const char *)(b + ahead), _MM_HINT_T1);
        w0 = _mm512_loadu_si512(b);
        if (T > 1) { _mm_prefetch((const char *)(b + 64 + ahead), _MM_HINT_T1); w1 = _mm512_loadu_si512(b + 64); }
        if (T > 2) { _mm_prefetch((const char *)(b + 128 + ahead), _MM_HINT_T1); w2 = _mm512_loadu_si512(b + 128); }
#define PACKED_ROW(r)                                                                                      \
        if (R > r) {                                                                                       \
            int32_t four;                                                                                  \
            memcpy(&four, x + r * k + p, 4);                                                               \
            __m512i a = _mm512_set1_epi32(four);                                                           \
            DP_INPLACE(c##r##0, w0, a);                                                                    \
            if (T > 1) DP_INPLACE(c##r##1, w1, a);                                                         \
            if (T > 2) DP_INPLACE(c##r##2, w2, a);                                                         \
        }
        PACKED_ROW(0) PACKED_ROW(1) PACKED_ROW(2) PACKED_ROW(3) PACKED_ROW(4) PACKED_ROW(5) PACKED_ROW(6) PACKED_ROW(7)
    }
#define PACKED_OUT(r)                                                                                      \
    if (R > r) {                                                                                           \
        __m512i e = _mm512_set1_epi32(excess[r]);                                                          \
        _mm512_storeu_si512(out + r * n, _mm512_sub_epi32(c##r##0, e));                                    \
        if (T > 1) _mm512_storeu_si512(out + r * n + 16, _mm512_sub_epi32(c##r##1, e));                    \
        if (T > 2) _mm512_storeu_si512(out + r * n + 32, _mm512_sub_epi32(c##r##2, e));                    \
    }
    PACKED_OUT(0) PACKED_OUT(1) PACKED_OUT(2) PACKED_OUT(3) PACKED_OUT(4) PACKED_OUT(5) PACKED_OUT(6) PACKED_OUT(7)
}

#define PACKED_T(R)                                                                                        \
    case R:                                                                                                \
        if (T == 3) packed_tile(R, 3, x, k, blk, excess, out, n);                                          \
        else if (T == 2) packed_tile(R, 2, x, k, blk, excess, out, n);                                     \
        else packed_tile(R, 1, x, k, blk, excess, out, n);                                                 \
        break;
VNNI static void packed_tile_rt(int64_t R, int64_t T, const int8_t *x, int64_t k, const int8_t *blk,
                                const int32_t *excess, int32_t *out, int64_t n) {
    switch (R) { PACKED_T(8) PACKED_T(7) PACKED_T(6) PACKED_T(5) PACKED_T(4) PACKED_T(3) PACKED_T(2) PACKED_T(1) }
}

/* columns [n0, n1) of out (n0 a group's first column, n1 another's or n) from the packed weight; buf: room
   for MB rows' excess */
VNNI static void gemm_vnni_packed(const struct problem *a, int64_t n0, int64_t n1, int16_t *buf) {
    const int8_t *x = a->x, *w = a->w;
    int64_t m = a->m, n = a->n, k = a->k;
    int32_t *out = (int32_t *)a->out, *excess = (int32_t *)buf;
    for (int64_t i0 = 0; i0 < m; i0 += MB) {
        int64_t mb = m - i0 < MB ? m - i0 : MB;
        for (int64_t r = 0; r < mb; r++) {
            int32_t s = 0;
            for (int64_t p = 0; p < k; p++) s += x[(i0 + r) * k + p];
            excess[r] = 128 * s;
        }
        for (int64_t j = n0; j < n1; j += 16 * PACK_T) { /* a group, in L1/L2 across the rows */
            int64_t T = (n1 - j) / 16 < PACK_T ? (n1 - j) / 16 : PACK_T;
            for (int64_t r = 0; r < mb; r += PACK_R)
                packed_tile_rt(mb - r < PACK_R ? mb - r : PACK_R, T, x + (i0 + r) * k, k, w + j * k, excess + r,
                               out + (i0 + r) * n + j, n);
        }
    }
}
#endif

/* w [n, k] int8 (row-major) -> wp [n * k] in the VNNI-packed layout (n % 16 == 0, k % 4 == 0; wp may not
   alias w), for CPUs where the VNNI path runs (s8gemm.packs checks) */
void pdmix_s8pack(const int8_t *w, int64_t n, int64_t k, int8_t *wp) {
    for (int64_t b0 = 0; b0 < n / 16; b0 += PACK_T) { /* group by group, chunk by chunk, block by block */
        int64_t t = n / 16 - b0 < PACK_T ? n / 16 - b0 : PACK_T;
        for (int64_t p = 0; p < k; p += 4)
            for (int64_t j = 16 * b0; j < 16 * (b0 + t); j++)
                for (int q = 0; q < 4; q++) *wp++ = (int8_t)(w[j * k + p + q] ^ 0x80);
    }
}

/* Which path runs: 3 = AVX-512 VNNI (the GEMMs; the rest as AVX2), 2 = AVX2, 1 = plain C.
   PDMIX_S8GEMM_ISA=plain|avx2 caps it (the tests compare the paths). Decided once per process: every
   GEMM call asks. */
int pdmix_s8gemm_isa(void) {
    static int isa = 0; /* set once, whole: a thread never sees a half-made choice */
    if (!isa) {
        int chosen = 1;
#ifdef PDMIX_X86
        const char *cap = getenv("PDMIX_S8GEMM_ISA");
        int most = !cap ? 3 : !strcmp(cap, "plain") ? 1 : !strcmp(cap, "avx2") ? 2 : 3;
        if (__builtin_cpu_supports("avx2")) chosen = 2;
        if (chosen == 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
            chosen = 3;
        chosen = chosen < most ? chosen : most;
#endif
        isa = chosen;
    }
    return isa;
}

/* ---- A whole W8A8_MIX linear (SPEC §5): each row quantized on its path, one exact GEMM, each row's
   epilogue, written in the model dtype. The arithmetic is pdmix/kernels/reference.py's, operation for
   operation in fp32 (true division, round half to even, no fused multiply-add: the library is built
   with -ffp-contract=off), and bf16 is rounded to nearest even as torch does, so the output is bit
   for bit the reference's. */

#define TINY 1.17549435e-38f /* torch.finfo(torch.float32).tiny, the least per-token scale */

/* The per-channel scales come in one of two forms (struct w8a8_linear's scales_bf16):
   - fp32 deq_scale and weight_scale vectors;
   - weight_scale as bf16 (ws16) and no deq_scale: each channel's is recomputed as SPEC section 4 defines it,
     bf16(input_scale * weight_scale) widened, which the owner checked gives the file's bits for every channel
     (per row, or once per call into a buffer that deq_scale then points to, where several rows are static).
   The second holds 2 bytes per channel where the first holds 8. */
struct epilogue {
    const uint8_t *dynamic; /* [m]: 1 for a row on the dynamic (per-token) path */
    const float *s;         /* [m]: the dynamic rows' scales */
    const float *deq_scale, *weight_scale, *bias_float; /* [n] fp32, or NULL; bias_float may be NULL */
    const uint16_t *ws16;                               /* [n] bf16 weight_scale where the fp32 two are NULL */
    float input_scale;
    const int32_t *quant_bias; /* [n] */
    void *y;                   /* [m, n], bf16 (y_bf16) or fp32 */
    int y_bf16;
};

static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }

static inline float weight_scale_at(const struct epilogue *e, int64_t j) {
    return e->ws16 ? bf16_to_float(e->ws16[j]) : e->weight_scale[j];
}

static inline float deq_scale_at(const struct epilogue *e, int64_t j) {
    return e->deq_scale ? e->deq_scale[j] : bf16_to_float(float_to_bf16(e->input_scale * bf16_to_float(e->ws16[j])));
}

/* y[i][j0, j1) of one row from its int32 accumulators */
static void epilogue_plain(const struct epilogue *e, const int32_t *acc, int64_t i, int64_t n, int64_t j0, int64_t j1) {
    float *yf = (float *)e->y + i * n;
    uint16_t *yh = (uint16_t *)e->y + i * n;
    for (int64_t j = j0; j < j1; j++) {
        float v;
        if (e->dynamic[i]) {
            v = (float)acc[j] * e->s[i]; /* acc * s_t * weight_scale + bias_float */
            v = v * weight_scale_at(e, j);
            if (e->bias_float) v = v + e->bias_float[j];
        } else { /* deq_scale * (acc + quant_bias), the int32 sum wrapping as torch's */
            v = deq_scale_at(e, j) * (float)(int32_t)((uint32_t)acc[j] + (uint32_t)e->quant_bias[j]);
        }
        if (e->y_bf16) yh[j] = float_to_bf16(v);
        else yf[j] = v;
    }
}

/* quantize_row's codes of v[0, k): clamp(round(v / div + add), lo, hi); add is 0 on the dynamic
   path, where it changes no code (x + 0 differs from x only for -0, which rounds to code 0 too) */
static void codes_plain(const float *v, int64_t p, int64_t k, float div, float add, float lo, float hi, int8_t *q) {
    for (; p < k; p++) q[p] = (int8_t)(int)clampf(nearbyintf(v[p] / div + add), lo, hi);
}

static float amax_plain(const float *v, int64_t p, int64_t k, float amax) {
    for (; p < k; p++) {
        float t = v[p] < 0 ? -v[p] : v[p];
        if (t > amax) amax = t;
    }
    return amax;
}

#ifdef PDMIX_X86
/* weight_scale_at and deq_scale_at, 8 and 16 lanes */
__attribute__((target("avx2"))) static inline __m256 weight_scale8(const struct epilogue *e, int64_t j) {
    if (!e->ws16) return _mm256_loadu_ps(e->weight_scale + j);
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(e->ws16 + j)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

__attribute__((target("avx2"))) static inline __m256 deq_scale8(const struct epilogue *e, int64_t j) {
    if (e->deq_scale) return _mm256_loadu_ps(e->deq_scale + j);
    __m256i u = _mm256_castps_si256(_mm256_mul_ps(_mm256_set1_ps(e->input_scale), weight_scale8(e, j)));
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                             _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(u, 16), 16)); /* finite: the owner checked */
}

VNNI static inline __m512 weight_scale16(const struct epilogue *e, int64_t j) {
    return e->ws16 ? bf16x16_load(e->ws16 + j, 0xffff) : _mm512_loadu_ps(e->weight_scale + j);
}

VNNI static inline __m512 deq_scale16(const struct epilogue *e, int64_t j) {
    if (e->deq_scale) return _mm512_loadu_ps(e->deq_scale + j);
    __m512i h = bf16x16_round(_mm512_mul_ps(_mm512_set1_ps(e->input_scale), weight_scale16(e, j)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

/* The same, 8 lanes at a time; returns where the scalar tail starts. The lanes do the scalar code's
   operations (IEEE division, rounding to nearest even, exact int32 -> fp32), so the bits agree. */
__attribute__((target("avx2"))) static int64_t epilogue_avx2(const struct epilogue *e, const int32_t *acc, int64_t i,
                                                               int64_t n, int64_t j0, int64_t j1) {
    float *yf = (float *)e->y + i * n;
    uint16_t *yh = (uint16_t *)e->y + i * n;
    int dynamic = e->dynamic[i];
    __m256 s = _mm256_set1_ps(dynamic ? e->s[i] : 0.0f);
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(acc + j)), u;
        __m256 v;
        if (dynamic) {
            v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), s), weight_scale8(e, j));
            if (e->bias_float) v = _mm256_add_ps(v, _mm256_loadu_ps(e->bias_float + j));
        } else {
            a = _mm256_add_epi32(a, _mm256_loadu_si256((const __m256i *)(e->quant_bias + j)));
            v = _mm256_mul_ps(deq_scale8(e, j), _mm256_cvtepi32_ps(a));
        }
        if (!e->y_bf16) {
            _mm256_storeu_ps(yf + j, v);
            continue;
        }
        u = _mm256_castps_si256(v); /* round to nearest even on the upper 16 bits, NaN -> 0x7fc0 */
        u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                 _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
        u = _mm256_blendv_epi8(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x7fc0),
                               _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        _mm_storeu_si128((__m128i *)(yh + j), _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
    }
    return j;
}

/* epilogue_avx2 16 lanes at a time (the same operations, so the same bits): 5% off SmolLM2's linears at
   16 rows and 2 threads */
VNNI static int64_t epilogue_avx512(const struct epilogue *e, const int32_t *acc, int64_t i, int64_t n, int64_t j0,
                                    int64_t j1) {
    float *yf = (float *)e->y + i * n;
    uint16_t *yh = (uint16_t *)e->y + i * n;
    int dynamic = e->dynamic[i];
    __m512 s = _mm512_set1_ps(dynamic ? e->s[i] : 0.0f);
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) {
        __m512i a = _mm512_loadu_si512(acc + j);
        __m512 v;
        if (dynamic) {
            v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), s), weight_scale16(e, j));
            if (e->bias_float) v = _mm512_add_ps(v, _mm512_loadu_ps(e->bias_float + j));
        } else {
            a = _mm512_add_epi32(a, _mm512_loadu_si512(e->quant_bias + j));
            v = _mm512_mul_ps(deq_scale16(e, j), _mm512_cvtepi32_ps(a));
        }
        if (!e->y_bf16) {
            _mm512_storeu_ps(yf + j, v);
            continue;
        }
        _mm256_storeu_si256((__m256i *)(yh + j), _mm512_cvtepi32_epi16(bf16x16_round(v)));
    }
    return j;
}

/* row i of x, bf16, as fp32 (exact: bf16 is fp32's upper half); returns where the scalar tail starts */
VNNI static int64_t load_bf16_avx512(const uint16_t *h, int64_t k, float *buf) {
    int64_t p = 0;
    for (; p + 16 <= k; p += 16) _mm512_storeu_ps(buf + p, bf16x16_load(h + p, 0xffff));
    return p;
}

__attribute__((target("avx2"))) static int64_t codes_avx2(const float *v, int64_t k, float div, float add, float lo,
                                                            float hi, int8_t *q) {
    __m256 d = _mm256_set1_ps(div), o = _mm256_set1_ps(add), l = _mm256_set1_ps(lo), h = _mm256_set1_ps(hi);
    int64_t p = 0;
    for (; p + 8 <= k; p += 8) {
        __m256 t = _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(v + p), d), o);
        t = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), l), h);
        __m256i c = _mm256_cvtps_epi32(t);
        __m128i c16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
        _mm_storel_epi64((__m128i *)(q + p), _mm_packs_epi16(c16, c16));
    }
    return p;
}

__attribute__((target("avx2"))) static float amax_avx2(const float *v, int64_t k, int64_t *p_end) {
    __m256 m = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    int64_t p = 0;
    for (; p + 8 <= k; p += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + p)));
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, m);
    for (int q = 0; q < 8; q++) amax = lanes[q] > amax ? lanes[q] : amax;
    *p_end = p;
    return amax;
}
#endif

static int fast(void) { return pdmix_s8gemm_isa() >= 2; }

#ifdef PDMIX_X86
VNNI static int64_t derive_deq_avx512(const struct epilogue *e, float *out, int64_t n) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(out + j, deq_scale16(e, j));
    return j;
}

__attribute__((target("avx2"))) static int64_t derive_deq_avx2(const struct epilogue *e, float *out, int64_t j,
                                                                 int64_t n) {
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, deq_scale8(e, j));
    return j;
}
#endif

/* every channel's deq_scale from the bf16 weight_scale (e->deq_scale NULL) into out [n] */
static void derive_deq_scale(const struct epilogue *e, float *out, int64_t n) {
    int64_t j = 0;
#ifdef PDMIX_X86
    if (pdmix_s8gemm_isa() == 3) j = derive_deq_avx512(e, out, n);
    if (fast()) j = derive_deq_avx2(e, out, j, n);
#endif
    for (; j < n; j++) out[j] = deq_scale_at(e, j);
}

static void epilogue_columns(const struct problem *a, int64_t n0, int64_t n1) {
    for (int64_t i = 0; i < a->m; i++) {
        const int32_t *acc = (const int32_t *)a->out + i * a->n;
        int64_t j = n0;
#ifdef PDMIX_X86
        if (pdmix_s8gemm_isa() == 3) j = epilogue_avx512(a->ep, acc, i, a->n, n0, n1);
        if (fast()) j = epilogue_avx2(a->ep, acc, i, a->n, j, n1);
#endif
        epilogue_plain(a->ep, acc, i, a->n, j, n1);
    }
}

/* row i of x (bf16 or fp32) as fp32 into buf */
static void load_row(const void *x, int x_bf16, int64_t i, int64_t k, float *buf) {
    if (x_bf16) {
        const uint16_t *h = (const uint16_t *)x + i * k;
        int64_t p = 0;
#ifdef PDMIX_X86
        if (pdmix_s8gemm_isa() == 3) p = load_bf16_avx512(h, k, buf);
#endif
        for (; p < k; p++) buf[p] = bf16_to_float(h[p]);
    } else {
        memcpy(buf, (const float *)x + i * k, (size_t)k * sizeof(float));
    }
}

/* dynamic: s_t = max(max|x_t| / 127, TINY), x_q = clamp(round(x / s_t), -127, 127);
   static: x_q = clamp(round(x / input_scale + input_offset), -128, 127) */
static void quantize_row(const float *v, int64_t k, int dynamic, float input_scale, float input_offset,
                         int8_t *q, float *s) {
    float div = input_scale, add = input_offset, lo = -128.0f;
    int64_t p = 0;
    if (dynamic) {
        float amax = 0.0f;
#ifdef PDMIX_X86
        if (fast()) amax = amax_avx2(v, k, &p);
#endif
        amax = amax_plain(v, p, k, amax) / 127.0f;
        div = *s = amax < TINY ? TINY : amax;
        add = 0.0f, lo = -127.0f;
    } else {
        *s = 0.0f;
    }
    p = 0;
#ifdef PDMIX_X86
    if (fast()) p = codes_avx2(v, k, div, add, lo, 127.0f, q);
#endif
    codes_plain(v, p, k, div, add, lo, 127.0f, q);
}

typedef void (*avx2_part)(const struct problem *, int64_t, int64_t, int16_t *);
typedef void (*plain_part)(const struct problem *, int64_t, int64_t);

/* What pdmix_w8a8_linear quantizes: x [m, k] (bf16 if x_bf16, else fp32) into the problem's int8 x (q) and
   the dynamic rows' scales (s) */
struct quantize {
    const void *x;
    int x_bf16;
    const uint8_t *dynamic;
    float input_scale, input_offset;
    int8_t *q;
    float *s;
};

/* part t of `parts` of the rows: quantized; returns 0, or -1 without memory for a row buffer */
static int quantize_part(const struct problem *a, int64_t t, int64_t parts) {
    const struct quantize *z = a->qz;
    int64_t k = a->k, i0 = a->m * t / parts, i1 = a->m * (t + 1) / parts;
    float *row = (float *)malloc((size_t)k * sizeof(float));
    if (!row) return -1;
    for (int64_t i = i0; i < i1; i++) {
        load_row(z->x, z->x_bf16, i, k, row);
        quantize_row(row, k, z->dynamic[i], z->input_scale, z->input_offset, z->q + i * k, z->s + i);
    }
    free(row);
    return 0;
}

/* part t of `parts` of the columns (groups of 4, of a group's 48 for a packed weight), with its own int16
   buffer for the AVX2 path; returns 0, or -1 without memory for it */
static int column_part(const struct problem *a, int64_t t, int64_t parts, avx2_part avx2, plain_part plain) {
    int64_t n = a->n, align = a->packed ? 16 * PACK_T : 4;
    int64_t n0 = n * t / parts / align * align, n1 = t == parts - 1 ? n : n * (t + 1) / parts / align * align;
    if (avx2) {
        int64_t rows = a->m < MB ? a->m : MB;
        int16_t *x16 = (int16_t *)malloc((size_t)(rows * a->k) * sizeof(int16_t));
        if (!x16) return -1;
        avx2(a, n0, n1, x16);
        free(x16);
    } else {
        plain(a, n0, n1);
    }
    if (a->ep) epilogue_columns(a, n0, n1);
    return 0;
}

/* The problem split over `threads` threads: first its rows' quantization (qz), then, once every row is
   done, its columns. Returns 0, or -1 if a buffer could not be allocated. */
static int run(const struct problem *a, int threads, avx2_part avx2, plain_part plain) {
    int64_t parts = threads > 1 && a->n >= 64 * threads ? threads : 1;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(parts) reduction(| : failed) if (parts > 1)
    {
        int64_t t0 = omp_get_thread_num(), step = omp_get_num_threads(); /* fewer threads than parts: each takes more */
        for (int64_t t = t0; a->qz && t < parts; t += step) failed |= quantize_part(a, t, parts);
#pragma omp barrier
        for (int64_t t = t0; t < parts; t += step) failed |= column_part(a, t, parts, avx2, plain);
    }
#else
    for (int64_t t = 0; a->qz && t < parts; t++) failed |= quantize_part(a, t, parts);
    for (int64_t t = 0; t < parts; t++) failed |= column_part(a, t, parts, avx2, plain);
#endif
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
#define AVX2_OR_NULL(fn, ok) ((ok) && pdmix_s8gemm_isa() >= 2 ? (fn) : (avx2_part)0)
#define GEMM_PART(a) (pdmix_s8gemm_isa() == 3 ? ((a)->packed ? gemm_vnni_packed : gemm_vnni)                   \
                                               : AVX2_OR_NULL(gemm_avx2, (a)->k % 16 == 0))
#else
#define AVX2_OR_NULL(fn, ok) ((avx2_part)0)
#define GEMM_PART(a) ((avx2_part)0)
#endif

/* out [m, n] int32 = x [m, k] int8 @ w [n, k]^T int8; w row-major, or VNNI-packed (pdmix_s8pack) if packed.
   Returns 0, or -1 if out of memory. */
int pdmix_s8gemm(const int8_t *x, int64_t m, const int8_t *w, int packed, int64_t n, int64_t k, int32_t *out,
                 int threads) {
    struct problem a = {x, w, 0, 0, m, n, k, out, 0, packed, 0};
    return run(&a, threads, GEMM_PART(&a), gemm_plain);
}

/* y [m, n] (bf16 if y_bf16, else fp32) = the W8A8_MIX linear of x [m, k] (bf16 if x_bf16, else fp32):
   rows with dynamic[i] set (or, with dynamic NULL, the first n_dynamic rows) on the per-token path,
   the others on the static one (SPEC §5); w and packed as pdmix_s8gemm takes them. Returns 0, or -1 if out of
   memory. */
int pdmix_w8a8_linear(const void *x, int x_bf16, int64_t m, const uint8_t *dynamic, int64_t n_dynamic,
                      const int8_t *w, int packed, int64_t n, int64_t k, float input_scale, float input_offset,
                      const float *deq_scale, const int32_t *quant_bias, const void *weight_scale,
                      int scales_bf16, const float *bias_float, void *y, int y_bf16, int threads) {
    int8_t *q = (int8_t *)malloc((size_t)(m * k));
    float *s = (float *)malloc((size_t)m * sizeof(float));
    int32_t *acc = (int32_t *)malloc((size_t)(m * n) * sizeof(int32_t));
    uint8_t *rows = dynamic ? 0 : (uint8_t *)malloc((size_t)m);
    float *deq = 0;
    int rc = -1;
    if (q && s && acc && (dynamic || rows)) {
        if (!dynamic) {
            for (int64_t i = 0; i < m; i++) rows[i] = i < n_dynamic;
            dynamic = rows;
        }
        int64_t n_static = 0;
        for (int64_t i = 0; i < m; i++) n_static += !dynamic[i];
        struct quantize z = {x, x_bf16, dynamic, input_scale, input_offset, q, s};
        struct epilogue e = {dynamic, s, scales_bf16 ? 0 : deq_scale, scales_bf16 ? 0 : (const float *)weight_scale,
                             bias_float, scales_bf16 ? (const uint16_t *)weight_scale : 0, input_scale, quant_bias,
                             y, y_bf16};
        if (scales_bf16 && n_static > 1 && (deq = (float *)malloc((size_t)n * sizeof(float)))) {
            derive_deq_scale(&e, deq, n);
            e.deq_scale = deq;
        }
        struct problem a = {q, w, 0, 0, m, n, k, acc, &e, packed, &z};
        rc = run(&a, threads, GEMM_PART(&a), gemm_plain);
    }
    free(q); free(s); free(acc); free(rows); free(deq);
    return rc;
}

/* A W8A8_MIX linear's tensors and numbers, filled once by its owner (pdmix/kernels/s8gemm.py, W8A8Linear),
   so that a call passes only its rows: pdmix_w8a8_linear's arguments after n_dynamic. */
struct w8a8_linear {
    const int8_t *w;
    int64_t packed, n, k;
    float input_scale, input_offset;
    const float *deq_scale; /* NULL where scales_bf16 */
    const int32_t *quant_bias;
    const void *weight_scale; /* fp32, or bf16 where scales_bf16 (struct epilogue) */
    const float *bias_float;
    int64_t scales_bf16;
};

int pdmix_w8a8_linear_run(const struct w8a8_linear *l, const void *x, int x_bf16, int64_t m, const uint8_t *dynamic,
                          int64_t n_dynamic, void *y, int y_bf16, int threads) {
    return pdmix_w8a8_linear(x, x_bf16, m, dynamic, n_dynamic, l->w, (int)l->packed, l->n, l->k, l->input_scale,
                             l->input_offset, l->deq_scale, l->quant_bias, l->weight_scale, (int)l->scales_bf16, l->bias_float, y, y_bf16,
                             threads);
}

/* out [m, n] fp32 from 32-wide blocks: x [m, k] int8 with scales dx [m, k/32], w [n, k] int8 with
   scales dw [n, k/32]; k % 32 == 0. Returns 0, or -1 if out of memory. */
int pdmix_q8_0_gemm(const int8_t *x, const float *dx, int64_t m, const int8_t *w, const float *dw, int64_t n,
                    int64_t k, float *out, int threads) {
    struct problem a = {x, w, dx, dw, m, n, k, out, 0, 0, 0};
    return run(&a, threads, AVX2_OR_NULL(q8_gemm_avx2, 1), q8_gemm_plain);
}
