"""Prepacked bfloat16 weights for CPU inference (`pack_model`): the same products, faster.

torch's bfloat16 `F.linear` on CPU runs oneDNN's kernel, which wants the weight in its own blocked
layout; given a plain [N, K] weight it converts it on every call (our reading of why packing pays).
`torch.ops.mkldnn._reorder_linear_weight` converts it once (what torch.compile's CPU freezing pass does),
and `torch.ops.mkldnn._linear_pointwise` then runs the same kernel on it: the outputs equal `F.linear`'s
bit for bit (tests), and a bfloat16 decode step took 0.78x the time of plain weights at batch 1 and 8
(`pregate bench step --unpacked` measures the model both ways in one run; docs/serving.md).

What is packed: every linear map of the decoder (q|k|v, o, the shared experts), the routed experts
(each expert's gate|up and down as two packed matrices, the down one transposed to the [H, w] a linear map
takes) and the LM head. With tied embeddings the input embedding keeps reading the plain table (a packed
tensor cannot be indexed), so the head is a packed copy beside it: the table's size again (57 MB for
SmolLM2-135M), for the largest single product of the step. Only bfloat16 on CPU: for float32, oneDNN's
packed product does not equal `F.linear` (which runs MKL there), so nothing is packed.

The pre-gating router computes in float32, where packing is not bit-exact, but its contract is a
tolerance anyway (`step` equals `forward` within 1e-5): `pack_router` packs its linear maps, and its
logits stay within that tolerance of the plain router's (tests), so its choices differ only where two
experts' logits tie to 1e-5. (Not timed side by side by a command: the router part of the packed MoE's
breakdown was 0.93 ms in docs/serving.md's last packed run, 1.5 ms with the plain router in the run
before, on a noisier host.)

`serving_layout` puts a loaded model and its router in the layout the engine serves: int8 with
`--quantize`, else packed where `can_pack` allows. `serve`, `bench serve` and `bench step` all call it.

A packed tensor is opaque (no slicing, no dtype or device change), so a packed model is for inference
only, like a quantized one: pack after loading, never train or save it. The packed tensors are plain
attributes, which module conversions skip; `MoEForCausalLM` refuses a conversion that would change a
packed model's dtype or device, before it touches anything. With an expert store the routed
experts come from the store as they are and only the rest is packed.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from pregate.errors import PregateError
from pregate.moe import MoEForCausalLM, release_layer_experts
from pregate.quantize import quantize_model, quantize_router
from pregate.router import PreGatingRouter


@functools.cache
def cpu_packs_bfloat16() -> bool:
    """Whether this CPU's oneDNN packs bfloat16 weights: it needs avx_ne_convert or AVX-512 (BW, VL, DQ),
    and on a CPU with neither (an AVX2-only AMD EPYC, for one) `_reorder_linear_weight` raises. Probed
    once on a tiny weight; where it is False the plain weights are what serves."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        _pack(torch.zeros(8, 8, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True


def can_pack(model: MoEForCausalLM) -> bool:
    """True for a bfloat16 model on CPU that is neither packed nor quantized (the only case that pays and
    stays bit-exact), on a CPU whose oneDNN can pack bfloat16 (`cpu_packs_bfloat16`)."""
    w = model.norm.weight
    usable = w.device.type == "cpu" and w.dtype == torch.bfloat16 and not model.quantized and not model.packed
    return usable and cpu_packs_bfloat16()


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # the hint is the rows oneDNN should expect; decode runs one row per request
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """A linear map over a prepacked weight: equals `F.linear(x, weight, bias)` bit for bit."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = _pack(weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.packed, self.bias)


class PackedExperts(nn.Module):
    """One layer's routed experts, each as a packed gate|up [2w, H] and a packed down [H, w] (w its true
    width): the same `run` interface as `quantize.Int8Experts`."""

    def __init__(self, gate_up: torch.Tensor, down_t: torch.Tensor, widths: list[int]):
        super().__init__()
        self.gate_up = [_pack(gate_up[e, : 2 * w]) for e, w in enumerate(widths)]
        self.down = [_pack(down_t[e, :w].T) for e, w in enumerate(widths)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.gate_up, *self.down))

    def run(self, e: int, width: int, x: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e on x [n, H] -> (activation [n, width], output [n, H])."""
        h = _linear(x, self.gate_up[e], None)  # [n, 2w]
        a = act(h[:, :width]) * h[:, width:]
        return a, _linear(a, self.down[e], None)


@torch.no_grad()
def pack_model(model: MoEForCausalLM, experts: bool = True, decoder: bool = True) -> MoEForCausalLM:
    """Pack `model`'s weights in place (see the module doc) and return it in eval mode, no gradients.

    experts False, or routed experts released to an expert store: the routed experts stay as they are.
    decoder False: the decoder layers stay plain and only the LM head is packed (for pregate.native,
    which reads the layers' weights itself).
    Raises PregateError for a model `can_pack` refuses."""
    if not can_pack(model):
        raise PregateError(
            "only a bfloat16 model on CPU that is neither packed nor quantized can be packed, on a CPU "
            "whose oneDNN packs bfloat16 (avx_ne_convert or AVX-512) "
            f"(this one: {model.norm.weight.dtype} on {model.norm.weight.device.type}, "
            f"quantized={model.quantized}, packed={model.packed}, "
            f"this CPU packs bfloat16: {cpu_packs_bfloat16()})"
        )
    for layer in model.layers if decoder else []:
        attn, ffn = layer.self_attn, layer.mlp
        attn.qkv_proj = PackedLinear(attn.qkv_proj.weight, attn.qkv_proj.bias)
        attn.o_proj = PackedLinear(attn.o_proj.weight, None)
        ffn.gate_up_proj = PackedLinear(ffn.gate_up_proj.weight, None)
        ffn.down_proj = PackedLinear(ffn.down_proj.weight, None)
        if experts and ffn.num_experts and any(ffn.widths) and ffn.w_gate_up.shape[1] > 0:
            ffn.inference_experts = PackedExperts(ffn.w_gate_up, ffn.w_down_t, ffn.widths)
            release_layer_experts(ffn)  # the plain copy goes now: never two copies of every expert
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.lm_head = PackedLinear(head, None)  # tied: a copy; the embedding keeps its table for lookups
    model.packed = True
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _pack_router_linear(linear: nn.Linear) -> PackedLinear:
    return PackedLinear(linear.weight, linear.bias)


@torch.no_grad()
def pack_router(router: PreGatingRouter) -> PreGatingRouter:
    """Pack a float32 pre-gating router's block linear maps (q|k|v, out, SwiGLU) in place; embedding,
    norms and head stay. For inference only; returns it in eval mode. Raises PregateError for a router
    that is not float32 on CPU, or already packed or quantized."""
    w = router.norm.weight
    usable = torch.backends.mkldnn.is_available() and w.dtype == torch.float32 and w.device.type == "cpu"
    if not usable or getattr(router, "quantized", None):
        raise PregateError(f"only a float32 router on CPU can be packed (this one: {w.dtype} on {w.device})")
    if getattr(router, "packed", False):
        raise PregateError("the router is already packed")
    for block in router.layers:
        attn, mlp = block.attn, block.mlp
        attn.qkv, attn.out = _pack_router_linear(attn.qkv), _pack_router_linear(attn.out)
        mlp.gate, mlp.up, mlp.down = (_pack_router_linear(m) for m in (mlp.gate, mlp.up, mlp.down))
    router.packed = True
    for p in router.parameters():
        p.requires_grad_(False)
    return router.eval()


def serving_layout(
    model: MoEForCausalLM,
    router: PreGatingRouter | None = None,
    quantize: str | None = None,
    native: bool = False,
    pairs: bool | None = None,
    tiles: bool | None = None,
):
    """In place, the layout the engine serves: `quantize` ("int8") quantizes the model and its router
    (pregate.quantize); without it a bfloat16 model on CPU and its router are packed; anything else is
    left as it is. `native`: decode rows run through pregate.native, over int8 weights with `quantize`,
    else over plain bfloat16 decoder layers (the LM head packed as above), and the router routes decode
    tokens through pregate.native_router (its int8 or plain float32 weights); raises PregateError where
    that cannot run; `pairs` picks its bfloat16 products (pregate.native.library), `tiles` tiles its
    bfloat16 weights (None: where pregate.native.default_tiles says; pregate.native.attach_native).
    Returns (model, router)."""
    if native:
        from pregate.native import attach_native, can_run_native
        from pregate.native_router import attach_native_router

        reason = can_run_native(model)  # before any conversion (it implies can_pack)
        if reason is not None:
            raise PregateError(reason)
    if quantize is not None:
        quantize_model(model, quantize)
        if router is not None:
            quantize_router(router, quantize)
    elif can_pack(model):
        pack_model(model, decoder=not native)  # native reads the decoder layers' plain weights itself
        if router is not None and not native:
            pack_router(router)
    if native:
        attach_native(model, pairs, tiles)
        if router is not None:
            attach_native_router(router, pairs)
    return model, router
