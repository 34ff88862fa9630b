/* bf16 <-> fp32 as torch converts them (c10::BFloat16: round to nearest even, NaN -> 0x7fc0). */
#ifndef PDMIX_BF16_H
#define PDMIX_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    if (f != f) return 0x7fc0;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BF16_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))

/* bf16_to_float on the 16 lanes of m (the others 0) from h */
BF16_AVX512 static inline __m512 bf16x16_load(const uint16_t *h, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, h)), 16));
}

/* float_to_bf16 on 16 lanes: the bf16 bits in each lane's low half */
BF16_AVX512 static inline __m512i bf16x16_round(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_blend_epi32(nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x7fc0));
}
#endif

#endif
