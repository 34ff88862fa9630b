/* A decode step's attention half of a decoder layer in one call (pdmix/kernels/cpu_block.py): from the
   layer's input x [T, hidden] to its residual h and the MLP's input y, as pdmix/models/layers.py's
   DecoderLayer computes them,
       h = x + o_proj(attention(rotary(qk_norms(qkv_proj(input_layernorm(x)))))),   y = post_attention_layernorm(h),
   each step by the C function its separate call runs (norm.c, s8gemm.c or bf16gemm.c, rotary.c,
   attention.c with the step's cache write), so the bits are theirs; h rounded as torch adds two bf16
   tensors. bf16 models, one decode row per sequence. About twenty Python-level calls and torch ops a
   layer become one; with pdmix_decode_layers, the whole stack of layers one call. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "pdmix.h"

/* one linear of the block: W8A8_MIX (q8 set) or a rolled-back bf16 one (w, bias or null) */
struct block_linear {
    const struct w8a8_linear *q8;
    const uint16_t *w, *bias;
    int64_t n, k;
};

struct block_norm {
    const uint16_t *w;
    const float *bias; /* fp32, or null */
    float eps;
};

struct attention_block {
    struct block_norm in, post, q, k; /* q, k: the per-head norms of Qwen3, w null where there are none */
    struct block_linear qkv, o, gate_up; /* gate_up: neither q8 nor w set where the MLP's input is the output */
    int64_t hidden, H, KV, D;
};

/* what a step's rows need of its attention, the same in every layer */
struct decode_step {
    const uint16_t *cos, *sin; /* [T, D] */
    const int64_t *slots;      /* [T]: where each row's k and v go */
    const int64_t *tables;     /* [T, width] */
    int64_t width;
    const int64_t *lengths;    /* [T], the new row included */
    int64_t block;
    int cache_bf16;
    float scale;
};

static int run_linear(const struct block_linear *l, const uint16_t *x, int64_t m, int64_t n_dynamic, uint16_t *y,
                      int threads) {
    if (l->q8) return pdmix_w8a8_linear_run(l->q8, x, 1, m, 0, n_dynamic, y, 1, threads);
    pdmix_bf16_linear(x, m, l->w, l->n, l->k, l->bias, y, threads);
    return 0;
}

/* x, h [T, hidden] bf16, y [T, hidden] (or [T, gate_up.n]: the MLP's gate/up projection of it, where the block
   has one); kc, vc: this layer's cache; rows [0, n_dynamic) quantized per token. Returns 0, or -1 if out of
   memory. */
int pdmix_attention_block(const struct attention_block *b, const struct decode_step *s, const uint16_t *x,
                          int64_t T, int64_t n_dynamic, void *kc, void *vc, uint16_t *h, uint16_t *y, int threads) {
    int64_t hidden = b->hidden, D = b->D, width = (b->H + 2 * b->KV) * D, hd = b->H * D;
    uint16_t *xn = (uint16_t *)malloc((size_t)(T * hidden) * 2), *qkv = (uint16_t *)malloc((size_t)(T * width) * 2);
    uint16_t *q = (uint16_t *)malloc((size_t)(T * hd) * 2), *att = (uint16_t *)malloc((size_t)(T * hd) * 2);
    uint16_t *o = (uint16_t *)malloc((size_t)(T * hidden) * 2);
    int rc = -1;
    if (!xn || !qkv || !q || !att || !o) goto done;
    pdmix_rms_norm(x, 1, T, hidden, b->in.w, b->in.bias, b->in.eps, xn, threads);
    if (run_linear(&b->qkv, xn, T, n_dynamic, qkv, threads)) goto done;
    for (int64_t t = 0; b->q.w && t < T; t++) { /* each head's q and k rows normed in place */
        pdmix_rms_norm(qkv + t * width, 1, b->H, D, b->q.w, b->q.bias, b->q.eps, qkv + t * width, threads);
        pdmix_rms_norm(qkv + t * width + hd, 1, b->KV, D, b->k.w, b->k.bias, b->k.eps, qkv + t * width + hd, threads);
    }
    pdmix_rotary(qkv, 1, T, b->H + b->KV, D, width, s->cos, s->sin, threads); /* q and k, in place */
    for (int64_t t = 0; t < T; t++) memcpy(q + t * hd, qkv + t * width, (size_t)hd * 2);
    if (pdmix_decode_attention(q, 1, T, b->H, b->KV, D, kc, vc, s->cache_bf16, s->block, s->tables, s->width,
                               s->lengths, s->scale, att, threads, qkv + hd, qkv + hd + b->KV * D, width, width,
                               s->slots))
        goto done;
    if (run_linear(&b->o, att, T, n_dynamic, o, threads)) goto done;
    for (int64_t i = 0; i < T * hidden; i++) h[i] = float_to_bf16(bf16_to_float(x[i]) + bf16_to_float(o[i]));
    if (!b->gate_up.q8 && !b->gate_up.w) {
        pdmix_rms_norm(h, 1, T, hidden, b->post.w, b->post.bias, b->post.eps, y, threads);
    } else {
        pdmix_rms_norm(h, 1, T, hidden, b->post.w, b->post.bias, b->post.eps, xn, threads);
        if (run_linear(&b->gate_up, xn, T, n_dynamic, y, threads)) goto done;
    }
    rc = 0;
done:
    free(xn); free(qkv); free(q); free(att); free(o);
    return rc;
}

/* out [m, n] = residual + l(x), the sum rounded as torch adds two bf16 tensors: the MLP's down projection
   and the layer's residual. Returns 0, or -1 if out of memory. */
int pdmix_linear_residual(const struct block_linear *l, const uint16_t *x, int64_t m, int64_t n_dynamic,
                          const uint16_t *residual, uint16_t *out, int threads) {
    if (run_linear(l, x, m, n_dynamic, out, threads)) return -1;
    for (int64_t i = 0; i < m * l->n; i++) out[i] = float_to_bf16(bf16_to_float(residual[i]) + bf16_to_float(out[i]));
    return 0;
}

/* ---- A decode step's whole decoder stack in one call: each layer's attention half and gate/up
   (pdmix_attention_block), silu(gate) * up, and down with the residual (pdmix_linear_residual). */

struct decode_layer {
    const struct attention_block *attn; /* with gate_up */
    const struct block_linear *down;
    void *kc, *vc;                      /* the layer's cache */
};

/* act [T, n] = silu(gate) * up of gu [T, 2n] (gate, then up) as torch computes F.silu(gate) * up on
   bf16: silu by table (silu[h]: torch's bf16 silu of the bf16 with bits h, made by torch), the product
   of two bf16 exact in fp32 and rounded once to bf16 */
static void silu_mul(const uint16_t *gu, int64_t T, int64_t n, const uint16_t *silu, uint16_t *act) {
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *g = gu + t * 2 * n, *u = g + n;
        for (int64_t i = 0; i < n; i++) act[t * n + i] = float_to_bf16(bf16_to_float(silu[g[i]]) * bf16_to_float(u[i]));
    }
}

/* x [T, hidden] bf16, in place: the stack of L layers (each layer's hidden the same). Returns 0, or -1
   if out of memory. */
int pdmix_decode_layers(const struct decode_layer *layers, int64_t L, const struct decode_step *s,
                        const uint16_t *silu, uint16_t *x, int64_t T, int64_t n_dynamic, int threads) {
    int64_t hidden = L ? layers[0].attn->hidden : 0, wide = 0;
    for (int64_t l = 0; l < L; l++) wide = layers[l].attn->gate_up.n > wide ? layers[l].attn->gate_up.n : wide;
    uint16_t *h = (uint16_t *)malloc((size_t)(T * hidden) * 2), *gu = (uint16_t *)malloc((size_t)(T * wide) * 2);
    uint16_t *act = (uint16_t *)malloc((size_t)(T * wide / 2) * 2);
    int rc = -1;
    if (!h || !gu || !act) goto done;
    for (int64_t l = 0; l < L; l++) {
        const struct decode_layer *d = layers + l;
        if (pdmix_attention_block(d->attn, s, x, T, n_dynamic, d->kc, d->vc, h, gu, threads)) goto done;
        silu_mul(gu, T, d->attn->gate_up.n / 2, silu, act);
        if (pdmix_linear_residual(d->down, act, T, n_dynamic, h, x, threads)) goto done;
    }
    rc = 0;
done:
    free(h); free(gu); free(act);
    return rc;
}
