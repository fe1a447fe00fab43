/* Every decoder layer of a decode step in one native call (pregate/native.py): for each layer, the
   attention (attention.c) and then the MLP with its post-attention norm (moe_mlp.c), the rows staying in
   native memory between them. Two calls per layer from Python cost a few microseconds of argument
   passing each, 60 per step; this is one. */
#include "native.h"

/* h [M, H]: the decode rows entering layer 0; out [M, H]: leaving the last layer. attn[l], mlp[l]: layer
   l's weights; k_cache[l], v_cache[l]: its KV pool [S, G, C, D]; cos, sin, slots, pos: as pg_attention
   takes them; plan: the step's routing (every layer the same: pre-gating). Returns 0, or -1 if scratch
   memory could not be allocated. */
int pg_decode(const bf16 *h, bf16 *out, int M, int H, int layers, const attention_weights *attn,
              const mlp_weights *mlp, const float *cos, const float *sin, float *const *k_cache,
              float *const *v_cache, int C, const int *slots, const int *pos, const routing_plan *plan) {
    bf16 *mid = malloc(sizeof(bf16) * (long)M * H);
    if (!mid) return -1;
    const bf16 *in = h;
    for (int l = 0; l < layers; l++) {
        if (pg_attention(in, mid, M, H, attn + l, cos, sin, k_cache[l], v_cache[l], C, slots, pos) ||
            pg_moe_mlp(mid, mid, out, M, H, mlp + l, 1, plan)) {
            free(mid);
            return -1;
        }
        in = out;
    }
    free(mid);
    return 0;
}
