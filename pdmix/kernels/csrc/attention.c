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

static inline float bf16_in(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bf16_out(float f) { /* c10::BFloat16's round to nearest even */
    uint32_t u;
    if (f != f) return 0x7fc0;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One (sequence, kv head): its G query heads against the kv head's tokens. scratch: len floats.
   Compiled twice (AVX2 and baseline, picked at load): the loops vectorize over tokens (scores) and
   over D (values), each lane summing in the same order, so both give the same bits. */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx2", "default")))
#endif
static void head_group(const float *q, int64_t G, int64_t D, int64_t KV, int64_t g, const float *kc,
                       const float *vc, int64_t block, const int64_t *table, int64_t len, float scale,
                       float *scores, float *o) {
    int64_t nblocks = (len + block - 1) / block;
    for (int64_t j = 0; j < G; j++) {
        const float *qh = q + j * D;
        float *oh = o + j * D;
        float top = -INFINITY;
        for (int64_t b = 0; b < nblocks; b++) {
            const float *k = kc + (table[b] * KV + g) * D * block; /* [D, block] */
            int64_t n = len - b * block < block ? len - b * block : block;
            float *s = scores + b * block;
            for (int64_t t = 0; t < n; t++) s[t] = 0.0f;
            for (int64_t d = 0; d < D; d++) {
                float qd = qh[d];
                const float *kd = k + d * block;
                for (int64_t t = 0; t < n; t++) s[t] += qd * kd[t];
            }
            for (int64_t t = 0; t < n; t++) {
                s[t] *= scale;
                if (s[t] > top) top = s[t];
            }
        }
        float den = 0.0f;
        for (int64_t d = 0; d < D; d++) oh[d] = 0.0f;
        for (int64_t b = 0; b < nblocks; b++) {
            const float *v = vc + (table[b] * KV + g) * block * D; /* [block, D] */
            int64_t n = len - b * block < block ? len - b * block : block;
            for (int64_t t = 0; t < n; t++) {
                float e = expf(scores[b * block + t] - top);
                den += e;
                const float *vt = v + t * D;
                for (int64_t d = 0; d < D; d++) oh[d] += e * vt[d];
            }
        }
        for (int64_t d = 0; d < D; d++) oh[d] /= den;
    }
}

/* out [B, H, D] (bf16 if io_bf16, else fp32) from q [B, H, D] in the same dtype; tables [B, table_width]
   int64, lengths [B] int64 (tokens in the cache, the new one included). Returns 0, or -1 if out of memory. */
int pdmix_decode_attention(const void *q, int io_bf16, int64_t B, int64_t H, int64_t KV, int64_t D, const float *kc,
                           const float *vc, int64_t block, const int64_t *tables, int64_t table_width,
                           const int64_t *lengths, float scale, void *out, int threads) {
    int64_t G = H / KV, longest = 0, tasks = B * KV;
    for (int64_t b = 0; b < B; b++) longest = lengths[b] > longest ? lengths[b] : longest;
    int64_t scratch = ((longest + block - 1) / block) * block + 2 * G * D;
    int failed = 0, parallel = threads > 1 && tasks > 1 && longest * H * D * B >= (1 << 16);
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : failed) if (parallel)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t b = task / KV, g = task % KV;
        float *buf = (float *)malloc((size_t)scratch * sizeof(float));
        if (!buf) { failed = 1; continue; }
        float *qf = buf + scratch - 2 * G * D, *o = qf + G * D;
        int64_t first = (b * H + g * G) * D;
        for (int64_t p = 0; p < G * D; p++)
            qf[p] = io_bf16 ? bf16_in(((const uint16_t *)q)[first + p]) : ((const float *)q)[first + p];
        head_group(qf, G, D, KV, g, kc, vc, block, tables + b * table_width, lengths[b], scale, buf, o);
        for (int64_t p = 0; p < G * D; p++) {
            if (io_bf16) ((uint16_t *)out)[first + p] = bf16_out(o[p]);
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
                float kv = in_bf16 ? bf16_in(((const uint16_t *)k)[t * k_row + i]) : ((const float *)k)[t * k_row + i];
                float vv = in_bf16 ? bf16_in(((const uint16_t *)v)[t * v_row + i]) : ((const float *)v)[t * v_row + i];
                kc[((blk * KV + g) * D + d) * block + off] = kv;
                vc[((blk * KV + g) * block + off) * D + d] = vv;
            }
    }
}
