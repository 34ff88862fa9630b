/* The runtime's RMSNorm in one call (pdmix/kernels/cpu_norm.py): per row of x [m, k], in fp32,
     inv = 1 / sqrt(sum(x^2) / k + eps),  y = weight * dtype(x * inv)  [then dtype(fp32(y) + bias)],
   bf16 or fp32 in and out, each step rounded as torch's separate ops round it (RMSNorm in
   pdmix/models/layers.py). Only the sum differs from torch's: its order is this file's own, 16 lanes
   (element p into lane p % 16, in order) then a fixed tree (lane l + lane l + 8, + 4, + 2, + 1), the
   same in the AVX-512 loop and the plain one, so the result depends on neither the CPU, nor the
   other rows, nor the thread count. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "pdmix.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define PDMIX_X86 1
#include <immintrin.h>
#endif


static inline float element(const void *x, int bf16, int64_t p) {
    return bf16 ? bf16_to_float(((const uint16_t *)x)[p]) : ((const float *)x)[p];
}

static float sum_squares_plain(const void *x, int bf16, int64_t k) {
    float lane[16] = {0};
    for (int64_t p = 0; p < k; p++) {
        float v = element(x, bf16, p);
        lane[p % 16] += v * v;
    }
    for (int s = 8; s >= 1; s /= 2)
        for (int l = 0; l < s; l++) lane[l] += lane[l + s];
    return lane[0];
}

/* y[p] for p in [p0, k) */
static void scale_plain(const void *x, int bf16, int64_t p0, int64_t k, float inv, const void *weight,
                        const float *bias, void *y) {
    for (int64_t p = p0; p < k; p++) {
        float v = element(x, bf16, p) * inv, out;
        if (bf16) {
            out = bf16_to_float(float_to_bf16(v)) * bf16_to_float(((const uint16_t *)weight)[p]);
            if (bias) out = bf16_to_float(float_to_bf16(out)) + bias[p];
            ((uint16_t *)y)[p] = float_to_bf16(out);
        } else {
            out = v * ((const float *)weight)[p];
            if (bias) out = out + bias[p];
            ((float *)y)[p] = out;
        }
    }
}

#ifdef PDMIX_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

AVX512 static inline __m512 load16(const void *x, int bf16, int64_t p, __mmask16 m) {
    return bf16 ? bf16x16_load((const uint16_t *)x + p, m) : _mm512_maskz_loadu_ps(m, (const float *)x + p);
}

/* a bf16 lane's value again as fp32 */
AVX512 static inline __m512 widen_bf16(__m512i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)); }

AVX512 static float sum_squares_avx512(const void *x, int bf16, int64_t k) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t p = 0; p < k; p += 16) { /* the tail's missing lanes add +0: no change */
        __mmask16 m = k - p >= 16 ? 0xffff : (__mmask16)((1u << (k - p)) - 1);
        __m512 v = load16(x, bf16, p, m);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    __m512 high = _mm512_castpd_ps(_mm512_shuffle_f64x2(_mm512_castps_pd(acc), _mm512_castps_pd(acc), 0xee));
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_castps512_ps256(high)); /* l + l + 8 */
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));        /* + 4 */
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                                        /* + 2 */
    __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));                                          /* + 1 */
    return _mm_cvtss_f32(s1);
}

/* y[p] for whole 16-element chunks; returns where the plain tail starts */
AVX512 static int64_t scale_avx512(const void *x, int bf16, int64_t k, float inv, const void *weight, const float *bias,
                                   void *y) {
    __m512 s = _mm512_set1_ps(inv);
    int64_t p = 0;
    for (; p + 16 <= k; p += 16) {
        __m512 v = _mm512_mul_ps(load16(x, bf16, p, 0xffff), s);
        if (bf16) {
            __m512 out = _mm512_mul_ps(widen_bf16(bf16x16_round(v)), load16(weight, 1, p, 0xffff));
            if (bias) out = _mm512_add_ps(widen_bf16(bf16x16_round(out)), _mm512_loadu_ps(bias + p));
            _mm256_storeu_si256((__m256i *)((uint16_t *)y + p), _mm512_cvtepi32_epi16(bf16x16_round(out)));
        } else {
            __m512 out = _mm512_mul_ps(v, _mm512_loadu_ps((const float *)weight + p));
            if (bias) out = _mm512_add_ps(out, _mm512_loadu_ps(bias + p));
            _mm512_storeu_ps((float *)y + p, out);
        }
    }
    return p;
}
#endif

/* y [m, k] = RMSNorm(x [m, k]) with weight [k] (x's dtype: bf16 if bf16, else fp32) and bias [k] (fp32, or NULL) */
void pdmix_rms_norm(const void *x, int bf16, int64_t m, int64_t k, const void *weight, const float *bias, float eps,
                    void *y, int threads) {
    size_t row = (size_t)k * (bf16 ? 2 : 4);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && m >= 4 * threads)
    for (int64_t i = 0; i < m; i++) {
        const char *xi = (const char *)x + i * row;
        char *yi = (char *)y + i * row;
        int64_t p = 0;
        float sum;
#ifdef PDMIX_X86
        int wide = pdmix_s8gemm_isa() == 3;
        sum = wide ? sum_squares_avx512(xi, bf16, k) : sum_squares_plain(xi, bf16, k);
#else
        sum = sum_squares_plain(xi, bf16, k);
#endif
        float inv = 1.0f / sqrtf(sum / (float)k + eps);
#ifdef PDMIX_X86
        if (wide) p = scale_avx512(xi, bf16, k, inv, weight, bias, yi);
#endif
        scale_plain(xi, bf16, p, k, inv, weight, bias, yi);
    }
}
