/* The MoE MLP of a decode step in one native call (pregate/native.py builds and loads this file).

   For rows x [M, H] (bfloat16), with an optional residual h [M, H]:
     out = h + (shared(x) + sum over each row's routed experts of weight * expert(x)),
   where an expert is down(act(gate x) * up x), rounded to bfloat16 after each op as the eager path
   (pregate.moe.MoEMLP.forward) rounds; every product accumulates in float32.

   Each output element is computed in an order that depends on nothing but its own inputs (not on M,
   not on the thread count), so a row gives the same bits alone or in any batch. Weights are read in
   the layouts the model holds, every product a dot product along rows: bfloat16 gate|up [2W, H] and
   down [H, W] (a routed expert's down is stored so by pregate.native.attach_native: the model's
   `w_down_t` is its transposed view), or pregate.quantize's int8 layouts (gate rows [0, W), up rows
   [U, U + W), every down [H, K], per-row scales). Threads split channels, then output columns. */
#include "native.h"

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* act(gate) * up for channels [j0, j1) of one gate|up matrix (gate rows [0, W), up rows [U, U + W)), for
   `rows` inputs xs[i] (float32 [H]), into a[i * lda + j] (bfloat16 values held as float32).
   d: scratch for dot_scratch(rows, H) floats. */
static void gate_up(matrix gu, int U, int H, const float *const *xs, int rows, int j0, int j1, float *a, int lda,
                    float *d) {
    const bf16 *xb = j0 < j1 ? bf16_inputs(gu, xs, rows, H, d) : NULL;
    for (int j = j0; j < j1; j += 4) {
        int n = j1 - j < 4 ? j1 - j : 4; /* channels in this call; a short call repeats its last one */
        long w[8];
        int last = gu.blocked && n < 4; /* a blocked matrix keeps its last channels' rows as rows, gate, up */
        for (int c = 0; c < 4; c++) {
            int jc = c < n ? c : n - 1;
            w[2 * c] = last ? 2 * jc : j + jc;
            w[2 * c + 1] = last ? 2 * jc + 1 : U + j + jc;
        }
        /* a blocked tile: channels j..j+3, gate and up rows by turns */
        dot8(last ? rows_after_tiles(gu, j / 4) : gu, w, j / 4, xs, xb, rows, H, last ? 0 : 4, d);
        for (int c = 0; c < n; c++)
            for (int i = 0; i < rows; i++) {
                float g = round_bf16(d[2 * c * rows + i]), u = round_bf16(d[(2 * c + 1) * rows + i]);
                a[(long)i * lda + j + c] = round_bf16(round_bf16(silu(g)) * u);
            }
    }
}

/* out, x, h: [M, H] (h NULL: no residual); norm set: the MLP's input is RMSNorm(x) with w's norm, as the
   layer's post-attention norm computes it. w (native.h), bfloat16: the shared gate|up s_gu [2S, H] (up
   rows from S), down s_down [H, S]; routed expert e: gate|up at gu + e * gu_step [2W, H] (up rows from
   W), down at dn + e * dn_step [H, W] with rows dn_stride apart; widths[e] = ups[e] = W. int8,
   pregate.quantize's layouts: the same with int8 rows and bfloat16 scales (s_gu_scale, s_down_scale,
   gu_scale + e * gu_scale_step, dn_scale + e * dn_scale_step), the shared up rows from s_up, expert e's
   from ups[e]. Widths there are padded, the padding rows zero (act(0) * 0 = 0). plan: the step's
   assignments (ignored when w->routed is 0). H % 8 == 0. Returns 0, or -1 if scratch memory could not
   be allocated. */
int pg_moe_mlp(const bf16 *x, const bf16 *h, bf16 *out, int M, int H, const mlp_weights *w, int norm,
               const routing_plan *plan) {
    const bf16 *norm_w = norm ? w->norm_w : NULL, *s_gu_scale = w->s_gu_scale, *s_down_scale = w->s_down_scale;
    const bf16 *gu_scale = w->gu_scale, *dn_scale = w->dn_scale;
    const void *s_gu = w->s_gu, *s_down = w->s_down, *gu = w->gu, *dn = w->dn;
    int int8 = w->int8, S = w->S, s_up = w->s_up, groups = w->routed ? plan->groups : 0;
    long gu_step = w->gu_step, gu_scale_step = w->gu_scale_step, dn_step = w->dn_step;
    long dn_scale_step = w->dn_scale_step, dn_stride = w->dn_stride;
    const int *widths = w->widths, *ups = w->ups, *experts = plan->experts, *starts = plan->starts;
    const int *counts = plan->counts, *rows_of = plan->rows_of;
    const bf16 *weights = plan->weights;
    float eps = w->eps;
    int assigned = 0, widest = 0;
    for (int g = 0; g < groups; g++) {
        assigned += counts[g];
        widest = widths[experts[g]] > widest ? widths[experts[g]] : widest;
    }
    int nt = omp_get_max_threads(), K = H > S ? H : S;
    K = K > widest ? K : widest;
    long floats = 2L * M * H + (long)M * S + (long)assigned * widest + (long)assigned * H;
    long per_thread = dot_scratch(M, K);
    float *xf = malloc(sizeof(float) * (floats + (long)nt * per_thread));
    const float **xs = malloc(sizeof(float *) * (2L * M + 2L * assigned + 1));
    int *by_row = malloc(sizeof(int) * ((long)assigned + M + 2)); /* assignments by row, in group order */
    if (!xf || !xs || !by_row) {
        free(xf), free(xs), free(by_row);
        return -1;
    }
    float *as = xf + (long)M * H, *ae = as + (long)M * S, *ye = ae + (long)assigned * widest;
    float *ys = ye + (long)assigned * H, *dots = ys + (long)M * H; /* dots: per_thread for each thread */
    /* each assignment's input, the shared activations, each assignment's activations */
    const float **xe = xs + M, **ax = xe + assigned, **axe = ax + M;
    for (int r = 0; r < M; r++) {
        if (norm_w) rms_norm_row(x + (long)r * H, norm_w, eps, H, xf + (long)r * H);
        else
            for (int k = 0; k < H; k++) xf[(long)r * H + k] = from_bf16(x[(long)r * H + k]);
    }
    for (int r = 0; r < M; r++) xs[r] = xf + (long)r * H, ax[r] = as + (long)r * S;
    for (int i = 0; i < assigned; i++) xe[i] = xf + (long)rows_of[i] * H, axe[i] = ae + (long)i * widest;
    int *row_start = by_row + assigned, n = 0;
    for (int r = 0; r < M; r++) {
        row_start[r] = n;
        for (int i = 0; i < assigned; i++)
            if (rows_of[i] == r) by_row[n++] = i;
    }
    row_start[M] = n;
    int blocked = w->blocked;
    matrix shared_gu = layer_matrix(s_gu, int8, s_gu_scale, H, blocked);
    matrix shared_down = layer_matrix(s_down, int8, s_down_scale, S, blocked);
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), lo, hi;
        float *d = dots + (long)t * per_thread;
        /* 1: act(gate) * up, each matrix's channels split among the threads */
        share(S, 4, t, nt, &lo, &hi);
        gate_up(shared_gu, s_up, H, xs, M, lo, hi, as, S, d);
        for (int g = 0; g < groups; g++) {
            int e = experts[g];
            matrix m = int8 ? layer_matrix((const int8_t *)gu + e * gu_step, 1, gu_scale + e * gu_scale_step, H, 0)
                            : layer_matrix((const bf16 *)gu + e * gu_step, 0, NULL, H, blocked);
            share(widths[e], 4, t, nt, &lo, &hi);
            gate_up(m, ups[e], H, xe + starts[g], counts[g], lo, hi, ae + (long)starts[g] * widest, widest, d);
        }
#pragma omp barrier
        /* 2: down projections and the sums, each thread on its own output columns [lo, hi) */
        share(H, 8, t, nt, &lo, &hi);
        for (int g = 0; g < groups; g++) {
            int e = experts[g];
            float *y = ye + (long)starts[g] * H;
            matrix m = int8 ? layer_matrix((const int8_t *)dn + e * dn_step, 1, dn_scale + e * dn_scale_step,
                                           dn_stride, 0)
                            : layer_matrix((const bf16 *)dn + e * dn_step, 0, NULL, blocked ? widths[e] : dn_stride,
                                           blocked); /* blocked: tiles of its [H, W] alone */
            rows_dot(m, widths[e], axe + starts[g], counts[g], lo, hi, y, H, d);
        }
        if (S) rows_dot(shared_down, S, ax, M, lo, hi, ys, H, d);
        for (int r = 0; r < M; r++)
            for (int c = lo; c < hi; c++) {
                long o = (long)r * H + c;
                float v = S ? round_bf16(ys[o]) : 0.0f; /* the shared expert's bfloat16 output */
                for (int k = row_start[r]; k < row_start[r + 1]; k++) {
                    int i = by_row[k];
                    float y = round_bf16(ye[(long)i * H + c]);
                    if (weights) y = round_bf16(y * from_bf16(weights[i]));
                    v += y; /* torch's index_add sums in float32 and rounds once */
                }
                v = round_bf16(v);
                out[o] = h ? to_bf16(from_bf16(h[o]) + v) : to_bf16(v);
            }
    }
    free(xf), free(xs), free(by_row);
    return 0;
}
