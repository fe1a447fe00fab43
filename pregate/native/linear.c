/* One linear map over a few rows in one native call (pregate/native.py): the LM head of an int8 model.

   y [M, N] = x [M, K] @ W.T with x bfloat16 and W bfloat16 rows, or int8 rows with bfloat16 scales
   (pregate.quantize: the sum times the row's scale), every sum in float32 and rounded once to bfloat16,
   as torch's products round theirs. Each output in an order fixed by its own inputs, as in the other
   kernels: the same bits for a row alone or in any batch, at any thread count. Threads split W's rows. */
#include "native.h"

/* w: N rows of `stride` elements (int8 0: bfloat16; 1: int8, with scale; blocked: bfloat16 tiles of such
   rows, matrix.blocked). Returns 0, or -1 if scratch memory could not be allocated. */
int pg_linear(const bf16 *x, bf16 *y, int M, int K, int N, int int8, const void *w, const bf16 *scale,
              long stride, int blocked) {
    int nt = omp_get_max_threads();
    long per_thread = dot_scratch(M, K);
    float *xf = malloc(sizeof(float) * ((long)M * K + (long)M * N + (long)nt * per_thread));
    const float **xs = malloc(sizeof(float *) * (M + 1));
    if (!xf || !xs) {
        free(xf), free(xs);
        return -1;
    }
    float *yf = xf + (long)M * K, *scratch = yf + (long)M * N;
    for (int r = 0; r < M; r++) {
        for (int k = 0; k < K; k++) xf[(long)r * K + k] = from_bf16(x[(long)r * K + k]);
        xs[r] = xf + (long)r * K;
    }
    matrix m = layer_matrix(w, int8, scale, stride, blocked);
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), lo, hi;
        share(N, 8, t, nt, &lo, &hi);
        rows_dot(m, K, xs, M, lo, hi, yf, N, scratch + (long)t * per_thread);
        for (int r = 0; r < M; r++)
            for (int c = lo; c < hi; c++) y[(long)r * N + c] = to_bf16(yf[(long)r * N + c]);
    }
    free(xf), free(xs);
    return 0;
}
