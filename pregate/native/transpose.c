/* A 2-byte matrix transposed, for the expert store's CPU loads (pregate.store): a loaded bfloat16 slice's
   down projection [H, R] becomes the [R, H] rows the model computes with. numpy's strided copy of 2-byte
   elements is slow (0.35 ms for [960, 720] here, half of such a slice's whole load), and the loader
   thread that spends it takes the cores from the compute. In 32 x 32 tiles, both sides stay in cache:
   0.09 ms. (numpy's copy of 4-byte elements is already that fast.)

   A plain loop on the calling thread (no OpenMP region: the loader must not start a second thread
   team on the cores the compute's team runs on). */
#include "native.h"

/* dst [cols, rows] = src [rows, cols] transposed */
void pg_transpose16(const uint16_t *src, uint16_t *dst, long rows, long cols) {
    enum { T = 32 };
    for (long r0 = 0; r0 < rows; r0 += T)
        for (long c0 = 0; c0 < cols; c0 += T) {
            long r1 = r0 + T < rows ? r0 + T : rows, c1 = c0 + T < cols ? c0 + T : cols;
            for (long c = c0; c < c1; c++)
                for (long r = r0; r < r1; r++) dst[c * rows + r] = src[r * cols + c];
        }
}
