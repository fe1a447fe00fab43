"""Weight-only int8 for inference (`--quantize int8`): half the bytes of bfloat16, and a faster kernel.

On CPU, torch's bfloat16 matrix-vector product is bound by converting the weights, not by reading them
(`pregate bench step` measures it): it reads about half the bytes per second that a float32 one does.
torch's weight-only int8 kernel (`torch._weight_int8pack_mm`: int8 weights, one scale per output row,
activations in the model's dtype) reads a quarter of float32's bytes at a similar rate, so a decode
step, which is nearly all matrix-vector products, gets several times faster.

What is quantized: every linear map of the decoder (q|k|v, o, the shared experts, the routed experts) and
the LM head, symmetrically per output row (scale = max |w| / 127). With tied embeddings the input
embedding looks its rows up in the same int8 table (dequantized on lookup), so no second copy is kept.
Norms, RoPE, attention and the KV cache keep their dtype. The pre-gating router is quantized the same
way by `quantize_router` (its linear maps and its embedding table; its head and norms keep float32):
its float32 matrix-vector products were the largest cost that the MoE pays and its dense parent does
not (the router column of `pregate bench step`'s breakdown), and its embedding table alone held 100 MB.
Its choices can change where two experts' logits nearly tie; `pregate eval ppl --quantize int8`
measures the whole effect.

The kernel needs the reduction dimension to be a multiple of 32 (others read garbage or crash), so
weights are zero-padded to it and the gate|up halves of the shared and routed experts laid out at padded
widths (zeros between), so a down projection gets its padded input for free. Its time grows with the rows
like that many matrix-vector products, so from `DEQUANT_ROWS` rows on (prefill) the product runs as a
float GEMM over the weights converted on the fly. On CPU the kernel is fast only with bfloat16
activations, so a float32 or float16 model quantized to int8 runs its matrix-vector products in bfloat16
(activations and scales rounded to it, the result cast back); the rest of the model keeps its dtype.

The model is quantized in place after loading; checkpoints stay as they are, and a quantized model is for
inference only (no training, no saving). With an expert store (`serve --resident-experts k --quantize
int8`) the routed experts stay in the store's dtype, the checkpoint's, and everything else is int8.
`pregate eval ppl --quantize int8` reports what it costs in perplexity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pregate.errors import PregateError
from pregate.moe import MoEForCausalLM, release_layer_experts
from pregate.router import PreGatingRouter

QUANTIZE_MODES = ("int8",)
ALIGN = 32  # torch._weight_int8pack_mm needs in_features % 32 == 0
# The int8 kernel's time grows with the rows like M matrix-vector products; from about 100 rows on, a
# float GEMM over the weights converted on the fly is faster (prefill; `bench step` measures both).
DEQUANT_ROWS = 128


def padded(k: int) -> int:
    """k rounded up to the kernel's alignment."""
    return -(-k // ALIGN) * ALIGN


def check_mode(mode: str | None, error: type[PregateError] = PregateError) -> None:
    """None (no quantization) or one of QUANTIZE_MODES, else `error` naming them."""
    if mode is not None and mode not in QUANTIZE_MODES:
        raise error(f"unknown quantization {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 [N, K], float32 scales [N]) with w ~= q * scale[:, None] (symmetric, per row)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # an all-zero row keeps scale > 0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, k] @ (q [N, K] * scales[:, None]).T for k <= K (the columns past k are zero), in x's dtype."""
    k = x.shape[-1]
    if x.shape[0] >= DEQUANT_ROWS:  # int8 values are exact in bfloat16: the same weights, a float GEMM
        return (x @ q[:, :k].to(x.dtype).T) * scales
    if k != q.shape[1]:
        x = F.pad(x, (0, q.shape[1] - k))
    if x.device.type == "cpu" and x.dtype != torch.bfloat16:
        # on CPU only the bfloat16 path of the kernel is vectorized; float32 and float16 activations take
        # a path an order of magnitude slower (docs/serving.md), so they cross it in bfloat16
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), q, scales.to(torch.bfloat16))
        return y.to(x.dtype)
    return torch._weight_int8pack_mm(x.contiguous(), q, scales)


class Int8Linear(nn.Module):
    """A bias-optional linear map with int8 weights [N, K padded to 32] and scales [N] in the model dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        q, scale = quantize_rows(weight)
        n, k = q.shape
        self.in_features, self.out_features = k, n
        self.register_buffer("qweight", F.pad(q, (0, padded(k) - k)).contiguous())
        self.register_buffer("scales", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and self.bias is None:  # the serving path: no reshaping (each op costs microseconds)
            return int8_matmul(x, self.qweight, self.scales)
        shape = x.shape
        y = int8_matmul(x.reshape(-1, shape[-1]), self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """Rows of an Int8Linear's table, dequantized on lookup: the tied input embedding of an int8 head."""

    def __init__(self, table: Int8Linear):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        return t.qweight[ids, : t.in_features].to(t.scales.dtype) * t.scales[ids, None]


def _pad_halves(gate_up: torch.Tensor, widths: list[int], rows: int) -> torch.Tensor:
    """[E, 2R, H] with expert e's gate rows in [0, w) and up rows in [w, 2w) -> [E, 2 * rows, H] with
    them in [0, w) and [p, p + w), p = w padded to ALIGN, zeros between: act(0) * 0 = 0, so the gate|up
    product already has the padded width that the down projection's kernel needs."""
    out = gate_up.new_zeros(gate_up.shape[0], 2 * rows, gate_up.shape[2])
    for e, w in enumerate(widths):
        p = padded(w)
        out[e, :w], out[e, p : p + w] = gate_up[e, :w], gate_up[e, w : 2 * w]
    return out


class Int8Experts(nn.Module):
    """One layer's routed experts in int8: gate|up [E, 2Rp, H] (expert e of width w, p = w padded to 32:
    gate rows [0, w), up rows [p, p + w), zeros elsewhere) and down [E, H, Rp], with per-row scales."""

    def __init__(self, gate_up: torch.Tensor, down_t: torch.Tensor, widths: list[int], dtype: torch.dtype):
        super().__init__()
        r = max(widths)  # this layer's widest expert (the stacked tensors hold the model's widest)
        down_t = down_t[:, :r]
        e, _, h = down_t.shape
        rp = padded(r)
        q, s = quantize_rows(_pad_halves(gate_up, widths, rp).reshape(e * 2 * rp, h))
        self.register_buffer("gate_up", q.view(e, 2 * rp, h))
        self.register_buffer("gate_up_scales", s.view(e, 2 * rp).to(dtype))
        q, s = quantize_rows(down_t.transpose(1, 2).reshape(e * h, r))  # [E*H, R]: each expert's output rows
        self.register_buffer("down", F.pad(q, (0, rp - r)).view(e, h, rp).contiguous())
        self.register_buffer("down_scales", s.view(e, h).to(dtype))
        self._views: list[tuple] | None = None  # per expert, made on first use (see _expert)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _apply(self, fn, *args, **kwargs):
        self._views = None  # .to() and friends replace the buffers: the views would hold the old ones
        return super()._apply(fn, *args, **kwargs)

    def _expert(self, e: int, width: int) -> tuple:
        """(padded width, gate|up, its scales, down, its scales) of expert e: views made once, not per
        call (slicing costs microseconds a call, several calls per layer and step)."""
        if self._views is None:
            self._views = [None] * self.gate_up.shape[0]
        views = self._views[e]
        if views is None or views[0] != padded(width):
            p = padded(width)
            views = (
                p,
                self.gate_up[e, : 2 * p],
                self.gate_up_scales[e, : 2 * p],
                self.down[e],
                self.down_scales[e],
            )
            self._views[e] = views
        return views

    def run(self, e: int, width: int, x: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e (true width `width`) on x [n, H] -> (activation [n, width padded], output [n, H])."""
        p, gate_up, gate_up_scales, down, down_scales = self._expert(e, width)
        h = int8_matmul(x, gate_up, gate_up_scales)
        a = act(h[:, :p]) * h[:, p:]  # zero past the true width
        return a, int8_matmul(a, down, down_scales)


def _int8_linear(linear: nn.Linear, dtype: torch.dtype) -> Int8Linear:
    return Int8Linear(linear.weight, linear.bias, dtype)


@torch.no_grad()
def quantize_model(model: MoEForCausalLM, mode: str = "int8", experts: bool = True) -> MoEForCausalLM:
    """Quantize `model` in place (see the module doc) and return it, in eval mode with no gradients.

    experts False, or routed experts released to an expert store: the routed experts keep their dtype
    (a store serves them as the checkpoint holds them) and everything else is quantized."""
    check_mode(mode)
    if model.quantized:
        raise PregateError("the model is already quantized")
    dtype = model.norm.weight.dtype
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise PregateError(f"int8 weights need bfloat16, float16 or float32 activations, not {dtype}")
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj, attn.o_proj = _int8_linear(attn.qkv_proj, dtype), _int8_linear(attn.o_proj, dtype)
        shared = padded(mlp.shared)  # the gate|up halves padded like the experts': no padding per call
        gate_up = _pad_halves(mlp.gate_up_proj.weight[None], [mlp.shared], shared)[0]
        mlp.gate_up_proj, mlp.shared = Int8Linear(gate_up, None, dtype), shared
        mlp.down_proj = _int8_linear(mlp.down_proj, dtype)
        if not (mlp.num_experts and any(mlp.widths)):
            continue  # no routed experts (the dense parent served as a MoE)
        if not experts or mlp.w_gate_up.shape[1] == 0:
            continue  # the routed experts stay as they are (an expert store serves them)
        mlp.inference_experts = Int8Experts(mlp.w_gate_up, mlp.w_down_t, mlp.widths, dtype)
        release_layer_experts(mlp)  # the float copy goes now: never two copies of every expert
    if model.tied:
        head = Int8Linear(model.embed_tokens.weight, None, dtype)
        model.embed_tokens = Int8Embedding(head)
    else:
        head = _int8_linear(model.lm_head, dtype)
    model.lm_head = head
    model.quantized = mode
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def quantize_router(router: PreGatingRouter, mode: str = "int8") -> PreGatingRouter:
    """Quantize a pre-gating router in place: every linear map of its blocks (q|k|v, out, SwiGLU) in int8
    like the decoder's, and its embedding table as int8 rows dequantized on lookup. The expert head and
    the norms keep their dtype. Returns it in eval mode, for inference only."""
    check_mode(mode)
    if getattr(router, "quantized", None):
        raise PregateError("the router is already quantized")
    dtype = router.embed.weight.dtype
    for block in router.layers:
        attn, mlp = block.attn, block.mlp
        attn.qkv, attn.out = _int8_linear(attn.qkv, dtype), _int8_linear(attn.out, dtype)
        mlp.gate, mlp.up, mlp.down = (_int8_linear(m, dtype) for m in (mlp.gate, mlp.up, mlp.down))
    router.embed = Int8Embedding(Int8Linear(router.embed.weight, None, dtype))
    router.quantized = mode
    for p in router.parameters():
        p.requires_grad_(False)
    return router.eval()
