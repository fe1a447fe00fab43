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

/* Dot products of NW bfloat16 rows w[i] with NX float32 vectors x[j] (K each) into out[i * NX + j].
   Every output has one accumulator, fed 8 terms at a time in order, summed across lanes, then the last
   K % 8 terms added in order: the same bits whichever tile computes it. pf > 0: prefetch the rows pf
   elements further on (what the next call reads); the hardware prefetcher alone reaches about half the
   memory's rate on rows this short. */
#define DOTS(NW, NX)                                                                                     \
    static void dots_##NW##x##NX(const bf16 *const *w, const float *const *x, int K, long pf, float *out) { \
        __m256 acc[NW][NX];                                                                              \
        for (int i = 0; i < NW; i++)                                                                     \
            for (int j = 0; j < NX; j++) acc[i][j] = _mm256_setzero_ps();                                \
        int k = 0;                                                                                       \
        for (; k + 8 <= K; k += 8) {                                                                     \
            if (pf && !(k & 31))                                                                         \
                for (int i = 0; i < NW; i++) _mm_prefetch((const char *)(w[i] + k + pf), _MM_HINT_T0);   \
            for (int i = 0; i < NW; i++) {                                                               \
                __m256 wv = load8(w[i] + k);                                                             \
                for (int j = 0; j < NX; j++)                                                             \
                    acc[i][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[j] + k), acc[i][j]);               \
            }                                                                                            \
        }                                                                                                \
        for (int i = 0; i < NW; i++)                                                                     \
            for (int j = 0; j < NX; j++) {                                                               \
                float s = hsum(acc[i][j]);                                                               \
                for (int t = k; t < K; t++) s += from_bf16(w[i][t]) * x[j][t];                           \
                out[i * NX + j] = s;                                                                     \
            }                                                                                            \
    }
DOTS(8, 1)
DOTS(2, 4)
DOTS(1, 8)

/* out[i * M + m] = w[i] . xs[m] for eight rows w and M vectors. One vector: the eight rows stream at
   once (memory-bound; eight independent sums hide each one's latency). Up to four: tiles of two rows by
   four vectors; more: one row by eight, so each weight is converted once for four or eight of them.
   A short tile repeats its last vector (the extra sums are dropped). */
static void dot8(const bf16 *const *w, const float *const *xs, int M, int K, long pf, float *out) {
    if (M == 1) {
        dots_8x1(w, xs, K, pf, out);
        return;
    }
    int width = M <= 4 ? 4 : 8, rows = M <= 4 ? 2 : 1;
    float tile[8];
    const float *x[8];
    for (int m = 0; m < M; m += width) {
        int n = M - m < width ? M - m : width;
        for (int j = 0; j < width; j++) x[j] = xs[m + (j < n ? j : n - 1)];
        for (int p = 0; p < 8; p += rows) {
            long f = m ? 0 : pf;
            if (rows == 2) dots_2x4(w + p, x, K, f, tile);
            else dots_1x8(w + p, x, K, f, tile);
            for (int i = 0; i < rows; i++)
                for (int j = 0; j < n; j++) out[(p + i) * M + m + j] = tile[i * width + j];
        }
    }
}

/* [lo, hi) of n items for thread t of nt, in whole units of `unit` items */
static void share(int n, int unit, int t, int nt, int *lo, int *hi) {
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
