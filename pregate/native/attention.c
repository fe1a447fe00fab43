/* The attention half of a decoder layer for a decode step in one native call (pregate/native.py).

   For M rows, each the next token of its own sequence (slot slots[r] of the KV cache, position pos[r]):
     out = h + o_proj(attention(rope(qkv_proj(RMSNorm(h))))),
   as pregate.moe.Attention computes it on CPU: the projections in bfloat16 (float32 sums, rounded),
   RoPE, the cache and attention in float32, the attention output rounded to bfloat16 for o_proj. The new
   keys and values are written into the cache at pos[r] and row r attends to positions [0, pos[r]].

   Attention runs over chunks of CHUNK cached positions, each chunk of a kv head read once for all its
   query heads (the threads share the chunks, so a long cache is read by both), then the chunks are
   merged in order per query head. As in moe_mlp.c, each output depends only on its own row (and its own
   cache slot), in an order fixed by the inputs: the same bits alone or in any batch, at any thread
   count. */
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

/* Positions per unit of attention work. A row's cache is cut into chunks of this many positions, the
   same cut whatever the batch or the thread count, so the sums below (per chunk, then over the chunks in
   order) give a row the same bits in any batch; threads share a long cache instead of one thread
   reading a whole head. */
#define CHUNK 32

/* e^x for eight x <= 0 (scores less their maximum): Cephes' expf, a degree-5 polynomial on
   [-ln2/2, ln2/2] times 2^n, within a few ulp of expf; x below -87 is taken as -87 (e^-87 ~ 1e-38 beside
   the maximum's 1). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* the lane sums of a[0..7], in lanes 0..7 */
static inline __m256 sum8(const __m256 *a) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* One chunk of one kv head for its R query heads qs[j] (D each, roped): with keys and values [n][D] of
   the chunk's n positions, part[j] = (max_t s, sum_t exp(s - max), sum_t exp(s - max) v_t [D]) for
   s = q_j . k_t / sqrt(D). Keys eight at a time (one sum per key, reduced together), values once for
   all R heads; every sum in an order fixed by n. sc: scratch for R * CHUNK. */
static void attend_chunk(const float *qs, int R, const float *keys, const float *values, int n, int D, float *sc,
                         float *part) {
    float scale = 1.0f / sqrtf((float)D);
    int D8 = D & ~7;
    for (int j = 0; j < R; j++) {
        const float *q = qs + (long)j * D;
        float *s = sc + j * CHUNK, top = -INFINITY, total = 0.0f;
        int t = 0;
        for (; t + 8 <= n; t += 8) {
            __m256 a[8];
            for (int b = 0; b < 8; b++) a[b] = _mm256_setzero_ps();
            for (int d = 0; d < D8; d += 8) {
                __m256 qv = _mm256_loadu_ps(q + d);
                for (int b = 0; b < 8; b++)
                    a[b] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + (long)(t + b) * D + d), a[b]);
            }
            _mm256_storeu_ps(s + t, sum8(a));
            for (int b = 0; b < 8; b++)
                for (int d = D8; d < D; d++) s[t + b] += q[d] * keys[(long)(t + b) * D + d];
        }
        for (; t < n; t++) s[t] = dot(q, keys + (long)t * D, D);
        for (t = 0; t < n; t++) {
            s[t] *= scale;
            top = s[t] > top ? s[t] : top;
        }
        for (t = 0; t + 8 <= n; t += 8)
            _mm256_storeu_ps(s + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(top))));
        for (; t < n; t++) s[t] = expf(s[t] - top);
        for (t = 0; t < n; t++) total += s[t];
        float *pj = part + (long)j * (D + 2);
        pj[0] = top, pj[1] = total;
        for (int d = 0; d < D; d++) pj[2 + d] = 0.0f;
    }
    for (int t = 0; t < n; t++) {
        const float *v = values + (long)t * D;
        for (int j = 0; j < R; j++) {
            float *acc = part + (long)j * (D + 2) + 2, e = sc[j * CHUNK + t];
            __m256 ev = _mm256_set1_ps(e);
            int d = 0;
            for (; d + 8 <= D; d += 8)
                _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(ev, _mm256_loadu_ps(v + d), _mm256_loadu_ps(acc + d)));
            for (; d < D; d++) acc[d] += e * v[d];
        }
    }
}

/* softmax(q k^T / sqrt(D)) v of one query head from its chunks' parts (stride `step` floats apart), merged
   in order: out = sum_c exp(max_c - max) acc_c / sum_c exp(max_c - max) total_c. */
static void merge_chunks(const float *part, long step, int chunks, int D, float *out) {
    float top = -INFINITY, total = 0.0f;
    for (int c = 0; c < chunks; c++) top = part[c * step] > top ? part[c * step] : top;
    for (int d = 0; d < D; d++) out[d] = 0.0f;
    for (int c = 0; c < chunks; c++) {
        const float *pc = part + c * step;
        float f = expf(pc[0] - top);
        total += pc[1] * f;
        for (int d = 0; d < D; d++) out[d] += pc[2 + d] * f;
    }
    for (int d = 0; d < D; d++) out[d] /= total;
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
    int nt = omp_get_max_threads(), Q = (N + 2 * G) * D, R = N / G;
    int *first = malloc(sizeof(int) * (M + 1)); /* row r's units: [first[r], first[r + 1]), by (kv head, chunk) */
    if (!first) return -1;
    first[0] = 0;
    for (int r = 0; r < M; r++) first[r + 1] = first[r] + G * ((pos[r] + CHUNK) / CHUNK);
    int units = first[M];
    long part_step = (long)R * (D + 2); /* one unit's parts: R query heads */
    long floats = (long)M * H + (long)M * Q + 2L * M * N * D + (long)M * H + units * part_step;
    long per_thread = dot_scratch(M, H > N * D ? H : N * D);
    float *xf = malloc(sizeof(float) * (floats + (long)nt * (per_thread + R * CHUNK)));
    const float **rows = malloc(sizeof(float *) * (2L * M + 1));
    if (!xf || !rows) {
        free(xf), free(rows), free(first);
        return -1;
    }
    float *qkv = xf + (long)M * H, *att = qkv + (long)M * Q, *qr = att + (long)M * N * D;
    float *proj = qr + (long)M * N * D, *parts = proj + (long)M * H, *scratch = parts + units * part_step;
    const float **att_rows = rows + M;
    for (int r = 0; r < M; r++) {
        rms_norm_row(h + (long)r * H, norm_w, eps, H, xf + (long)r * H);
        rows[r] = xf + (long)r * H;
        att_rows[r] = att + (long)r * N * D;
    }
    long head_stride = (long)C * D, slot_stride = (long)G * head_stride;
    matrix qkv_w = layer_matrix(w_qkv, int8, qkv_scale, H, w->blocked);
    matrix o_w = layer_matrix(w_o, int8, o_scale, (long)N * D, w->blocked);
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), lo, hi;
        float *d = scratch + (long)t * (per_thread + R * CHUNK), *sc = d + per_thread;
        /* 1: q|k|v, rounded to bfloat16 like the projection's output (then float32, as attention runs) */
        share(Q, 8, t, nt, &lo, &hi);
        rows_dot(qkv_w, H, rows, M, lo, hi, qkv, Q, d);
        for (int r = 0; r < M; r++) /* bfloat16: a bias joins the float32 sum before its one rounding */
            for (int n = lo; n < hi; n++) {
                float v = qkv[(long)r * Q + n], b = b_qkv ? from_bf16(b_qkv[n]) : 0.0f;
                qkv[(long)r * Q + n] = int8 ? round_bf16(round_bf16(v) + b) : round_bf16(v + b);
            }
#pragma omp barrier
        /* 2: RoPE on the new keys and the queries, and the new keys and values into the cache */
        share(M * G, 1, t, nt, &lo, &hi);
        for (int i = lo; i < hi; i++) {
            int r = i / G, g = i % G;
            const float *k = qkv + (long)r * Q + (long)(N + g) * D, *v = k + (long)G * D;
            long at = slots[r] * slot_stride + g * head_stride + (long)pos[r] * D;
            rope(k, cos + (long)r * D, sin + (long)r * D, D, k_cache + at);
            memcpy(v_cache + at, v, sizeof(float) * D);
            for (int n = g * R; n < (g + 1) * R; n++)
                rope(qkv + (long)r * Q + (long)n * D, cos + (long)r * D, sin + (long)r * D, D,
                     qr + ((long)r * N + n) * D);
        }
#pragma omp barrier
        /* 3: each chunk of each kv head's cached positions, for that kv head's query heads */
        share(units, 1, t, nt, &lo, &hi);
        for (int u = lo; u < hi; u++) {
            int r = 0;
            while (u >= first[r + 1]) r++;
            int chunks = (first[r + 1] - first[r]) / G, g = (u - first[r]) / chunks, c = (u - first[r]) % chunks;
            int n = pos[r] + 1 - c * CHUNK < CHUNK ? pos[r] + 1 - c * CHUNK : CHUNK;
            long base = slots[r] * slot_stride + g * head_stride + (long)c * CHUNK * D;
            attend_chunk(qr + ((long)r * N + g * R) * D, R, k_cache + base, v_cache + base, n, D, sc,
                         parts + u * part_step);
        }
#pragma omp barrier
        /* 3b: each query head's chunks merged in order, rounded to bfloat16 for o_proj */
        share(M * N, 1, t, nt, &lo, &hi);
        for (int i = lo; i < hi; i++) {
            int r = i / N, n = i % N, g = n / R, chunks = (first[r + 1] - first[r]) / G;
            float *o = att + (long)r * N * D + (long)n * D;
            const float *p = parts + (first[r] + (long)g * chunks) * part_step + (long)(n % R) * (D + 2);
            merge_chunks(p, part_step, chunks, D, o);
            for (int e = 0; e < D; e++) o[e] = round_bf16(o[e]);
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
    free(xf), free(rows), free(first);
    return 0;
}
