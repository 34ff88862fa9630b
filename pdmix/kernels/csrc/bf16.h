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

#endif
