"""The pre-gating router's decode step as one native call (`--native`, with pregate.native's layers).

Every engine step routes each token it has just sampled with one `PreGatingRouter.step_tokens` call.
Through torch that is some forty small operations (norms, q|k|v, RoPE, a cache write and an attention
call per sequence, out, the SwiGLU's three products): about a millisecond of a batch-1 step on 2 cores,
most of it not reading weights, and a cost the dense parent does not pay. `native/router.c` runs the
embedding, every block and the final norm in one OpenMP region over the router's own float32 weights,
or over the int8 ones of `pregate.quantize.quantize_router`; the head (a few outputs) stays in torch.
`attach_native_router` gives a router this path; `step_tokens` takes it whenever no gradient is
recorded, and prompts (`step`, `forward`) stay in torch.

Contract (tests): the features, hence the logits, equal the torch path's within float32 rounding (the
router's own contract between `step` and `forward` is 1e-5); with int8 weights within the bfloat16
roundings that torch's int8 products make, which the kernel makes too. A row's result depends on nothing
but its own token and cache, so routing a token alone or in any batch gives the same bits.

The call reads the weights that the router held when it was attached (it keeps references to them, so
none can be freed under it), like a packed copy does.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from pregate.errors import PregateError
from pregate.native import Held, library, weights_reason
from pregate.quantize import Int8Embedding, Int8Linear
from pregate.router import PreGatingRouter, RouterCache, RouterError


class _Matrix(ctypes.Structure):
    """native.h's `matrix`."""

    _fields_ = [
        ("w16", ctypes.c_void_p),
        ("w8", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("stride", ctypes.c_long),
        ("w32", ctypes.c_void_p),
        ("blocked", ctypes.c_int),  # 0: the router's weights stay in rows
    ]


class _Block(ctypes.Structure):
    """router.c's `router_block`."""

    _fields_ = [(name, _Matrix) for name in ("qkv", "out", "gate", "up", "down")] + [
        ("attn_norm", ctypes.c_void_p),
        ("mlp_norm", ctypes.c_void_p),
    ]


def can_run_native_router(router: PreGatingRouter) -> str | None:
    """Why `router` cannot take the native decode step, or None if it can."""
    reason = weights_reason(router.norm.weight, torch.float32, "a float32 router")
    if reason is None and getattr(router, "packed", False):
        reason = "--native reads the router's plain float32 or int8 weights (this router is packed)"
    return reason


class NativeRouter:
    """What `pg_router_step` reads of one router, gathered once: `features(tokens, caches)`."""

    def __init__(self, router: PreGatingRouter, pairs: bool | None = None):
        self.cfg = router.cfg
        self.int8 = getattr(router, "quantized", None) == "int8"  # set by pregate.quantize.quantize_router
        self.held = Held()  # every tensor a pointer below points into
        self.blocks = (_Block * max(len(router.layers), 1))()
        for i, block in enumerate(router.layers):
            attn, mlp = block.attn, block.mlp
            b = self.blocks[i]
            b.qkv, b.out = self._matrix(attn.qkv), self._matrix(attn.out)
            b.gate, b.up, b.down = (self._matrix(m) for m in (mlp.gate, mlp.up, mlp.down))
            b.attn_norm, b.mlp_norm = (
                self.held.ptr(block.attn_norm.weight),
                self.held.ptr(block.mlp_norm.weight),
            )
        self.final_norm = self.held.ptr(router.norm.weight)
        self.embed = self.embed8 = self.embed_scale = None
        self.embed_stride = self.cfg.dim
        if isinstance(router.embed, Int8Embedding):
            table = router.embed.table
            self.embed8, self.embed_scale = self.held.ptr(table.qweight), self.held.ptr(table.scales)
            self.embed_stride = table.qweight.stride(0)
        else:
            self.embed = self.held.ptr(router.embed.weight)
        self.cos, self.sin = self.held.ptr(router.rope_cos), self.held.ptr(router.rope_sin)
        self.kernel = library(pairs).pg_router_step  # pairs: the int8 products' kernel (native.library)

    def _matrix(self, linear: nn.Module) -> _Matrix:
        if isinstance(linear, Int8Linear):  # torch's int8 path rounds the scales to bfloat16 per call
            scales = self.held.ptr(linear.scales.to(torch.bfloat16))
            return _Matrix(None, self.held.ptr(linear.qweight), scales, linear.qweight.stride(0), None)
        return _Matrix(None, None, None, linear.in_features, self.held.ptr(linear.weight))

    def features(self, tokens: torch.Tensor, caches: list[RouterCache]) -> torch.Tensor:
        """tokens [B], each the next token of the sequence of caches[b] (batch-1 caches of this router) ->
        the final normalised features [B, D]; writes each token's keys and values into its cache at its
        length (the caller advances the lengths)."""
        cfg, b, layers = self.cfg, len(caches), self.cfg.n_layers
        for c in caches:  # the kernel writes at position c.length: room for it, always
            shape = (1, cfg.n_heads, c.capacity, cfg.dim // cfg.n_heads)
            if len(c.keys) != layers or any(k.shape != shape or k.dtype != torch.float32 for k in c.keys):
                raise RouterError(
                    "the native router step needs batch-1 caches made by its router's new_cache()"
                )
            if c.length >= cfg.max_seq_len:
                raise RouterError(f"sequence length {c.length + 1} exceeds RouterConfig.max_seq_len")
            c._reserve(1)
        positions = [c.length for c in caches]
        ids = tokens.to(torch.int64).contiguous()
        listed = ids.tolist()
        if b and not 0 <= min(listed) <= max(listed) < cfg.vocab_size:
            raise RouterError(f"token ids must lie in [0, {cfg.vocab_size}), got {listed}")
        keys = (ctypes.c_void_p * max(b * layers, 1))(
            *[c.keys[i].data_ptr() for c in caches for i in range(layers)]
        )
        values = (ctypes.c_void_p * max(b * layers, 1))(
            *[c.values[i].data_ptr() for c in caches for i in range(layers)]
        )
        out = torch.empty(b, cfg.dim)
        status = self.kernel(
            b,
            cfg.dim,
            layers,
            cfg.n_heads,
            cfg.mlp_hidden,
            cfg.norm_eps,
            self.int8,
            self.blocks,
            self.final_norm,
            self.embed,
            self.embed8,
            self.embed_scale,
            self.embed_stride,
            ids.data_ptr(),
            (ctypes.c_int * b)(*positions),
            self.cos,
            self.sin,
            keys,
            values,
            (ctypes.c_long * b)(*[c.capacity for c in caches]),
            out.data_ptr(),
        )
        if status != 0:
            raise MemoryError("the native router step could not allocate its scratch memory")
        return out


def attach_native_router(router: PreGatingRouter, pairs: bool | None = None) -> PreGatingRouter:
    """Give a float32 router (plain, or quantized by `quantize_router`) its native decode step, in place;
    int8 products on AVX512-BF16's pair dot products or AVX2's (`pairs`, pregate.native.library; float32
    ones are AVX2's). Raises PregateError when `can_run_native_router` refuses."""
    reason = can_run_native_router(router)
    if reason is not None:
        raise PregateError(reason)
    router.native = NativeRouter(router, pairs)
    return router.eval()
