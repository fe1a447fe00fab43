/* The pre-gating router's decode step in one native call (pregate/native_router.py loads it).

   For B rows, each the newest token ids[b] of its own sequence at position pos[b]: the embedding, every
   block (RMSNorm, q|k|v, RoPE, the new key and value into the row's own cache, attention over positions
   [0, pos[b]], out, residual; RMSNorm, SwiGLU, residual) and the final RMSNorm, as
   pregate.router.PreGatingRouter computes them in float32; the head stays in torch. With int8 weights
   (pregate.quantize.quantize_router) each product reads its input rounded to bfloat16 and rounds its
   output to bfloat16, as torch's weight-only int8 path does, and the embedding row is int8 times its
   float32 scale.

   As in the decoder's kernels, each output depends only on its own row and cache, summed in an order
   fixed by the inputs: the same bits alone or in any batch, at any thread count. */
#include "native.h"

/* One block's weights as pregate.native_router hands them over (a ctypes mirror of this struct). */
typedef struct {
    matrix qkv, out, gate, up, down;
    const float *attn_norm, *mlp_norm;
} router_block;

/* torch.nn.RMSNorm in float32: x * rsqrt(mean(x^2) + eps) * w */
static void rms_norm32(const float *x, const float *w, float eps, int D, float *out) {
    float r = 1.0f / sqrtf(dot(x, x, D) / (float)D + eps);
    for (int k = 0; k < D; k++) out[k] = x[k] * r * w[k];
}

/* y[b * ldy + c] = w row c . in[b] for rows c of [0, N) in this thread's share; int8 rounds the inputs
   (already in rin) and the outputs to bfloat16. */
static void product(matrix w, int int8, int K, const float *const *xs, int B, int N, int t, int nt, float *y,
                    long ldy, float *d) {
    int lo, hi;
    share(N, 8, t, nt, &lo, &hi);
    rows_dot(w, K, xs, B, lo, hi, y, ldy, d);
    if (int8)
        for (int b = 0; b < B; b++)
            for (int c = lo; c < hi; c++) y[(long)b * ldy + c] = round_bf16(y[(long)b * ldy + c]);
}

/* rows xs[b] (K floats) -> their bfloat16 roundings in r (int8 products read these), else xs itself */
static const float *const *inputs(int int8, float *const *xs, float *r, int B, int K, const float **ptrs) {
    for (int b = 0; b < B; b++) {
        if (int8) {
            for (int k = 0; k < K; k++) r[(long)b * K + k] = round_bf16(xs[b][k]);
            ptrs[b] = r + (long)b * K;
        } else {
            ptrs[b] = xs[b];
        }
    }
    return ptrs;
}

/* embed [V, D] float32 rows, or embed8 int8 rows (stride embed_stride) times embed_scale[id]; cos, sin
   [max_len, Dh] tables; keys[b * layers + l], values[...]: row b's layer-l cache [heads, capacity[b], Dh]
   (the caller has made room for pos[b]); out [B, D] the final normalised features. F: the SwiGLU width.
   Returns 0, or -1 if scratch memory could not be allocated. */
int pg_router_step(int B, int D, int layers, int heads, int F, float eps, int int8, const router_block *blocks,
                   const float *final_norm, const float *embed, const int8_t *embed8, const float *embed_scale,
                   long embed_stride, const long *ids, const int *pos, const float *cos, const float *sin,
                   float *const *keys, float *const *values, const long *capacity, float *out) {
    int Dh = D / heads, nt = omp_get_max_threads(), longest = 0, wide = F > 3 * D ? F : 3 * D;
    for (int b = 0; b < B; b++) longest = pos[b] + 1 > longest ? pos[b] + 1 : longest;
    long per_row = 3L * D + wide + F + wide; /* x, xn, att | q|k|v or gate | up | rounded inputs */
    long per_thread = dot_scratch(B, F > D ? F : D) + longest + 2 * Dh; /* products, scores, rotated q|k */
    float *mem = malloc(sizeof(float) * ((long)B * per_row + (long)nt * per_thread));
    float **rows = malloc(sizeof(float *) * 4L * B);
    const float **ptrs = malloc(sizeof(float *) * 2L * B);
    if (!mem || !rows || !ptrs) {
        free(mem), free(rows), free(ptrs);
        return -1;
    }
    float *x = mem, *xn = x + (long)B * D, *att = xn + (long)B * D, *qkv = att + (long)B * D;
    float *up = qkv + (long)B * wide, *rin = up + (long)B * F, *scratch = rin + (long)B * wide;
    float *gate = qkv; /* gate and q|k|v are never live at once */
    float **xn_rows = rows, **att_rows = rows + B, **act_rows = rows + 2 * B;
    for (int b = 0; b < B; b++) {
        for (int k = 0; k < D; k++)
            x[(long)b * D + k] = embed8 ? from_i8(embed8[ids[b] * embed_stride + k]) * embed_scale[ids[b]]
                                        : embed[ids[b] * (long)D + k];
        xn_rows[b] = xn + (long)b * D, att_rows[b] = att + (long)b * D, act_rows[b] = gate + (long)b * F;
    }
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), lo, hi;
        float *d = scratch + (long)t * per_thread, *scores = d + dot_scratch(B, F > D ? F : D);
        float *rq = scores + longest, *rk = rq + Dh;
        for (int l = 0; l < layers; l++) {
            const router_block *w = blocks + l;
#pragma omp single
            {
                for (int b = 0; b < B; b++) rms_norm32(x + (long)b * D, w->attn_norm, eps, D, xn + (long)b * D);
                inputs(int8, xn_rows, rin, B, D, ptrs);
            }
            product(w->qkv, int8, D, ptrs, B, 3 * D, t, nt, qkv, 3L * D, d);
#pragma omp barrier
            share(B * heads, 1, t, nt, &lo, &hi); /* RoPE, the cache and attention: (row, head) pairs */
            for (int u = lo; u < hi; u++) {
                int b = u / heads, hd = u % heads, p = pos[b], half = Dh / 2;
                const float *q = qkv + (long)b * 3 * D + hd * Dh, *k = q + D, *v = k + D;
                const float *c = cos + (long)p * Dh, *s = sin + (long)p * Dh;
                for (int e = 0; e < Dh; e++) { /* x * cos + rotate_half(x) * sin, rotate_half = (-x2, x1) */
                    float qr = e < half ? -q[e + half] : q[e - half], kr = e < half ? -k[e + half] : k[e - half];
                    float a = q[e] * c[e], a2 = qr * s[e], b2 = k[e] * c[e], b3 = kr * s[e];
                    rq[e] = a + a2, rk[e] = b2 + b3;
                }
                float *kc = keys[(long)b * layers + l] + (long)hd * capacity[b] * Dh;
                float *vc = values[(long)b * layers + l] + (long)hd * capacity[b] * Dh;
                memcpy(kc + (long)p * Dh, rk, sizeof(float) * Dh);
                memcpy(vc + (long)p * Dh, v, sizeof(float) * Dh);
                float scale = 1.0f / sqrtf((float)Dh), top = -INFINITY, total = 0.0f;
                for (int j = 0; j <= p; j++) {
                    scores[j] = dot(rq, kc + (long)j * Dh, Dh) * scale;
                    top = scores[j] > top ? scores[j] : top;
                }
                for (int j = 0; j <= p; j++) total += scores[j] = expf(scores[j] - top);
                float *y = att + (long)b * D + hd * Dh;
                for (int e = 0; e < Dh; e++) y[e] = 0.0f;
                for (int j = 0; j <= p; j++) {
                    const float *vj = vc + (long)j * Dh;
                    float pr = scores[j] / total;
                    for (int e = 0; e < Dh; e++) y[e] += pr * vj[e];
                }
            }
#pragma omp barrier
#pragma omp single
            inputs(int8, att_rows, rin, B, D, ptrs);
            share(D, 8, t, nt, &lo, &hi);
            product(w->out, int8, D, ptrs, B, D, t, nt, xn, D, d); /* xn is free until the next norm */
            for (int b = 0; b < B; b++)
                for (int c = lo; c < hi; c++) x[(long)b * D + c] += xn[(long)b * D + c];
#pragma omp barrier
#pragma omp single
            {
                for (int b = 0; b < B; b++) rms_norm32(x + (long)b * D, w->mlp_norm, eps, D, xn + (long)b * D);
                inputs(int8, xn_rows, rin, B, D, ptrs);
            }
            product(w->gate, int8, D, ptrs, B, F, t, nt, gate, F, d);
            product(w->up, int8, D, ptrs, B, F, t, nt, up, F, d);
            share(F, 8, t, nt, &lo, &hi); /* the same channels this thread's products wrote */
            for (int b = 0; b < B; b++)
                for (int c = lo; c < hi; c++) {
                    float g = gate[(long)b * F + c];
                    gate[(long)b * F + c] = g / (1.0f + expf(-g)) * up[(long)b * F + c];
                }
#pragma omp barrier
#pragma omp single
            inputs(int8, act_rows, rin, B, F, ptrs);
            share(D, 8, t, nt, &lo, &hi);
            product(w->down, int8, F, ptrs, B, D, t, nt, xn, D, d);
            for (int b = 0; b < B; b++)
                for (int c = lo; c < hi; c++) x[(long)b * D + c] += xn[(long)b * D + c];
#pragma omp barrier
        }
    }
    for (int b = 0; b < B; b++) rms_norm32(x + (long)b * D, final_norm, eps, D, out + (long)b * D);
    free(mem), free(rows), free(ptrs);
    return 0;
}
