/* Rotary position embedding in place, for pdmix/kernels/cpu_rotary.py: torch's bits, one call where
   pdmix/models/layers.py's apply_rotary runs seven ops.

   x [T, heads, D] (row t at x + t * stride elements, each row's heads contiguous), cos and sin [T, D], all
   bf16 or all fp32. With h = D / 2, each head's element i becomes
       x_i * cos_i - x_{i+h} * sin_i    for i < h,
       x_i * cos_i + x_{i-h} * sin_i    for i >= h,
   every product and the sum rounded to the dtype as torch's separate ops round them (bf16: each
   product of two bf16 is exact in fp32, then rounded to bf16; the sum of two bf16 in fp32, rounded
   once to fp32 and once to bf16, as torch adds bf16 tensors). */

#include <stdint.h>

#include "bf16.h"
#include "pdmix.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define PDMIX_X86 1
#include <immintrin.h>
#endif


static inline float round_to(int bf16, float v) {
    return bf16 ? bf16_to_float(float_to_bf16(v)) : v;
}

static void head_plain(void *x, int bf16, int64_t at, int64_t h, const void *cos, const void *sin, int64_t t_at) {
    for (int64_t i = 0; i < h; i++) {
        float a, b, c0, c1, s0, s1;
        if (bf16) {
            uint16_t *p = (uint16_t *)x + at;
            const uint16_t *c = (const uint16_t *)cos + t_at, *s = (const uint16_t *)sin + t_at;
            a = bf16_to_float(p[i]), b = bf16_to_float(p[i + h]);
            c0 = bf16_to_float(c[i]), c1 = bf16_to_float(c[i + h]), s0 = bf16_to_float(s[i]), s1 = bf16_to_float(s[i + h]);
        } else {
            float *p = (float *)x + at;
            const float *c = (const float *)cos + t_at, *s = (const float *)sin + t_at;
            a = p[i], b = p[i + h], c0 = c[i], c1 = c[i + h], s0 = s[i], s1 = s[i + h];
        }
        float lo = round_to(bf16, round_to(bf16, a * c0) + round_to(bf16, -b * s0));
        float hi = round_to(bf16, round_to(bf16, b * c1) + round_to(bf16, a * s1));
        if (bf16) {
            ((uint16_t *)x)[at + i] = float_to_bf16(lo);
            ((uint16_t *)x)[at + i + h] = float_to_bf16(hi);
        } else {
            ((float *)x)[at + i] = lo;
            ((float *)x)[at + i + h] = hi;
        }
    }
}

#ifdef PDMIX_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
/* bf16, h % 16 == 0: the same operations, 16 lanes at a time */
AVX512 static void head_bf16_avx512(uint16_t *p, int64_t h, const uint16_t *c, const uint16_t *s) {
    const __mmask16 all = 0xffff;
    for (int64_t i = 0; i < h; i += 16) {
        __m512 a = bf16x16_load(p + i, all), b = bf16x16_load(p + i + h, all);
        __m512 c0 = bf16x16_load(c + i, all), c1 = bf16x16_load(c + i + h, all);
        __m512 s0 = bf16x16_load(s + i, all), s1 = bf16x16_load(s + i + h, all);
#define R(v) _mm512_castsi512_ps(_mm512_slli_epi32(bf16x16_round(v), 16))
        __m512 nb = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(b), _mm512_set1_epi32((int)0x80000000)));
        __m512 lo = _mm512_add_ps(R(_mm512_mul_ps(a, c0)), R(_mm512_mul_ps(nb, s0)));
        __m512 hi = _mm512_add_ps(R(_mm512_mul_ps(b, c1)), R(_mm512_mul_ps(a, s1)));
#undef R
        _mm256_storeu_si256((__m256i *)(p + i), _mm512_cvtepi32_epi16(bf16x16_round(lo)));
        _mm256_storeu_si256((__m256i *)(p + i + h), _mm512_cvtepi32_epi16(bf16x16_round(hi)));
    }
}
#endif

void pdmix_rotary(void *x, int bf16, int64_t T, int64_t heads, int64_t D, int64_t stride, const void *cos,
                  const void *sin, int threads) {
    int64_t h = D / 2;
    int fast = 0;
#ifdef PDMIX_X86
    fast = bf16 && h % 16 == 0 && pdmix_s8gemm_isa() == 3;
#endif
    (void)fast;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && T * heads * D >= (1 << 16))
    for (int64_t t = 0; t < T; t++)
        for (int64_t g = 0; g < heads; g++) {
#ifdef PDMIX_X86
            if (fast) {
                head_bf16_avx512((uint16_t *)x + t * stride + g * D, h, (const uint16_t *)cos + t * D,
                                 (const uint16_t *)sin + t * D);
                continue;
            }
#endif
            head_plain(x, bf16, t * stride + g * D, h, cos, sin, t * D);
        }
}
