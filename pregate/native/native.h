/* What the native kernels share (pregate/native.py compiles every .c file here into one library):
   bfloat16 conversions with torch's rounding, dot-product tiles whose sums do not depend on the tile,
   RMSNorm as the eager path computes it, and how threads split work. */
#ifndef PREGATE_NATIVE_H
#define PREGATE_NATIVE_H
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

static inline float from_bf16(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (bf16)((u >> 16) | 64); /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (bf16)(u >> 16);
}

static inline float round_bf16(float f) { return from_bf16(to_bf16(f)); }

static inline __m256 load8(const bf16 *p) { /* 8 bfloat16 -> 8 float32 */
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* a . b over K float32s: one accumulator fed 8 terms at a time, summed across lanes, then the tail */
static inline float dot(const float *a, const float *b, int K) {
    __m256 acc = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    float s = hsum(acc);
    for (; k < K; k++) s += a[k] * b[k];
    return s;
}

static inline __m256 load8_i8(const int8_t *p) { /* 8 int8 -> 8 float32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline float from_i8(int8_t v) { return (float)v; }

static inline float from_f32(float v) { return v; }

/* A weight matrix as the kernels read it: rows of `stride` elements, bfloat16 (w16), float32 (w32, the
   router's) or int8 (w8, each row scaled by scale[row], torch's weight-only int8: the sum times the
   scale; the caller rounds). blocked (bfloat16 only): w16 holds tiles of the eight rows one dot8 call
   reads, `stride` elements a tile (CHUNK says how; pregate.native_layout), so a call streams one run
   of memory instead of eight rows at once: on an AVX2-only EPYC eight rows at once read a third
   slower. */
typedef struct {
    const bf16 *w16;
    const int8_t *w8;
    const bf16 *scale;
    long stride;
    const float *w32;
    int blocked;
} matrix;

/* The matrix of a layer's weights w (int8 with its scales, else bfloat16) with rows of `row` elements,
   in tiles (blocked) or rows. */
static inline matrix layer_matrix(const void *w, int int8, const bf16 *scale, long row, int blocked) {
    blocked = blocked && !int8;
    matrix m = {int8 ? NULL : w, int8 ? w : NULL, scale, blocked ? 8 * row : row, NULL, blocked};
    return m;
}

/* One decoder layer's attention as pregate.native hands it over (a ctypes mirror of it there): the input
   norm, q|k|v [(N + 2G) D, H] (q heads, then k, then v) with its bias or NULL, o [H, N D]; bfloat16, or
   with int8 set int8 rows with bfloat16 scales (pregate.quantize). N query heads, G kv heads of width D.
   blocked: the bfloat16 matrices in tiles of 8 rows (matrix.blocked). */
typedef struct {
    const bf16 *norm_w;
    float eps;
    int int8;
    const void *w_qkv;
    const bf16 *qkv_scale, *b_qkv;
    int N, G, D;
    const void *w_o;
    const bf16 *o_scale;
    int blocked;
} attention_weights;

/* One decoder layer's MLP (the shared expert and the routed ones; see moe_mlp.c for the layouts), with
   the post-attention norm that precedes it. routed 0: no routed experts to run (the dense parent).
   blocked: the bfloat16 matrices in tiles (matrix.blocked; a gate|up tile holds 4 channels, each one's
   gate row and then its up row). */
typedef struct {
    const bf16 *norm_w;
    float eps;
    int int8, routed;
    const void *s_gu, *s_down;
    const bf16 *s_gu_scale, *s_down_scale;
    int S, s_up;
    const void *gu, *dn;
    const bf16 *gu_scale, *dn_scale;
    long gu_step, gu_scale_step, dn_step, dn_scale_step, dn_stride;
    const int *widths, *ups;
    int blocked;
} mlp_weights;

/* A step's expert assignments grouped by expert (pregate.native.PlanArgs): group g is expert experts[g]
   with the assignments [starts[g], starts[g] + counts[g]) of rows_of (each one's row) and weights
   (bfloat16; NULL: every weight is 1). */
typedef struct {
    int groups;
    const int *experts, *starts, *counts, *rows_of;
    const bf16 *weights;
} routing_plan;

int pg_attention(const bf16 *h, bf16 *out, int M, int H, const attention_weights *w, const float *cos,
                 const float *sin, float *k_cache, float *v_cache, int C, const int *slots, const int *pos);
int pg_moe_mlp(const bf16 *x, const bf16 *h, bf16 *out, int M, int H, const mlp_weights *w, int norm,
               const routing_plan *plan);

/* Dot products of NW rows w[i] (element type T, read by LOAD / ONE) with NX float32 vectors x[j] (K
   each) into out[i * NX + j]. Every output has one accumulator, fed 8 terms at a time in order, summed
   across lanes, then the last K % 8 terms added in order: the same bits whichever tile computes it.
   pf > 0: prefetch pf elements further on (what the next call reads, once per cache line of each row,
   since the hardware prefetcher alone reaches about half the memory's rate on rows this short). */
#define DOTS(NAME, T, LOAD, ONE, NW, NX)                                                                 \
    static void NAME##_##NW##x##NX(const T *const *w, const float *const *x, int K, long pf, float *out) { \
        __m256 acc[NW][NX];                                                                              \
        for (int i = 0; i < NW; i++)                                                                     \
            for (int j = 0; j < NX; j++) acc[i][j] = _mm256_setzero_ps();                                \
        int k = 0;                                                                                       \
        for (; k + 8 <= K; k += 8) {                                                                     \
            if (pf && !(k & (64 / sizeof(T) - 1))) /* once per cache line */                           \
                for (int i = 0; i < NW; i++) _mm_prefetch((const char *)(w[i] + k + pf), _MM_HINT_T0);   \
            for (int i = 0; i < NW; i++) {                                                               \
                __m256 wv = LOAD(w[i] + k);                                                              \
                for (int j = 0; j < NX; j++)                                                             \
                    acc[i][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[j] + k), acc[i][j]);               \
            }                                                                                            \
        }                                                                                                \
        for (int i = 0; i < NW; i++)                                                                     \
            for (int j = 0; j < NX; j++) {                                                               \
                float s = hsum(acc[i][j]);                                                               \
                for (int t = k; t < K; t++) s += ONE(w[i][t]) * x[j][t];                                 \
                out[i * NX + j] = s;                                                                     \
            }                                                                                            \
    }
#define TILES(NAME, T, LOAD, ONE)                                                                         \
    DOTS(NAME, T, LOAD, ONE, 8, 1)                                                                       \
    DOTS(NAME, T, LOAD, ONE, 4, 2)                                                                       \
    DOTS(NAME, T, LOAD, ONE, 2, 3)                                                                       \
    DOTS(NAME, T, LOAD, ONE, 2, 4)                                                                       \
    DOTS(NAME, T, LOAD, ONE, 1, 5)                                                                       \
    DOTS(NAME, T, LOAD, ONE, 1, 6)                                                                       \
    DOTS(NAME, T, LOAD, ONE, 1, 7)                                                                       \
    DOTS(NAME, T, LOAD, ONE, 1, 8)
TILES(dots16, bf16, load8, from_bf16)
TILES(dots8, int8_t, load8_i8, from_i8)
TILES(dots32, float, _mm256_loadu_ps, from_f32)

/* A blocked tile of 8 rows of K terms (pregate.native_layout): the rows' chunks of CHUNK terms, a chunk
   of each row in turn (term k < kc of row i at 8 (k - k % CHUNK) + i CHUNK + k % CHUNK, kc = K - K %
   CHUNK); then each row's terms past its last whole chunk, one row after another (term k >= kc of row i
   at 8 kc + i (K - kc) + k - kc). */
#define CHUNK 32 /* bfloat16 terms in a cache line */

/* DOTS on the 8 rows of the blocked bfloat16 tile t (matrix.blocked, CHUNK's layout) and NX * G
   vectors, the tile read once in its memory order: for each chunk, and then for the rows' terms past
   the last whole chunk, parts of NW rows by NX vectors (G groups of vectors) in turn (NAME_pass), each
   part's sums held in registers over the chunk and kept in `sums` between chunks. Each output's terms
   meet its accumulator in DOTS's order, so the same bits as DOTS on those rows. (Passes over the tile part
   by part were behind the rows' kernels, since each part takes one line of every 512 bytes; this is
   even with them or ahead, docs/serving.md.) pf > 0: prefetch every line of the
   tile's run pf elements ahead. */
#define BLOCKED_DOTS(NW, NX, G)                                                                           \
    /* terms k0..k0+n (n a multiple of 8) of each row i, at w + i * stride, into sums */                \
    static inline void blocked16_##NW##x##NX##x##G##_pass(__m256 sums[8][NX * G], const bf16 *w, int stride, \
                                                          const float *const *x, int k0, int n) {        \
        for (int p = 0; p < 8; p += NW)                                                                  \
            for (int h = 0; h < NX * G; h += NX) {                                                       \
                __m256 acc[NW][NX];                                                                      \
                for (int i = 0; i < NW; i++)                                                             \
                    for (int j = 0; j < NX; j++) acc[i][j] = sums[p + i][h + j];                         \
                for (int e = 0; e < n; e += 8)                                                           \
                    for (int i = 0; i < NW; i++) {                                                       \
                        __m256 wv = load8(w + (p + i) * stride + e);                                     \
                        for (int j = 0; j < NX; j++)                                                     \
                            acc[i][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[h + j] + k0 + e), acc[i][j]); \
                    }                                                                                    \
                for (int i = 0; i < NW; i++)                                                             \
                    for (int j = 0; j < NX; j++) sums[p + i][h + j] = acc[i][j];                         \
            }                                                                                            \
    }                                                                                                    \
    static void blocked16_##NW##x##NX##x##G(const bf16 *t, const float *const *x, int K, long pf, float *out) { \
        __m256 sums[8][NX * G];                                                                          \
        for (int i = 0; i < 8; i++)                                                                      \
            for (int j = 0; j < NX * G; j++) sums[i][j] = _mm256_setzero_ps();                           \
        int kc = K - K % CHUNK, r = K - kc, r8 = r - r % 8;                                              \
        for (int c = 0; c < kc; c += CHUNK) {                                                            \
            if (pf)                                                                                      \
                for (int l = 0; l < 8; l++) _mm_prefetch((const char *)(t + 8L * c + pf + l * CHUNK), _MM_HINT_T0); \
            blocked16_##NW##x##NX##x##G##_pass(sums, t + 8L * c, CHUNK, x, c, CHUNK);                   \
        }                                                                                                \
        const bf16 *rest = t + 8L * kc; /* row i's terms from kc at rest + i r */                        \
        blocked16_##NW##x##NX##x##G##_pass(sums, rest, r, x, kc, r8);                                    \
        for (int i = 0; i < 8; i++)                                                                      \
            for (int j = 0; j < NX * G; j++) {                                                           \
                float s = hsum(sums[i][j]);                                                              \
                for (int q = r8; q < r; q++) s += from_bf16(rest[i * r + q]) * x[j][kc + q];             \
                out[i * NX * G + j] = s;                                                                 \
            }                                                                                            \
    }
BLOCKED_DOTS(8, 1, 1)
BLOCKED_DOTS(4, 2, 1)
BLOCKED_DOTS(2, 3, 1)
BLOCKED_DOTS(2, 4, 1)
BLOCKED_DOTS(1, 5, 1)
BLOCKED_DOTS(2, 3, 2)
BLOCKED_DOTS(1, 7, 1)
BLOCKED_DOTS(2, 4, 2)

/* The blocked tile's product with n vectors (at most 8): the parts of DOT8's shapes, six and eight
   vectors in two groups of three and four */
static void blocked16_tile(const bf16 *t, const float *const *x, int n, int K, long pf, float *out) {
    switch (n) {
    case 1: blocked16_8x1x1(t, x, K, pf, out); return;
    case 2: blocked16_4x2x1(t, x, K, pf, out); return;
    case 3: blocked16_2x3x1(t, x, K, pf, out); return;
    case 4: blocked16_2x4x1(t, x, K, pf, out); return;
    case 5: blocked16_1x5x1(t, x, K, pf, out); return;
    case 6: blocked16_2x3x2(t, x, K, pf, out); return;
    case 7: blocked16_1x7x1(t, x, K, pf, out); return;
    default: blocked16_2x4x2(t, x, K, pf, out); return;
    }
}

/* Which tiles serve n vectors, for DOT8 and PAIR_DOT8 (DOT8 says why these shapes): each tile NAME_RxC
   gets its rows w + p, then the tiles' own arguments (...), then where its outputs go. */
#define TILE_SWITCH(NAME, n, ...)                                                                        \
    switch (n) {                                                                                         \
    case 1: NAME##_8x1(w, __VA_ARGS__, out); return;                                                     \
    case 2: for (int p = 0; p < 8; p += 4) NAME##_4x2(w + p, __VA_ARGS__, out + p * 2); return;          \
    case 3: for (int p = 0; p < 8; p += 2) NAME##_2x3(w + p, __VA_ARGS__, out + p * 3); return;          \
    case 4: for (int p = 0; p < 8; p += 2) NAME##_2x4(w + p, __VA_ARGS__, out + p * 4); return;          \
    case 5: for (int p = 0; p < 8; p++) NAME##_1x5(w + p, __VA_ARGS__, out + p * 5); return;             \
    case 6: for (int p = 0; p < 8; p++) NAME##_1x6(w + p, __VA_ARGS__, out + p * 6); return;             \
    case 7: for (int p = 0; p < 8; p++) NAME##_1x7(w + p, __VA_ARGS__, out + p * 7); return;             \
    default: for (int p = 0; p < 8; p++) NAME##_1x8(w + p, __VA_ARGS__, out + p * 8); return;            \
    }

/* Where the CPU has AVX512-BF16 (pregate.native then builds with it), the weights meet their inputs as
   bfloat16 pairs: vdpbf16ps makes 32 exact products a vector and adds them in float32, two to a lane.
   bfloat16 weights go in as they are; int8 weights are converted to bfloat16, exactly (8 significant
   bits hold any int8). The inputs hold bfloat16 values, so their bfloat16 copies (made once per
   product, bf16_inputs) are exact too. The same rule as DOTS: every output has one accumulator fed in
   order (the last partial vector masked to zero), then summed across lanes. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PAIR_DOTS 1
static inline __m512bh pair16(const bf16 *p, __mmask32 m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
static inline __m512bh pair8(const int8_t *p, __mmask32 m) {
    __m256i b = _mm256_maskz_loadu_epi8(m, p);
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    return _mm512_cvtne2ps_pbh(hi, lo); /* elements 0-15 from lo, 16-31 from hi */
}
#define PAIRS(NAME, T, LOAD, NW, NX)                                                                      \
    static void NAME##_##NW##x##NX(const T *const *w, const bf16 *x, long ldx, int K, long pf, float *out) { \
        __m512 acc[NW][NX];                                                                              \
        for (int i = 0; i < NW; i++)                                                                     \
            for (int j = 0; j < NX; j++) acc[i][j] = _mm512_setzero_ps();                                \
        for (int k = 0; k < K; k += 32) {                                                                \
            __mmask32 m = K - k >= 32 ? 0xffffffffu : (1u << (K - k)) - 1u;                              \
            if (pf && !(k & (64 / sizeof(T) - 1))) /* once per cache line */                           \
                for (int i = 0; i < NW; i++) _mm_prefetch((const char *)(w[i] + k + pf), _MM_HINT_T0);   \
            for (int i = 0; i < NW; i++) {                                                               \
                __m512bh wv = LOAD(w[i] + k, m);                                                         \
                for (int j = 0; j < NX; j++)                                                             \
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv,                                          \
                                                 (__m512bh)_mm512_maskz_loadu_epi16(m, x + j * ldx + k)); \
            }                                                                                            \
        }                                                                                                \
        for (int i = 0; i < NW; i++)                                                                     \
            for (int j = 0; j < NX; j++) out[i * NX + j] = _mm512_reduce_add_ps(acc[i][j]);              \
    }

/* The tiles of DOT8 below on bfloat16 pairs, the n vectors at x, ldx apart; NAME_dot8 as DOT8's */
#define PAIR_DOT8(NAME, T, LOAD)                                                                          \
    PAIRS(NAME, T, LOAD, 8, 1)                                                                           \
    PAIRS(NAME, T, LOAD, 4, 2)                                                                           \
    PAIRS(NAME, T, LOAD, 2, 3)                                                                           \
    PAIRS(NAME, T, LOAD, 2, 4)                                                                           \
    PAIRS(NAME, T, LOAD, 1, 5)                                                                           \
    PAIRS(NAME, T, LOAD, 1, 6)                                                                           \
    PAIRS(NAME, T, LOAD, 1, 7)                                                                           \
    PAIRS(NAME, T, LOAD, 1, 8)                                                                           \
    static void NAME##_tile(const T *const *w, const bf16 *x, long ldx, int n, int K, long pf, float *out) { \
        TILE_SWITCH(NAME, n, x, ldx, K, pf)                                                              \
    }                                                                                                    \
    static void NAME##_dot8(const T *const *w, const bf16 *xb, int M, int K, long pf, float *out) {      \
        float tile[64];                                                                                  \
        for (int m = 0; m < M; m += 8) {                                                                 \
            int n = M - m < 8 ? M - m : 8;                                                               \
            NAME##_tile(w, xb + (long)m * K, K, n, K, m ? 0 : pf, tile);                                 \
            for (int i = 0; i < 8; i++)                                                                  \
                for (int j = 0; j < n; j++) out[i * M + m + j] = tile[i * n + j];                        \
        }                                                                                                \
    }
PAIR_DOT8(pairs16, bf16, pair16)
PAIR_DOT8(pairs8, int8_t, pair8)

/* PAIRS on the 8 rows of the blocked bfloat16 tile t (matrix.blocked, CHUNK's layout) and NX vectors:
   a chunk of a row is one pair vector, so rows p..p+NW-1 take one vector of each chunk in turn, then
   their masked terms past the last whole chunk, the 8 rows in 8 / NW passes (accumulators NW x NX in
   registers). Each output's vectors meet its accumulator in PAIRS's order: the bits of PAIRS on those
   rows. The first pass touches the whole tile (its prefetch pf > 0 ahead takes every line), so the
   later ones read it from cache. */
#define PAIR_BLOCKED(NW, NX)                                                                              \
    static void blocked_pairs_##NW##x##NX(const bf16 *t, const bf16 *x, long ldx, int K, long pf, float *out) { \
        int kc = K - K % CHUNK, r = K - kc;                                                              \
        const bf16 *rest = t + 8L * kc; /* row i's terms from kc at rest + i r */                        \
        __mmask32 m = (__mmask32)((1ull << r) - 1);                                                      \
        for (int p = 0; p < 8; p += NW) {                                                                \
            __m512 acc[NW][NX];                                                                          \
            for (int i = 0; i < NW; i++)                                                                 \
                for (int j = 0; j < NX; j++) acc[i][j] = _mm512_setzero_ps();                            \
            for (int c = 0; c < kc; c += CHUNK) {                                                        \
                const bf16 *chunk = t + 8L * c;                                                          \
                if (pf && !p)                                                                            \
                    for (int l = 0; l < 8; l++) _mm_prefetch((const char *)(chunk + pf + l * CHUNK), _MM_HINT_T0); \
                for (int i = 0; i < NW; i++) {                                                           \
                    __m512bh wv = (__m512bh)_mm512_loadu_si512(chunk + (p + i) * CHUNK);                 \
                    for (int j = 0; j < NX; j++)                                                         \
                        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, (__m512bh)_mm512_loadu_si512(x + j * ldx + c)); \
                }                                                                                        \
            }                                                                                            \
            if (r)                                                                                       \
                for (int i = 0; i < NW; i++) {                                                           \
                    __m512bh wv = pair16(rest + (p + i) * r, m);                                         \
                    for (int j = 0; j < NX; j++)                                                         \
                        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, pair16(x + j * ldx + kc, m));        \
                }                                                                                        \
            for (int i = 0; i < NW; i++)                                                                 \
                for (int j = 0; j < NX; j++) out[(p + i) * NX + j] = _mm512_reduce_add_ps(acc[i][j]);    \
        }                                                                                                \
    }
PAIR_BLOCKED(8, 1)
PAIR_BLOCKED(8, 2)
PAIR_BLOCKED(8, 3)
PAIR_BLOCKED(4, 4)
PAIR_BLOCKED(4, 5)
PAIR_BLOCKED(4, 6)
PAIR_BLOCKED(2, 7)
PAIR_BLOCKED(2, 8)

/* The blocked tile's product with n pair vectors (at most 8), x and ldx as PAIRS's; NAME_dot8 as DOT8's */
static void blocked_pairs_tile(const bf16 *t, const bf16 *x, long ldx, int n, int K, long pf, float *out) {
    switch (n) {
    case 1: blocked_pairs_8x1(t, x, ldx, K, pf, out); return;
    case 2: blocked_pairs_8x2(t, x, ldx, K, pf, out); return;
    case 3: blocked_pairs_8x3(t, x, ldx, K, pf, out); return;
    case 4: blocked_pairs_4x4(t, x, ldx, K, pf, out); return;
    case 5: blocked_pairs_4x5(t, x, ldx, K, pf, out); return;
    case 6: blocked_pairs_4x6(t, x, ldx, K, pf, out); return;
    case 7: blocked_pairs_2x7(t, x, ldx, K, pf, out); return;
    default: blocked_pairs_2x8(t, x, ldx, K, pf, out); return;
    }
}
static void blocked_pairs_dot8(const bf16 *t, const bf16 *xb, int M, int K, long pf, float *out) {
    float tile[64];
    for (int m = 0; m < M; m += 8) {
        int n = M - m < 8 ? M - m : 8;
        blocked_pairs_tile(t, xb + (long)m * K, K, n, K, m ? 0 : pf, tile);
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < n; j++) out[i * M + m + j] = tile[i * n + j];
    }
}
#else
#define PAIR_DOTS 0
#endif

/* Float32 inputs that one tile of DOT8 reads for each weight: the L1 data cache (32 KB) */
#define L1_FLOATS 8192

/* How many of `left` vectors of K terms one tile of DOT8 takes: up to 8, or 4 where more than 4 would
   not fit L1_FLOATS (8 vectors of 1536 terms in one tile read their inputs from L2 for every weight; two tiles of
   4 were faster in a side-by-side script outside the repository). */
static inline int tile_vectors(int left, int K) {
    int n = left < 8 ? left : 8;
    return n > 4 && (long)n * K > L1_FLOATS ? 4 : n;
}

/* The tiling of dot8 for one element type: a tile as wide as the vectors, so no sum is computed twice:
   one vector, the eight rows stream at once (memory-bound; eight independent sums hide each one's
   latency); two, four rows by two; three or four, two rows by three or four; more, one row by all of
   them (up to eight), so each weight is converted once for every vector. More vectors go in tiles of
   tile_vectors, one after another (DOT8_LOOP; for a blocked tile too, whose tile is blocked16_tile). */
#define DOT8(NAME, T)                                                                                    \
    static void NAME##_tile(const T *const *w, const float *const *x, int n, int K, long pf, float *out) { \
        TILE_SWITCH(NAME, n, x, K, pf)                                                                   \
    }                                                                                                    \
    DOT8_LOOP(NAME, const T *const *)
#define DOT8_LOOP(NAME, W)                                                                               \
    static void NAME##_dot8(W w, const float *const *xs, int M, int K, long pf, float *out) {            \
        float tile[64];                                                                                  \
        for (int m = 0, n; m < M; m += n) {                                                              \
            n = tile_vectors(M - m, K);                                                                  \
            NAME##_tile(w, xs + m, n, K, m ? 0 : pf, tile);                                              \
            for (int i = 0; i < 8; i++)                                                                  \
                for (int j = 0; j < n; j++) out[i * M + m + j] = tile[i * n + j];                        \
        }                                                                                                \
    }
DOT8(dots16, bf16)
DOT8(dots8, int8_t)
DOT8(dots32, float)
DOT8_LOOP(blocked16, const bf16 *)

/* Floats of scratch that rows_dot and gate_up need (per thread) for `rows` inputs of up to K terms: the
   tiles' outputs, then where the pair tiles run the inputs' bfloat16 copies. */
static inline long dot_scratch(int rows, int K) {
    return 8L * (rows + 1) + (PAIR_DOTS ? ((long)rows * K + 1) / 2 : 0);
}

/* The bfloat16 copies of rows xs[i] (K floats holding bfloat16 values) that the pair tiles read, rows
   K apart in d's scratch past the tiles' outputs (dot_scratch); NULL where the pair tiles do not run on
   w (no AVX512-BF16, or float32 weights). */
static inline const bf16 *bf16_inputs(matrix w, const float *const *xs, int rows, int K, float *d) {
    if (!PAIR_DOTS || w.w32) return NULL;
    bf16 *b = (bf16 *)(d + 8L * (rows + 1));
    for (int i = 0; i < rows; i++)
        for (int k = 0; k < K; k++) {
            uint32_t u;
            memcpy(&u, xs[i] + k, 4);
            b[(long)i * K + k] = (bf16)(u >> 16); /* exact: the low half is zero */
        }
    return b;
}

/* How far ahead, in elements, a blocked product prefetches: a short way; prefetching a whole tile ahead
   read slower than none in a side-by-side script outside the repository. */
#define BLOCKED_PF 512

/* out[i * M + m] = row rows[i] of w . xs[m] (K terms) for eight rows and M vectors, int8 rows times
   their scales; blocked: the rows of tile `tile` (rows unused). xb: bf16_inputs(w, xs, ...), the pair
   tiles' copies of xs, or NULL. pf: prefetch distance in rows (0: none). */
static inline void dot8(matrix w, const long *rows, long tile, const float *const *xs, const bf16 *xb, int M,
                        int K, long pf, float *out) {
    if (w.blocked) {
#if PAIR_DOTS
        if (xb) blocked_pairs_dot8(w.w16 + tile * w.stride, xb, M, K, pf ? BLOCKED_PF : 0, out);
        else
#endif
            blocked16_dot8(w.w16 + tile * w.stride, xs, M, K, pf ? BLOCKED_PF : 0, out);
        return;
    }
    if (w.w8) {
        const int8_t *r[8];
        for (int i = 0; i < 8; i++) r[i] = w.w8 + rows[i] * w.stride;
#if PAIR_DOTS
        if (xb) pairs8_dot8(r, xb, M, K, pf * w.stride, out);
        else
#endif
            dots8_dot8(r, xs, M, K, pf * w.stride, out);
        for (int i = 0; i < 8; i++)
            for (int m = 0; m < M; m++) out[i * M + m] *= from_bf16(w.scale[rows[i]]);
    } else if (w.w32) {
        const float *r[8];
        for (int i = 0; i < 8; i++) r[i] = w.w32 + rows[i] * w.stride;
        dots32_dot8(r, xs, M, K, pf * w.stride, out);
    } else {
        const bf16 *r[8];
        for (int i = 0; i < 8; i++) r[i] = w.w16 + rows[i] * w.stride;
#if PAIR_DOTS
        if (xb) pairs16_dot8(r, xb, M, K, pf * w.stride, out);
        else
#endif
            dots16_dot8(r, xs, M, K, pf * w.stride, out);
    }
}

/* The rows that follow a blocked matrix's whole tiles, from tile `tile` on (pregate.native_layout keeps
   a last short tile's rows as rows), as a matrix of rows. */
static inline matrix rows_after_tiles(matrix w, long tile) {
    matrix m = w;
    m.w16 = w.w16 + tile * w.stride, m.stride = w.stride / 8, m.blocked = 0;
    return m;
}

/* y[i * ldy + c] = w row c . xs[i] for the rows c in [lo, hi) (in tiles of 8, lo a multiple of 8; a
   short tile repeats its last row), K terms each. d: scratch for dot_scratch(rows, K) floats
   (8 * rows for float32 weights). */
static inline void rows_dot(matrix w, int K, const float *const *xs, int rows, int lo, int hi, float *y, long ldy,
                     float *d) {
    const bf16 *xb = lo < hi ? bf16_inputs(w, xs, rows, K, d) : NULL;
    for (int c = lo; c < hi; c += 8) {
        int m = hi - c < 8 ? hi - c : 8;
        long r[8];
        if (w.blocked && m < 8) { /* the last rows, kept as rows */
            for (int q = 0; q < 8; q++) r[q] = q < m ? q : m - 1;
            dot8(rows_after_tiles(w, c / 8), r, 0, xs, xb, rows, K, 0, d);
        } else {
            for (int q = 0; q < 8; q++) r[q] = c + (q < m ? q : m - 1);
            dot8(w, r, c / 8, xs, xb, rows, K, 8, d);
        }
        for (int q = 0; q < m; q++)
            for (int i = 0; i < rows; i++) y[(long)i * ldy + c + q] = d[q * rows + i];
    }
}

/* [lo, hi) of n items for thread t of nt, in whole units of `unit` items */
static inline void share(int n, int unit, int t, int nt, int *lo, int *hi) {
    int units = (n + unit - 1) / unit, per = units / nt, extra = units % nt;
    int u0 = t * per + (t < extra ? t : extra), u1 = u0 + per + (t < extra);
    *lo = u0 * unit < n ? u0 * unit : n;
    *hi = u1 * unit < n ? u1 * unit : n;
}

/* RMSNorm of one row as pregate.moe.RMSNorm computes it: bfloat16(w * bfloat16(x * rsqrt(mean(x^2) + eps)))
   with the mean in float32; into out (float32 holding bfloat16 values). */
static inline void rms_norm_row(const bf16 *x, const bf16 *w, float eps, int H, float *out) {
    __m256 acc = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= H; k += 8) {
        __m256 v = load8(x + k);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (; k < H; k++) ss += from_bf16(x[k]) * from_bf16(x[k]);
    float r = 1.0f / sqrtf(ss / (float)H + eps);
    for (k = 0; k < H; k++) out[k] = round_bf16(from_bf16(w[k]) * round_bf16(from_bf16(x[k]) * r));
}

#endif
