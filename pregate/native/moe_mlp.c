/* The MoE MLP of a decode step in one native call (pregate/native.py builds and loads this file).

   For rows x [M, H] (bfloat16), with an optional residual h [M, H]:
     out = h + (shared(x) + sum over each row's routed experts of weight * expert(x)),
   where an expert is down(act(gate x) * up x), rounded to bfloat16 after each op as the eager path
   (pregate.moe.MoEMLP.forward) rounds; every product accumulates in float32.

   Each output element is computed in an order that depends on nothing but its own inputs (not on M,
   not on the thread count), so a row gives the same bits alone or in any batch. Weights are read in
   their checkpoint layouts: gate|up [2W, H] and the shared down [H, S] as dot products along rows, a
   routed down transposed [W, H] as rows scaled and added (axpy); threads split channels, then columns. */
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

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* [lo, hi) of n items for thread t of nt, in whole units of `unit` items */
static void share(int n, int unit, int t, int nt, int *lo, int *hi) {
    int units = (n + unit - 1) / unit, per = units / nt, extra = units % nt;
    int u0 = t * per + (t < extra ? t : extra), u1 = u0 + per + (t < extra);
    *lo = u0 * unit < n ? u0 * unit : n;
    *hi = u1 * unit < n ? u1 * unit : n;
}

/* act(gate) * up for channels [j0, j1) of one gate|up matrix (gate rows [0, W), up rows [W, 2W)), for
   `rows` inputs xs[i] (float32 [H]), into a[i * lda + j] (bfloat16 values held as float32).
   d: scratch for 8 * rows floats. */
static void gate_up(const bf16 *gu, int W, int H, const float *const *xs, int rows, int j0, int j1, float *a,
                    int lda, float *d) {
    for (int j = j0; j < j1; j += 4) {
        int n = j1 - j < 4 ? j1 - j : 4; /* channels in this call; a short call repeats its last one */
        const bf16 *w[8];
        for (int c = 0; c < 4; c++) {
            int jc = j + (c < n ? c : n - 1);
            w[2 * c] = gu + (long)jc * H;
            w[2 * c + 1] = gu + (long)(W + jc) * H;
        }
        dot8(w, xs, rows, H, 4L * H, d);
        for (int c = 0; c < n; c++)
            for (int i = 0; i < rows; i++) {
                float g = round_bf16(d[2 * c * rows + i]), u = round_bf16(d[(2 * c + 1) * rows + i]);
                a[(long)i * lda + j + c] = round_bf16(round_bf16(silu(g)) * u);
            }
    }
}

/* Columns [c, c + 8 CB) of y[i] = a[i] @ dt for R activation rows a[i] (stride lda) of one routed expert,
   down transposed dt [W, H]: the R x CB sums stay in registers while the rows of dt stream by, each
   column's sum taken over j in order (the same bits for any tile). */
#define AXPY(R, CB)                                                                                      \
    static void axpy_##R##x##CB(const bf16 *dt, int W, int H, const float *a, int lda, int c, float *y) { \
        __m256 acc[R][CB];                                                                               \
        for (int i = 0; i < R; i++)                                                                      \
            for (int v = 0; v < CB; v++) acc[i][v] = _mm256_setzero_ps();                                \
        for (int j = 0; j < W; j++) {                                                                    \
            const bf16 *row = dt + (long)j * H + c;                                                      \
            for (int v = 0; v < CB; v += 4) _mm_prefetch((const char *)(row + 8L * H + 8 * v), _MM_HINT_T0); \
            for (int v = 0; v < CB; v++) {                                                               \
                __m256 wv = load8(row + 8 * v);                                                          \
                for (int i = 0; i < R; i++)                                                              \
                    acc[i][v] = _mm256_fmadd_ps(wv, _mm256_set1_ps(a[(long)i * lda + j]), acc[i][v]);    \
            }                                                                                            \
        }                                                                                                \
        for (int i = 0; i < R; i++)                                                                      \
            for (int v = 0; v < CB; v++) _mm256_storeu_ps(y + (long)i * H + c + 8 * v, acc[i][v]);       \
    }
AXPY(1, 8)
AXPY(1, 1)
AXPY(2, 4)
AXPY(2, 1)
AXPY(4, 2)
AXPY(4, 1)
AXPY(8, 1)

/* y[i] (float32 [H], columns [lo, hi) only; lo, hi multiples of 8) = a[i] @ dt for the `rows`
   activations a[i] (stride lda) of one routed expert, down transposed dt [W, H]. */
static void down_axpy(const bf16 *dt, int W, int H, const float *a, int lda, int rows, int lo, int hi,
                      float *y) {
    for (int i = 0; i < rows;) {
        int left = rows - i, r = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        const float *ai = a + (long)i * lda;
        float *yi = y + (long)i * H;
        int cb = 8 / r; /* vectors per tile: r x cb sums in registers */
        int c = lo;
        for (; c + 8 * cb <= hi; c += 8 * cb) {
            if (r == 1) axpy_1x8(dt, W, H, ai, lda, c, yi);
            else if (r == 2) axpy_2x4(dt, W, H, ai, lda, c, yi);
            else if (r == 4) axpy_4x2(dt, W, H, ai, lda, c, yi);
            else axpy_8x1(dt, W, H, ai, lda, c, yi);
        }
        for (; c < hi; c += 8) {
            if (r == 1) axpy_1x1(dt, W, H, ai, lda, c, yi);
            else if (r == 2) axpy_2x1(dt, W, H, ai, lda, c, yi);
            else if (r == 4) axpy_4x1(dt, W, H, ai, lda, c, yi);
            else axpy_8x1(dt, W, H, ai, lda, c, yi);
        }
        i += r;
    }
}

/* out, x, h: [M, H] (h NULL: no residual). Shared expert: s_gu [2S, H], s_down [H, S] (S may be 0).
   Routed experts e: gate|up at gu + e * gu_step [2W, H], down transposed at dt + e * dt_step [W, H],
   widths[e] = W. Assignments, grouped by expert: group g is expert experts[g] with the assignments
   [starts[g], starts[g] + counts[g]) of `rows_of` (each one's row) and `weights` (bfloat16; NULL: every
   weight is 1). H % 8 == 0. Returns 0, or -1 if scratch memory could not be allocated. */
int pg_moe_mlp(const bf16 *x, const bf16 *h, bf16 *out, int M, int H, const bf16 *s_gu, const bf16 *s_down,
               int S, const bf16 *gu, long gu_step, const bf16 *dt, long dt_step, const int *widths, int groups,
               const int *experts, const int *starts, const int *counts, const int *rows_of,
               const bf16 *weights) {
    int assigned = 0, widest = 0;
    for (int g = 0; g < groups; g++) {
        assigned += counts[g];
        widest = widths[experts[g]] > widest ? widths[experts[g]] : widest;
    }
    int nt = omp_get_max_threads();
    long floats = (long)M * H + (long)M * S + (long)assigned * widest + (long)assigned * H;
    float *xf = malloc(sizeof(float) * (floats + (long)nt * 8 * (M + 1)));
    const float **xs = malloc(sizeof(float *) * (2L * M + assigned + 1));
    int *by_row = malloc(sizeof(int) * ((long)assigned + M + 2)); /* assignments by row, in group order */
    if (!xf || !xs || !by_row) {
        free(xf), free(xs), free(by_row);
        return -1;
    }
    float *as = xf + (long)M * H, *ae = as + (long)M * S, *ye = ae + (long)assigned * widest;
    float *dots = ye + (long)assigned * H;            /* 8 * (M + 1) per thread */
    const float **xe = xs + M, **ax = xe + assigned; /* each assignment's input; the shared activations */
    for (long i = 0; i < (long)M * H; i++) xf[i] = from_bf16(x[i]);
    for (int r = 0; r < M; r++) xs[r] = xf + (long)r * H, ax[r] = as + (long)r * S;
    for (int i = 0; i < assigned; i++) xe[i] = xf + (long)rows_of[i] * H;
    int *row_start = by_row + assigned, n = 0;
    for (int r = 0; r < M; r++) {
        row_start[r] = n;
        for (int i = 0; i < assigned; i++)
            if (rows_of[i] == r) by_row[n++] = i;
    }
    row_start[M] = n;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), lo, hi;
        float *d = dots + (long)t * 8 * (M + 1);
        /* 1: act(gate) * up, each matrix's channels split among the threads */
        share(S, 4, t, nt, &lo, &hi);
        gate_up(s_gu, S, H, xs, M, lo, hi, as, S, d);
        for (int g = 0; g < groups; g++) {
            int e = experts[g];
            share(widths[e], 4, t, nt, &lo, &hi);
            gate_up(gu + e * gu_step, widths[e], H, xe + starts[g], counts[g], lo, hi, ae + (long)starts[g] * widest,
                    widest, d);
        }
#pragma omp barrier
        /* 2: down projections and the sums, each thread on its own output columns [lo, hi) */
        share(H, 8, t, nt, &lo, &hi);
        for (int g = 0; g < groups; g++)
            down_axpy(dt + experts[g] * dt_step, widths[experts[g]], H, ae + (long)starts[g] * widest, widest,
                      counts[g], lo, hi, ye + (long)starts[g] * H);
        for (int c = lo; c < hi; c += 8) {
            const bf16 *w[8];
            for (int q = 0; q < 8; q++) w[q] = s_down + (long)(c + q) * S;
            if (S) dot8(w, ax, M, S, 8L * S, d);
            for (int r = 0; r < M; r++)
                for (int q = 0; q < 8; q++) {
                    float v = S ? round_bf16(d[q * M + r]) : 0.0f; /* the shared expert's bfloat16 output */
                    for (int k = row_start[r]; k < row_start[r + 1]; k++) {
                        int i = by_row[k];
                        float y = round_bf16(ye[(long)i * H + c + q]);
                        if (weights) y = round_bf16(y * from_bf16(weights[i]));
                        v += y; /* torch's index_add sums in float32 and rounds once */
                    }
                    v = round_bf16(v);
                    long o = (long)r * H + c + q;
                    out[o] = h ? to_bf16(from_bf16(h[o]) + v) : to_bf16(v);
                }
        }
    }
    free(xf), free(xs), free(by_row);
    return 0;
}
