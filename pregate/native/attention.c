/* The attention half of a decoder layer for a decode step in one native call (pregate/native.py).

   For M rows, each the next token of its own sequence (slot slots[r] of the KV cache, position pos[r]):
     out = h + o_proj(attention(rope(qkv_proj(RMSNorm(h))))),
   as pregate.moe.Attention computes it on CPU: the projections in bfloat16 (float32 sums, rounded),
   RoPE, the cache and attention in float32, the attention output rounded to bfloat16 for o_proj. The new
   keys and values are written into the cache at pos[r] and row r attends to positions [0, pos[r]].

   As in moe_mlp.c, each output depends only on its own row (and its own cache slot), in an order fixed
   by the inputs: the same bits alone or in any batch, at any thread count. */
#include "native.h"

/* RoPE of one head, x * cos + roll(x, D/2) * sin, each product and the sum rounded in float32 (the file
   is compiled with -ffp-contract=off, so no fused multiply-add changes that) */
static void rope(const float *x, const float *cos, const float *sin, int D, float *out) {
    int half = D / 2;
    for (int d = 0; d < D; d++) {
        float rolled = x[d < half ? d + half : d - half];
        float a = x[d] * cos[d], b = rolled * sin[d];
        out[d] = a + b;
    }
}

/* softmax(q k^T / sqrt(D)) v over the first L cached positions of one kv head (keys and values [L][D]) */
static void attend(const float *q, const float *keys, const float *values, int L, int D, float *scores,
                   float *out) {
    float scale = 1.0f / sqrtf((float)D), top = -INFINITY;
    for (int t = 0; t < L; t++) {
        const float *k = keys + (long)t * D;
        __m256 acc = _mm256_setzero_ps();
        int d = 0;
        for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
        float s = hsum(acc);
        for (; d < D; d++) s += q[d] * k[d];
        scores[t] = s * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    float total = 0.0f;
    for (int t = 0; t < L; t++) total += scores[t] = expf(scores[t] - top);
    for (int d = 0; d < D; d++) out[d] = 0.0f;
    for (int t = 0; t < L; t++) {
        const float *v = values + (long)t * D;
        float p = scores[t] / total;
        for (int d = 0; d < D; d++) out[d] += p * v[d];
    }
}

/* h, out: [M, H]; w: the layer's weights (native.h; the int8 bias is added to the rounded product).
   cos, sin [M, D] (float32); k_cache, v_cache [S, G, C, D] float32 (C = capacity). Returns 0, or -1 if
   scratch memory could not be allocated. */
int pg_attention(const bf16 *h, bf16 *out, int M, int H, const attention_weights *w, const float *cos,
                 const float *sin, float *k_cache, float *v_cache, int C, const int *slots, const int *pos) {
    const bf16 *norm_w = w->norm_w, *qkv_scale = w->qkv_scale, *b_qkv = w->b_qkv, *o_scale = w->o_scale;
    const void *w_qkv = w->w_qkv, *w_o = w->w_o;
    int int8 = w->int8, N = w->N, G = w->G, D = w->D;
    float eps = w->eps;
    int nt = omp_get_max_threads(), Q = (N + 2 * G) * D, longest = 0;
    for (int r = 0; r < M; r++) longest = pos[r] + 1 > longest ? pos[r] + 1 : longest;
    long floats = (long)M * H + (long)M * Q + (long)M * N * D + (long)M * H;
    float *xf = malloc(sizeof(float) * (floats + (long)nt * (8 * (M + 1) + longest + D)));
    const float **rows = malloc(sizeof(float *) * (2L * M + 1));
    if (!xf || !rows) {
        free(xf), free(rows);
        return -1;
    }
    float *qkv = xf + (long)M * H, *att = qkv + (long)M * Q, *proj = att + (long)M * N * D;
    float *scratch = proj + (long)M * H;
    const float **att_rows = rows + M;
    for (int r = 0; r < M; r++) {
        rms_norm_row(h + (long)r * H, norm_w, eps, H, xf + (long)r * H);
        rows[r] = xf + (long)r * H;
        att_rows[r] = att + (long)r * N * D;
    }
    long head_stride = (long)C * D, slot_stride = (long)G * head_stride;
    matrix qkv_w = {int8 ? NULL : w_qkv, int8 ? w_qkv : NULL, qkv_scale, H, NULL};
    matrix o_w = {int8 ? NULL : w_o, int8 ? w_o : NULL, o_scale, (long)N * D, NULL};
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), lo, hi;
        float *d = scratch + (long)t * (8 * (M + 1) + longest + D), *scores = d + 8 * (M + 1);
        float *tmp = scores + longest;
        /* 1: q|k|v, rounded to bfloat16 like the projection's output (then float32, as attention runs) */
        share(Q, 8, t, nt, &lo, &hi);
        rows_dot(qkv_w, H, rows, M, lo, hi, qkv, Q, d);
        for (int r = 0; r < M; r++) /* bfloat16: a bias joins the float32 sum before its one rounding */
            for (int n = lo; n < hi; n++) {
                float v = qkv[(long)r * Q + n], b = b_qkv ? from_bf16(b_qkv[n]) : 0.0f;
                qkv[(long)r * Q + n] = int8 ? round_bf16(round_bf16(v) + b) : round_bf16(v + b);
            }
#pragma omp barrier
        /* 2: RoPE on the new keys, and the new keys and values into the cache */
        share(M * G, 1, t, nt, &lo, &hi);
        for (int i = lo; i < hi; i++) {
            int r = i / G, g = i % G;
            const float *k = qkv + (long)r * Q + (long)(N + g) * D, *v = k + (long)G * D;
            long at = slots[r] * slot_stride + g * head_stride + (long)pos[r] * D;
            rope(k, cos + (long)r * D, sin + (long)r * D, D, k_cache + at);
            memcpy(v_cache + at, v, sizeof(float) * D);
        }
#pragma omp barrier
        /* 3: each query head over its kv head's cached positions */
        share(M * N, 1, t, nt, &lo, &hi);
        for (int i = lo; i < hi; i++) {
            int r = i / N, n = i % N, g = n / (N / G);
            rope(qkv + (long)r * Q + (long)n * D, cos + (long)r * D, sin + (long)r * D, D, tmp);
            long base = slots[r] * slot_stride + g * head_stride;
            float *o = att + (long)r * N * D + (long)n * D;
            attend(tmp, k_cache + base, v_cache + base, pos[r] + 1, D, scores, o);
            for (int e = 0; e < D; e++) o[e] = round_bf16(o[e]); /* o_proj's bfloat16 input */
        }
#pragma omp barrier
        /* 4: o_proj and the residual */
        share(H, 8, t, nt, &lo, &hi);
        rows_dot(o_w, N * D, att_rows, M, lo, hi, proj, H, d);
        for (int r = 0; r < M; r++)
            for (int c = lo; c < hi; c++) {
                long i = (long)r * H + c;
                out[i] = to_bf16(from_bf16(h[i]) + round_bf16(proj[i]));
            }
    }
    free(xf), free(rows);
    return 0;
}
