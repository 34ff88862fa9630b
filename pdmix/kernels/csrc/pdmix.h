/* The functions one of pdmix's C files calls in another (each file includes this, so its definitions
   are checked against these declarations). The library's whole interface is in pdmix/kernels/clib.py. */
#ifndef PDMIX_H
#define PDMIX_H

#include <stdint.h>

/* s8gemm.c: the int8 paths this CPU runs (3 AVX-512 VNNI, 2 AVX2, 1 plain), capped by PDMIX_S8GEMM_ISA */
int pdmix_s8gemm_isa(void);

/* s8gemm.c: a W8A8_MIX linear's tensors and numbers, and the linear on rows of x */
struct w8a8_linear;
int pdmix_w8a8_linear_run(const struct w8a8_linear *l, const void *x, int x_bf16, int64_t m, const uint8_t *dynamic,
                          int64_t n_dynamic, void *y, int y_bf16, int threads);

/* bf16gemm.c, norm.c, rotary.c */
void pdmix_bf16_linear(const uint16_t *x, int64_t m, const uint16_t *w, int64_t n, int64_t k, const uint16_t *bias,
                       uint16_t *y, int threads);
void pdmix_rms_norm(const void *x, int bf16, int64_t m, int64_t k, const void *weight, const float *bias, float eps,
                    void *y, int threads);
void pdmix_rotary(void *x, int bf16, int64_t T, int64_t heads, int64_t D, int64_t stride, const void *cos,
                  const void *sin, int threads);

/* attention.c */
void pdmix_kv_write(const void *k, const void *v, int in_bf16, int64_t k_row, int64_t v_row, int64_t T, int64_t KV,
                    int64_t D, const int64_t *slots, void *kc, void *vc, int cache_bf16, int64_t block);
int pdmix_decode_attention(const void *q, int io_bf16, int64_t B, int64_t H, int64_t KV, int64_t D, void *kc,
                           void *vc, int cache_bf16, int64_t block, const int64_t *tables, int64_t table_width,
                           const int64_t *lengths, float scale, void *out, int threads, const void *k_new,
                           const void *v_new, int64_t k_row, int64_t v_row, const int64_t *slots);

#endif
