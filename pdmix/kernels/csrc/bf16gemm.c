/* The float linear of bf16 models (rolled-back layers, float checkpoints, the lm_head):
   y [m, n] bf16 = x [m, k] bf16 @ w [n, k]^T bf16 (+ bias [n] bf16), summed in fp32.

   Every output is summed in one fixed order that depends only on k, never on m, on which rows share
   the call, on the blocking or on the thread count: a row's logits are the same alone or in a batch.
   (torch's bf16 GEMM picks other kernels, with other orders, for other m on CPUs with AVX-512 BF16.)
   The order does depend on the CPU's path: AVX-512 BF16 (vdpbf16ps, pairs of products per fp32 lane,
   16 lanes), AVX2 (8 fp32 lanes with fused multiply-adds) or plain C (one running sum), chosen once
   per process, so one machine always computes the same bits.

   Decode reads the weight once per step, four weight rows at a time (see AHEAD). */

#include <stdint.h>

#include "bf16.h"
#include "pdmix.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define PDMIX_X86 1
#include <immintrin.h>
#endif

/* Prefetching: four weight rows are read side by side, 64 bytes of each per step, which the hardware
   prefetcher follows poorly (10 GB/s here); each step also prefetches 4 lines of the weight as one
   linear stream, AHEAD bytes past the end of the current four rows (24 GB/s). */
#define AHEAD 4096


struct fproblem {
    const uint16_t *x, *w, *bias;
    int64_t m, n, k;
    uint16_t *y;
};

static inline uint16_t finish(const struct fproblem *a, float s, int64_t j) {
    return float_to_bf16(a->bias ? s + bf16_to_float(a->bias[j]) : s);
}

static void rows_plain(const struct fproblem *a, int64_t n0, int64_t n1) {
    for (int64_t i = 0; i < a->m; i++)
        for (int64_t j = n0; j < n1; j++) {
            const uint16_t *x = a->x + i * a->k, *w = a->w + j * a->k;
            float s = 0.0f;
            for (int64_t p = 0; p < a->k; p++) s = s + bf16_to_float(x[p]) * bf16_to_float(w[p]);
            a->y[i * a->n + j] = finish(a, s, j);
        }
}

#ifdef PDMIX_X86
/* up to 4 rows of x against up to 4 rows of w (R, C constant after inlining): one accumulator per
   output, the chunks of k in order, then a fixed lane reduction */
#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
BF16 static inline __attribute__((always_inline)) void tile_bf16(const struct fproblem *a, int64_t i, int R,
                                                                  int64_t j, int C) {
    const uint16_t *x = a->x + i * a->k, *w = a->w + j * a->k;
    int64_t k = a->k;
    /* named accumulators (an array of them is spilled to the stack); R and C are constants here */
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    __m512 c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
    __m512bh w0, w1, w2, w3, x0, x1, x2, x3;
#define LOADW(q) if (C > q) { _mm_prefetch(ahead + 64 * q, _MM_HINT_T0); \
                              w##q = (__m512bh)_mm512_maskz_loadu_epi16(m, w + q * k + p); }
#define LOADX(r) if (R > r) x##r = (__m512bh)_mm512_maskz_loadu_epi16(m, x + r * k + p);
#define DOT(r, q) if (R > r && C > q) c##r##q = _mm512_dpbf16_ps(c##r##q, x##r, w##q);
#define DOTS(r) DOT(r, 0) DOT(r, 1) DOT(r, 2) DOT(r, 3)
#define OUT(r, q) if (R > r && C > q) a->y[(i + r) * a->n + j + q] = finish(a, _mm512_reduce_add_ps(c##r##q), j + q);
    for (int64_t p = 0; p < k; p += 32) {
        __mmask32 m = k - p >= 32 ? ~(__mmask32)0 : ((__mmask32)1 << (k - p)) - 1;
        const char *ahead = (const char *)(w + 4 * k) + AHEAD + 8 * p; /* see AHEAD */
        LOADW(0) LOADW(1) LOADW(2) LOADW(3)
        LOADX(0) LOADX(1) LOADX(2) LOADX(3)
        DOTS(0) DOTS(1) DOTS(2) DOTS(3)
    }
    OUT(0, 0) OUT(0, 1) OUT(0, 2) OUT(0, 3) OUT(1, 0) OUT(1, 1) OUT(1, 2) OUT(1, 3)
    OUT(2, 0) OUT(2, 1) OUT(2, 2) OUT(2, 3) OUT(3, 0) OUT(3, 1) OUT(3, 2) OUT(3, 3)
}

#define TILE_CASES(fn)                                                                                     \
    switch (C) {                                                                                           \
    case 4: fn(a, i, R, j, 4); break;                                                                      \
    case 3: fn(a, i, R, j, 3); break;                                                                      \
    case 2: fn(a, i, R, j, 2); break;                                                                      \
    default: fn(a, i, R, j, 1); break;                                                                     \
    }

BF16 static void tile_bf16_any(const struct fproblem *a, int64_t i, int R, int64_t j, int C) {
    switch (R) {
    case 4: R = 4; TILE_CASES(tile_bf16) break;
    case 3: R = 3; TILE_CASES(tile_bf16) break;
    case 2: R = 2; TILE_CASES(tile_bf16) break;
    default: R = 1; TILE_CASES(tile_bf16) break;
    }
}

BF16 static void rows_bf16(const struct fproblem *a, int64_t n0, int64_t n1) {
    for (int64_t i0 = 0; i0 < a->m; i0 += 64) /* 64 rows of x stay in L2 while the weight passes */
        for (int64_t j = n0; j < n1; j += 4)
            for (int64_t i = i0; i < a->m && i < i0 + 64; i += 4)
                tile_bf16_any(a, i, a->m - i < 4 ? (int)(a->m - i) : 4, j, n1 - j < 4 ? (int)(n1 - j) : 4);
}

/* the same with 8 fp32 lanes and fused multiply-adds (x86 CPUs without AVX-512 BF16) */
#define AVX2 __attribute__((target("avx2,fma")))
AVX2 static inline __m256 widen8(const uint16_t *v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)v)), 16));
}

AVX2 static inline __attribute__((always_inline)) void tile_avx2(const struct fproblem *a, int64_t i, int R,
                                                                  int64_t j, int C) {
    const uint16_t *x = a->x + i * a->k, *w = a->w + j * a->k;
    int64_t k = a->k, p = 0;
    __m256 c[2][4];
    for (int r = 0; r < 2; r++)
        for (int q = 0; q < 4; q++) c[r][q] = _mm256_setzero_ps();
    for (; p + 8 <= k; p += 8) {
        __m256 wq[4], xr[2];
        for (int q = 0; q < C; q++) {
            if ((p & 31) == 0) _mm_prefetch((const char *)(w + 4 * k) + AHEAD + 8 * p + 64 * q, _MM_HINT_T0);
            wq[q] = widen8(w + q * k + p);
        }
        for (int r = 0; r < R; r++) xr[r] = widen8(x + r * k + p);
        for (int r = 0; r < R; r++)
            for (int q = 0; q < C; q++) c[r][q] = _mm256_fmadd_ps(xr[r], wq[q], c[r][q]);
    }
    for (int r = 0; r < R; r++)
        for (int q = 0; q < C; q++) {
            float lanes[8], s = 0.0f;
            _mm256_storeu_ps(lanes, c[r][q]);
            for (int l = 0; l < 8; l++) s = s + lanes[l];
            for (int64_t t = p; t < k; t++) s = s + bf16_to_float(x[r * k + t]) * bf16_to_float(w[q * k + t]);
            a->y[(i + r) * a->n + j + q] = finish(a, s, j + q);
        }
}

AVX2 static void tile_avx2_any(const struct fproblem *a, int64_t i, int R, int64_t j, int C) {
    switch (R) {
    case 2: R = 2; TILE_CASES(tile_avx2) break;
    default: R = 1; TILE_CASES(tile_avx2) break;
    }
}

AVX2 static void rows_avx2(const struct fproblem *a, int64_t n0, int64_t n1) {
    for (int64_t i0 = 0; i0 < a->m; i0 += 64)
        for (int64_t j = n0; j < n1; j += 4)
            for (int64_t i = i0; i < a->m && i < i0 + 64; i += 2)
                tile_avx2_any(a, i, a->m - i < 2 ? 1 : 2, j, n1 - j < 4 ? (int)(n1 - j) : 4);
}
#endif

/* Which path runs: 3 = AVX-512 BF16, 2 = AVX2, 1 = plain C; capped as the int8 GEMM's path is
   (PDMIX_S8GEMM_ISA), and AVX-512 BF16 only where the int8 GEMM runs AVX-512 too. */
int pdmix_bf16gemm_isa(void) {
    static int isa = 0;
    if (!isa) {
        int chosen = pdmix_s8gemm_isa() >= 2 ? 2 : 1;
#ifdef PDMIX_X86
        if (pdmix_s8gemm_isa() == 3 && __builtin_cpu_supports("avx512bf16")) chosen = 3;
        if (chosen == 2 && !__builtin_cpu_supports("fma")) chosen = 1;
#endif
        isa = chosen;
    }
    return isa;
}

void pdmix_bf16_linear(const uint16_t *x, int64_t m, const uint16_t *w, int64_t n, int64_t k, const uint16_t *bias,
                       uint16_t *y, int threads) {
    struct fproblem a = {x, w, bias, m, n, k, y};
    int isa = pdmix_bf16gemm_isa();
    int64_t parts = threads > 1 && n >= 64 * threads ? threads : 1;
#pragma omp parallel for num_threads(parts) schedule(static) if (parts > 1)
    for (int64_t t = 0; t < parts; t++) {
        int64_t n0 = (n * t / parts) & ~(int64_t)3, n1 = t == parts - 1 ? n : (n * (t + 1) / parts) & ~(int64_t)3;
#ifdef PDMIX_X86
        if (isa == 3) { rows_bf16(&a, n0, n1); continue; }
        if (isa == 2) { rows_avx2(&a, n0, n1); continue; }
#endif
        rows_plain(&a, n0, n1);
    }
}
