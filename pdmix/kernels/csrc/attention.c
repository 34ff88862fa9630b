/* Paged attention for decode rows, and the KV cache write, for pdmix/runtime/attention.py on CPUs.

   The cache (pdmix/runtime/kv_cache.py), fp32, per layer: keys [num_blocks, KV, D, block] (each
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

#if defined(__x86_64__) && defined(__GNUC__)
#define PDMIX_X86 1
#include <immintrin.h>
#endif

int pdmix_s8gemm_isa(void); /* s8gemm.c: 2 where the AVX2 paths run */

/* Scores of the group's G query heads q [G, D] against one block's keys k [D, block] (n tokens):
   s[j * stride + t] = sum_d q[j][d] * k[d][t], summed over d in order (the AVX2 form does the same
   multiplications and additions, 8 tokens a lane each, so both give the same bits). */
static void block_scores_plain(const float *q, int64_t G, int64_t D, const float *k, int64_t block, int64_t n,
                               float *s, int64_t stride) {
    for (int64_t j = 0; j < G; j++)
        for (int64_t t = 0; t < n; t++) {
            float acc = 0.0f;
            for (int64_t d = 0; d < D; d++) acc += q[j * D + d] * k[d * block + t];
            s[j * stride + t] = acc;
        }
}

/* o[j][d] = sum_t e[j * stride + t] * v[t][d] for d in [d0, D), over the tokens of the group's
   blocks in token order */
static void weighted_values_plain(const float *e, int64_t G, int64_t D, const float *vc, int64_t KV, int64_t g,
                                  int64_t block, const int64_t *table, int64_t len, int64_t stride, int64_t d0,
                                  float *o) {
    for (int64_t j = 0; j < G; j++)
        for (int64_t d = d0; d < D; d++) {
            float acc = 0.0f;
            for (int64_t b = 0; b * block < len; b++) {
                const float *v = vc + (table[b] * KV + g) * block * D + d; /* [block, D] */
                int64_t n = len - b * block < block ? len - b * block : block;
                for (int64_t u = 0; u < n; u++) acc += e[j * stride + b * block + u] * v[u * D];
            }
            o[j * D + d] = acc;
        }
}

#ifdef PDMIX_X86
#define LANES 8
__attribute__((target("avx2"))) static void block_scores_avx2(const float *q, int64_t G, int64_t D, const float *k,
                                                                int64_t block, int64_t n, float *s, int64_t stride) {
    int64_t t = 0;
    for (; t + LANES <= n; t += LANES)
        for (int64_t j0 = 0; j0 < G; j0 += 4) { /* up to 4 heads share each loaded key vector */
            int64_t gj = G - j0 < 4 ? G - j0 : 4;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t d = 0; d < D; d++) {
                __m256 kd = _mm256_loadu_ps(k + d * block + t);
                for (int64_t j = 0; j < gj; j++)
                    acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(_mm256_set1_ps(q[(j0 + j) * D + d]), kd));
            }
            for (int64_t j = 0; j < gj; j++) _mm256_storeu_ps(s + (j0 + j) * stride + t, acc[j]);
        }
    if (t < n) block_scores_plain(q, G, D, k + t, block, n - t, s + t, stride);
}

__attribute__((target("avx2"))) static void weighted_values_avx2(const float *e, int64_t G, int64_t D, const float *vc,
                                                                   int64_t KV, int64_t g, int64_t block,
                                                                   const int64_t *table, int64_t len, int64_t stride,
                                                                   float *o) {
    int64_t d0 = 0;
    for (; d0 + LANES <= D; d0 += LANES)
        for (int64_t j0 = 0; j0 < G; j0 += 4) { /* up to 4 heads share each loaded value vector */
            int64_t gj = G - j0 < 4 ? G - j0 : 4;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t b = 0; b * block < len; b++) {
                const float *v = vc + (table[b] * KV + g) * block * D + d0; /* [block, D] */
                int64_t n = len - b * block < block ? len - b * block : block;
                const float *eb = e + j0 * stride + b * block;
                for (int64_t u = 0; u < n; u++) {
                    __m256 vt = _mm256_loadu_ps(v + u * D);
                    for (int64_t j = 0; j < gj; j++)
                        acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(_mm256_set1_ps(eb[j * stride + u]), vt));
                }
            }
            for (int64_t j = 0; j < gj; j++) _mm256_storeu_ps(o + (j0 + j) * D + d0, acc[j]);
        }
    weighted_values_plain(e, G, D, vc, KV, g, block, table, len, stride, d0, o); /* dimensions past the last 8 */
}
#endif

/* One (sequence, kv head): its G query heads q [G, D] against the kv head's len tokens -> o [G, D].
   scores: G * stride floats, stride >= len. */
static void head_group(const float *q, int64_t G, int64_t D, int64_t KV, int64_t g, const float *kc,
                       const float *vc, int64_t block, const int64_t *table, int64_t len, float scale,
                       float *scores, int64_t stride, float *o) {
    int fast = 0;
#ifdef PDMIX_X86
    fast = pdmix_s8gemm_isa() >= 2;
#endif
    for (int64_t b = 0; b * block < len; b++) {
        const float *k = kc + (table[b] * KV + g) * D * block; /* [D, block] */
        int64_t n = len - b * block < block ? len - b * block : block;
#ifdef PDMIX_X86
        if (fast) {
            block_scores_avx2(q, G, D, k, block, n, scores + b * block, stride);
            continue;
        }
#endif
        block_scores_plain(q, G, D, k, block, n, scores + b * block, stride);
    }
    float *den = o + G * D; /* G floats after o */
    for (int64_t j = 0; j < G; j++) {
        float *s = scores + j * stride, top = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < len; t++) {
            s[t] *= scale;
            if (s[t] > top) top = s[t];
        }
        for (int64_t t = 0; t < len; t++) {
            s[t] = expf(s[t] - top);
            sum += s[t];
        }
        den[j] = sum;
    }
#ifdef PDMIX_X86
    if (fast) weighted_values_avx2(scores, G, D, vc, KV, g, block, table, len, stride, o);
    else
#endif
        weighted_values_plain(scores, G, D, vc, KV, g, block, table, len, stride, 0, o);
    for (int64_t j = 0; j < G; j++)
        for (int64_t d = 0; d < D; d++) o[j * D + d] /= den[j];
}

/* out [B, H, D] (bf16 if io_bf16, else fp32) from q [B, H, D] in the same dtype; tables [B, table_width]
   int64, lengths [B] int64 (tokens in the cache, the new one included). Returns 0, or -1 if out of memory. */
int pdmix_decode_attention(const void *q, int io_bf16, int64_t B, int64_t H, int64_t KV, int64_t D, const float *kc,
                           const float *vc, int64_t block, const int64_t *tables, int64_t table_width,
                           const int64_t *lengths, float scale, void *out, int threads) {
    int64_t G = H / KV, longest = 0, tasks = B * KV;
    for (int64_t b = 0; b < B; b++) longest = lengths[b] > longest ? lengths[b] : longest;
    int64_t stride = ((longest + block - 1) / block) * block, scratch = G * stride + 2 * G * D + G;
    int failed = 0, parallel = threads > 1 && tasks > 1 && longest * H * D * B >= (1 << 16);
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : failed) if (parallel)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t b = task / KV, g = task % KV;
        float *buf = (float *)malloc((size_t)scratch * sizeof(float));
        if (!buf) { failed = 1; continue; }
        float *qf = buf + G * stride, *o = qf + G * D; /* o: G * D outputs, then G denominators */
        int64_t first = (b * H + g * G) * D;
        for (int64_t p = 0; p < G * D; p++)
            qf[p] = io_bf16 ? bf16_to_float(((const uint16_t *)q)[first + p]) : ((const float *)q)[first + p];
        head_group(qf, G, D, KV, g, kc, vc, block, tables + b * table_width, lengths[b], scale, buf, stride, o);
        for (int64_t p = 0; p < G * D; p++) {
            if (io_bf16) ((uint16_t *)out)[first + p] = float_to_bf16(o[p]);
            else ((float *)out)[first + p] = o[p];
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* The step's new keys and values into the cache: k, v [T, KV, D] (bf16 if in_bf16, else fp32; row t at
   k + t * k_row, each row's [KV, D] contiguous), slots [T]. */
void pdmix_kv_write(const void *k, const void *v, int in_bf16, int64_t k_row, int64_t v_row, int64_t T, int64_t KV,
                    int64_t D, const int64_t *slots, float *kc, float *vc, int64_t block) {
    for (int64_t t = 0; t < T; t++) {
        int64_t blk = slots[t] / block, off = slots[t] % block;
        for (int64_t g = 0; g < KV; g++)
            for (int64_t d = 0; d < D; d++) {
                int64_t i = g * D + d;
                float kv = in_bf16 ? bf16_to_float(((const uint16_t *)k)[t * k_row + i]) : ((const float *)k)[t * k_row + i];
                float vv = in_bf16 ? bf16_to_float(((const uint16_t *)v)[t * v_row + i]) : ((const float *)v)[t * v_row + i];
                kc[((blk * KV + g) * D + d) * block + off] = kv;
                vc[((blk * KV + g) * block + off) * D + d] = vv;
            }
    }
}
