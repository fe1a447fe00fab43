"""The pre-gating router: a tiny causal transformer over token ids that picks each token's expert(s).

Read-ME decouples routing from the backbone: the router reads token ids only, so a token's expert is
known the moment the token exists, before the backbone runs. Its choice is used in every MoE layer.

Contents
- `RouterConfig` (+ presets "readme" and "tiny") and `PreGatingRouter` with its own KV cache
  (`RouterCache`): `forward` recomputes a whole sequence, `step` appends a chunk or one decode token and
  equals `forward` on the concatenation (float32, 1e-5).
- Two heads: "softmax" (a linear layer, logits over experts) and "dselect" (DSelect-k, Hazimeh et al.
  2021: k binary-encoded single-expert selectors mixed by softmax(alpha); `forward` returns log q).
- `LayerwiseGate`: the conventional per-layer linear gate, for comparison.
- Pure losses: `distill_kl` (paper), `distill_graded` (official code), `dselect_entropy`, the oracle
  routing `oracle_experts` and the metric `router_accuracy`.
- Persistence: `save_router` / `load_router` (`checkpoint.ROUTER_WEIGHTS` + `checkpoint.ROUTER_CONFIG` in
  a `pregate train` output), and `routing_for`, which turns a router's choice into the backbone's
  `Routing` (or per-layer gate).

Imports from the package: `errors`, `checkpoint` (file names) and `moe` (`Routing` only). Training code
and serving code both import this module; it imports neither.

Dimension legend: B batch, L tokens in this call, P tokens already cached, T = P + L, D router width,
H attention heads, Dh head width, F MLP hidden, E experts, K selected experts / selectors,
M = ceil(log2 E) code bits, N flattened tokens, Y backbone layers in the distillation targets.

Sequences are unpadded: position t of a row is its t-th token (the engine keeps one cache per request).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pregate.checkpoint import ROUTER_CONFIG, ROUTER_WEIGHTS
from pregate.errors import PregateError, check_int, check_number
from pregate.moe import Routing

RouterHead = Literal["softmax", "dselect"]
ROUTER_HEADS: tuple[str, ...] = ("softmax", "dselect")


class RouterError(PregateError):
    """Bad router configuration or a call that does not fit the router (shapes, lengths, ids)."""


# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class RouterConfig:
    """Shape of a pre-gating router. `vocab_size` must equal the backbone's; `num_experts` counts the
    routed experts (the shared expert always runs and is not routed)."""

    vocab_size: int
    num_experts: int
    dim: int = 512
    n_layers: int = 1
    n_heads: int = 4
    mlp_hidden: int = 1408  # SwiGLU hidden width; ~8/3 * dim rounded up to a multiple of 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    head: RouterHead = "softmax"
    top_k: int = 1
    dselect_gamma: float = 1.0  # width of the smooth-step's linear-ish region

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_experts", "dim", "n_heads", "mlp_hidden", "max_seq_len", "top_k"):
            value = getattr(self, name)
            check_int(f"RouterConfig.{name}", value, error=RouterError)
        check_int("RouterConfig.n_layers", self.n_layers, 0, error=RouterError)
        for name in ("rope_theta", "norm_eps", "dselect_gamma"):
            value = getattr(self, name)
            check_number(f"RouterConfig.{name}", value, above=0, error=RouterError)
        if self.dim % self.n_heads != 0:
            raise RouterError(
                f"RouterConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}: "
                "choose dim as a multiple of n_heads."
            )
        if (self.dim // self.n_heads) % 2 != 0:
            raise RouterError(
                f"RouterConfig head width dim/n_heads={self.dim // self.n_heads} is odd: RoPE needs an "
                "even head width; change dim or n_heads."
            )
        if self.head not in ROUTER_HEADS:
            raise RouterError(f"RouterConfig.head={self.head!r}: unknown head; use one of {ROUTER_HEADS}.")
        if self.top_k > self.num_experts:
            raise RouterError(
                f"RouterConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}: "
                "top_k must be <= num_experts."
            )
        if self.head == "dselect" and self.num_experts < 2:
            raise RouterError(
                f"RouterConfig.num_experts={self.num_experts} with head='dselect': DSelect-k needs at "
                "least 2 experts; use head='softmax'."
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def code_bits(self) -> int:
        """M = ceil(log2 E): bits of a DSelect-k selector's binary expert code."""
        return max(1, math.ceil(math.log2(self.num_experts)))

    @classmethod
    def preset(cls, name: str, *, vocab_size: int, num_experts: int, **overrides: Any) -> RouterConfig:
        """A named preset ("readme": the paper's router; "tiny": for tests) with overrides applied."""
        if name not in ROUTER_PRESETS:
            raise RouterError(f"router preset {name!r} is unknown; use one of {sorted(ROUTER_PRESETS)}.")
        return cls(vocab_size=vocab_size, num_experts=num_experts, **{**ROUTER_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterConfig:
        """Inverse of `to_dict`; unknown keys are an error (a checkpoint from another version)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RouterError(f"RouterConfig got unknown keys {unknown}; known keys are {sorted(known)}.")
        return cls(**data)


ROUTER_PRESETS: dict[str, dict[str, Any]] = {
    # Paper: 1 layer, 4 heads, width 512 (~18M parameters with a 32k vocabulary).
    "readme": dict(dim=512, n_layers=1, n_heads=4, mlp_hidden=1408),
    "tiny": dict(dim=32, n_layers=1, n_heads=2, mlp_hidden=64, max_seq_len=256),
}


# ---------------------------------------------------------------------------------------------------
# Routing (shared by every gate)


def select_experts(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of softmax(logits) over the last axis, weights renormalised to sum to 1.

    logits [.., E] -> (expert_ids [.., k] long, weights [.., k] float, descending). k=1 gives weight
    exactly 1.0 and the argmax. For a DSelect-k router the logits are log q, so this is the top-k of
    the mixture q (see `PreGatingRouter.route`).
    """
    num_experts = logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise RouterError(f"k={k} must be between 1 and the number of experts ({num_experts}).")
    if k == 1:
        ids = logits.argmax(dim=-1, keepdim=True)
        return ids, torch.ones(ids.shape, dtype=logits.dtype, device=logits.device)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(logits.dtype)


# ---------------------------------------------------------------------------------------------------
# DSelect-k


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """Cubic smooth step: 0 for t <= -gamma/2, 1 for t >= gamma/2, else -2/g^3 t^3 + 3/(2g) t + 1/2.

    Continuously differentiable; its gradient is exactly 0 once saturated, which is what lets a
    DSelect-k selector reach an exact one-hot.
    """
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    upper = torch.where(t >= gamma / 2, torch.ones_like(t), cubic)
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), upper)


def dselect_selector_probs(z: Tensor, num_experts: int, gamma: float) -> Tensor:
    """Each selector's distribution over experts from its code logits.

    z [.., K, M] -> r [.., K, E] with r_i(e) = prod_j (S(z_ij) if bit j of e is 1 else 1 - S(z_ij)),
    bit j = (e >> j) & 1. Over all 2^M codes this sums to 1. When E < 2^M the codes >= E are dropped and
    r_i is renormalised over the first E codes; if a selector puts all its mass on dropped codes
    (possible only when saturated) its row falls back to uniform instead of 0/0.
    """
    m = z.shape[-1]
    codes = torch.arange(num_experts, device=z.device)
    bits = ((codes[:, None] >> torch.arange(m, device=z.device)) & 1).to(z.dtype)  # [E, M]
    s = smooth_step(z, gamma).unsqueeze(-2)  # [.., K, 1, M]
    r = (bits * s + (1 - bits) * (1 - s)).prod(dim=-1)  # [.., K, E]
    total = r.sum(dim=-1, keepdim=True)
    ok = total > 0
    safe_total = torch.where(ok, total, torch.ones_like(total))  # keeps 0/0 out of the backward too
    return torch.where(ok, r / safe_total, torch.full_like(r, 1.0 / num_experts))


def dselect_entropy(selector_probs: Tensor) -> Tensor:
    """DSelect-k's regulariser: sum over selectors of the entropy of r_i, mean over tokens.

    selector_probs [.., K, E] -> scalar. Minimising it (times a weight lambda chosen by the trainer)
    pushes every selector toward a one-hot, i.e. toward selecting exactly one expert.
    """
    r = selector_probs
    entropy = -(r * r.clamp_min(torch.finfo(r.dtype).tiny).log()).sum(dim=-1)  # [.., K]; 0 log 0 = 0
    return entropy.sum(dim=-1).mean()


class DSelectKHead(nn.Module):
    """k binary-encoded selectors plus k mixing logits, computed per token from the router feature."""

    def __init__(self, dim: int, num_experts: int, k: int, gamma: float) -> None:
        super().__init__()
        self.num_experts, self.k, self.gamma = num_experts, k, gamma
        self.code_bits = max(1, math.ceil(math.log2(num_experts)))
        self.z_proj = nn.Linear(dim, k * self.code_bits)  # selector code logits z
        self.alpha_proj = nn.Linear(dim, k)  # selector mixing logits alpha

    def reset_parameters(self) -> None:
        # Tiny z so every bit starts in the smooth step's differentiable region (S(z) ~ 1/2): a
        # saturated bit at init would never receive a gradient.
        bound = self.gamma / 100
        nn.init.uniform_(self.z_proj.weight, -bound, bound)
        nn.init.zeros_(self.z_proj.bias)
        nn.init.normal_(self.alpha_proj.weight, std=0.02)
        nn.init.zeros_(self.alpha_proj.bias)

    def selectors(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h [.., D] -> (r [.., K, E] selector distributions, softmax(alpha) [.., K])."""
        z = self.z_proj(h).unflatten(-1, (self.k, self.code_bits))  # [.., K, M]
        r = dselect_selector_probs(z, self.num_experts, self.gamma)
        return r, torch.softmax(self.alpha_proj(h), dim=-1)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h [.., D] -> (log q [.., E], r [.., K, E]) with q(e) = sum_i softmax(alpha)_i r_i(e).

        q may hold exact zeros (saturated selectors); they become log(tiny) (about -87 in float32) so
        logits stay finite for the losses while softmax(logits) still equals q.
        """
        r, mix = self.selectors(h)
        q = (mix.unsqueeze(-1) * r).sum(dim=-2)  # [.., E]
        return q.clamp_min(torch.finfo(q.dtype).tiny).log(), r


# ---------------------------------------------------------------------------------------------------
# KV cache


@dataclass
class RouterCache:
    """Keys/values of the tokens a router has seen, per layer, for incremental routing.

    keys[l], values[l]: [B, H, capacity, Dh]; only [:, :, :length] is valid. Capacity doubles when
    full (amortised O(1) appends, no fixed 4096-token buffer per request). Make one per request with
    `PreGatingRouter.new_cache(1)`; `clone()` forks it (e.g. for parallel sampling).
    """

    keys: list[Tensor]
    values: list[Tensor]
    batch_size: int
    max_len: int  # the router's max_seq_len
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else self.max_len

    def clone(self) -> RouterCache:
        """An independent copy holding only the valid prefix."""
        return RouterCache(
            keys=[k[:, :, : self.length].clone() for k in self.keys],
            values=[v[:, :, : self.length].clone() for v in self.values],
            batch_size=self.batch_size,
            max_len=self.max_len,
            length=self.length,
        )

    def truncate(self, length: int) -> None:
        """Forget every token from position `length` on (e.g. to re-route after a rollback)."""
        if not 0 <= length <= self.length:
            raise RouterError(f"truncate length={length} must be between 0 and the cached {self.length}.")
        self.length = length

    def _reserve(self, extra: int) -> None:
        needed = self.length + extra
        assert needed <= self.max_len, "caller checks max_seq_len"
        if needed <= self.capacity:
            return
        new_cap = min(self.max_len, max(needed, 2 * self.capacity, 16))
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_empty(old.shape[0], old.shape[1], new_cap, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                buffers[i] = new

    def _append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H, L, Dh] after the cached prefix; return all keys/values [B, H, P+L, Dh]."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


# ---------------------------------------------------------------------------------------------------
# The router network


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Attention(nn.Module):
    def __init__(self, cfg: RouterConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: RouterCache | list[RouterCache] | None, layer: int
    ) -> Tensor:
        """x [B, L, D], cos/sin [L, Dh] for the new positions -> [B, L, D].

        cache a list: row b is one new token of its own sequence (cache[b], batch 1), cos/sin
        [B, 1, 1, Dh]."""
        b, length, _ = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = q * cos + _rotate_half(q) * sin  # [B, H, L, Dh]
        k = k * cos + _rotate_half(k) * sin
        if isinstance(cache, list):  # rows of different sequences: projections batched, attention per row
            ys = []
            for i, c in enumerate(cache):
                ki, vi = c._append(layer, k[i : i + 1], v[i : i + 1])
                ys.append(F.scaled_dot_product_attention(q[i : i + 1], ki, vi))
            return self.out(torch.cat(ys).transpose(1, 2).reshape(b, length, -1))
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache._append(layer, k, v)  # [B, H, T, Dh]
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif length == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new token sees everything cached
        else:
            # New token i (absolute position past + i) sees keys 0..past + i.
            mask = torch.ones(length, past + length, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, length, -1))


class _SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _Block(nn.Module):
    def __init__(self, cfg: RouterConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = _Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = _SwiGLU(cfg.dim, cfg.mlp_hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: RouterCache | None, layer: int) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class PreGatingRouter(nn.Module):
    """embedding -> n_layers x (RMSNorm, causal RoPE attention, RMSNorm, SwiGLU) -> RMSNorm -> head.

    Contract: the output at position t depends only on ids[..t] (causal), and `step` over any split of
    a sequence into chunks equals `forward` on the whole sequence (float32: within 1e-5).
    Head "softmax": logits [.., E] from a linear layer. Head "dselect": logits = log q, the log of the
    DSelect-k mixture distribution, so softmax(logits) == q and the same losses and `route` apply.
    """

    def __init__(self, cfg: RouterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.native = None  # pregate.native_router.NativeRouter: step_tokens as one native call
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head: nn.Module
        if cfg.head == "softmax":
            self.head = nn.Linear(cfg.dim, cfg.num_experts, bias=False)
        else:
            self.head = DSelectKHead(cfg.dim, cfg.num_experts, cfg.top_k, cfg.dselect_gamma)
        inv_freq = 1.0 / cfg.rope_theta ** (
            torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim
        )
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # [max_seq_len, Dh], HF Llama layout
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        if isinstance(self.head, DSelectKHead):
            self.head.reset_parameters()

    # -- running --------------------------------------------------------------------------------

    def features(self, input_ids: Tensor, cache: RouterCache | None = None) -> Tensor:
        """input_ids [B, L] -> final normalised hidden state [B, L, D]; appends to `cache` if given."""
        ids = self._check_ids(input_ids)
        b, length = ids.shape
        past = 0
        if cache is not None:
            if cache.batch_size != b:
                raise RouterError(f"input_ids batch size {b} does not match the cache's {cache.batch_size}.")
            if len(cache.keys) != len(self.layers):
                raise RouterError(
                    f"cache has {len(cache.keys)} layers but the router has {len(self.layers)}: "
                    "make caches with this router's new_cache()."
                )
            past = cache.length
        if past + length > self.cfg.max_seq_len:
            raise RouterError(
                f"sequence length {past + length} (cached {past} + new {length}) exceeds "
                f"RouterConfig.max_seq_len={self.cfg.max_seq_len}: raise max_seq_len or shorten the input."
            )
        x = self.embed(ids)  # [B, L, D]
        cos = self.rope_cos[past : past + length].to(x.dtype)
        sin = self.rope_sin[past : past + length].to(x.dtype)
        if cache is not None:
            cache._reserve(length)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += length
        return self.norm(x)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids [B, L] -> logits [B, L, E], full causal recompute (no cache)."""
        return self._logits(self.features(input_ids))

    def forward_with_selectors(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """DSelect-k only: (logits = log q [B, L, E], selector probs r [B, L, K, E]) for `dselect_entropy`."""
        if not isinstance(self.head, DSelectKHead):
            raise RouterError("forward_with_selectors needs RouterConfig.head='dselect'.")
        return self.head(self.features(input_ids))

    def new_cache(self, batch_size: int = 1) -> RouterCache:
        """An empty KV cache on this router's device and dtype (one per request in serving)."""
        if batch_size < 1:
            raise RouterError(f"batch_size={batch_size} must be >= 1.")
        w = self.norm.weight  # the compute dtype and device (never quantized, unlike the embedding)
        shape = (batch_size, self.cfg.n_heads, 0, self.cfg.head_dim)
        return RouterCache(
            keys=[w.new_empty(shape) for _ in self.layers],
            values=[w.new_empty(shape) for _ in self.layers],
            batch_size=batch_size,
            max_len=self.cfg.max_seq_len,
        )

    def step(self, input_ids: Tensor, cache: RouterCache) -> Tensor:
        """input_ids [B, L_new] (a prompt chunk or one decode token) -> logits [B, L_new, E].

        Attends over the cached keys/values and appends the new ones; the prefix is never recomputed.
        """
        return self._logits(self.features(input_ids, cache))

    def step_tokens(self, tokens: Tensor, caches: list[RouterCache]) -> Tensor:
        """One new token for each of B sequences at once: tokens [B], caches[b] (batch 1) -> logits [B, E].

        What the serving engine calls once per step for every sampled token; equals B calls of `step`
        (float32: within 1e-5). Each sequence keeps its own cache and length."""
        ids = self._check_ids(tokens.reshape(-1, 1))  # [B, 1]
        if len(caches) != ids.shape[0]:
            raise RouterError(
                f"step_tokens got {ids.shape[0]} tokens but {len(caches)} caches; give one each."
            )
        positions = []
        for c in caches:
            if c.batch_size != 1 or len(c.keys) != len(self.layers):
                raise RouterError(
                    "step_tokens needs one batch-1 cache per token, made by this router's new_cache()."
                )
            if c.length + 1 > self.cfg.max_seq_len:
                raise RouterError(
                    f"sequence length {c.length + 1} exceeds RouterConfig.max_seq_len={self.cfg.max_seq_len}."
                )
            c._reserve(1)
            positions.append(c.length)
        if self.native is not None and not torch.is_grad_enabled():
            h = self.native.features(ids[:, 0], caches)  # [B, D]
        else:
            x = self.embed(ids)  # [B, 1, D]
            at = torch.tensor(positions, device=x.device)
            cos = self.rope_cos[at].to(x.dtype)[:, None, None]  # [B, 1, 1, Dh]
            sin = self.rope_sin[at].to(x.dtype)[:, None, None]
            for i, block in enumerate(self.layers):
                x = block(x, cos, sin, caches, i)
            h = self.norm(x)[:, 0]
        for c in caches:
            c.length += 1
        return self._logits(h)

    def route(self, logits: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """logits [.., E] -> (expert_ids [.., k] long, weights [.., k]); k defaults to cfg.top_k.

        Both heads use the top-k of softmax(logits), weights renormalised to sum to 1. For DSelect-k
        that is the top-k distinct experts of the mixture q: always exactly k distinct experts (the
        MoE runs a fixed k per token), and once the selectors have converged to distinct one-hots it
        is precisely selector i's expert with weight softmax(alpha)_i. Taking each selector's argmax
        instead could return duplicates, i.e. fewer than k experts.
        """
        return select_experts(logits, self.cfg.top_k if k is None else k)

    # -- setup ----------------------------------------------------------------------------------

    @torch.no_grad()
    def init_embedding_from(
        self, backbone_embedding: Tensor, generator: torch.Generator | None = None
    ) -> None:
        """Initialise the router embedding from the backbone's token embedding [V, Hb].

        Hb >= dim: take the first `dim` columns (what the official Read-ME code does). Hb < dim: the
        first Hb columns are the backbone's and the rest are drawn from N(0, 0.02^2) (small random,
        like a fresh embedding) so no dimension starts dead.
        """
        if backbone_embedding.ndim != 2 or backbone_embedding.shape[0] != self.cfg.vocab_size:
            raise RouterError(
                f"backbone embedding has shape {tuple(backbone_embedding.shape)}; expected "
                f"[vocab_size={self.cfg.vocab_size}, hidden]: use the backbone the router was built for."
            )
        hidden, dim = backbone_embedding.shape[1], self.cfg.dim
        w = self.embed.weight
        if hidden >= dim:
            w.copy_(backbone_embedding[:, :dim])
            return
        w[:, :hidden] = backbone_embedding.to(w.dtype)
        rest = torch.randn(w.shape[0], dim - hidden, generator=generator, dtype=torch.float32)
        w[:, hidden:] = (0.02 * rest).to(w.dtype)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        """Parameter count (optionally without the token embedding)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embedding else total

    # -- helpers --------------------------------------------------------------------------------

    def _logits(self, h: Tensor) -> Tensor:
        if isinstance(self.head, DSelectKHead):
            return self.head(h)[0]
        return self.head(h)

    def _check_ids(self, input_ids: Tensor) -> Tensor:
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise RouterError(f"input_ids {shape}: expected a 2-D [batch, tokens] tensor of token ids.")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise RouterError(f"input_ids dtype {input_ids.dtype}: expected integer token ids (torch.long).")
        return input_ids.long()


# ---------------------------------------------------------------------------------------------------
# Layer-wise gate (the conventional baseline)


class LayerwiseGate(nn.Module):
    """One linear gate per layer on the hidden state entering that layer's MLP (Mixtral-style)."""

    def __init__(self, num_layers: int, hidden_size: int, num_experts: int, top_k: int = 1) -> None:
        super().__init__()
        sizes = {"num_layers": num_layers, "hidden_size": hidden_size, "num_experts": num_experts}
        for name, value in sizes.items():
            if value < 1:
                raise RouterError(f"LayerwiseGate {name}={value} must be >= 1.")
        if not 1 <= top_k <= num_experts:
            raise RouterError(f"LayerwiseGate top_k={top_k} must be between 1 and num_experts={num_experts}.")
        self.top_k = top_k
        self.gates = nn.ModuleList(nn.Linear(hidden_size, num_experts, bias=False) for _ in range(num_layers))

    def forward(self, layer: int, hidden: Tensor) -> Tensor:
        """hidden [.., Hb] -> logits [.., E] of gate `layer`."""
        if not 0 <= layer < len(self.gates):
            raise RouterError(f"layer={layer} is out of range for {len(self.gates)} layer gates.")
        return self.gates[layer](hidden)

    def route(self, logits: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Same selection as `PreGatingRouter.route`: top-k of softmax, renormalised weights."""
        return select_experts(logits, self.top_k if k is None else k)


# ---------------------------------------------------------------------------------------------------
# Persistence, and routing the backbone


Gate = PreGatingRouter | LayerwiseGate


def save_router(router: Gate, out: Path) -> None:
    """ROUTER_WEIGHTS + ROUTER_CONFIG ({"kind": "pregating"|"layerwise", ...}) into the directory `out`."""
    from safetensors.torch import save_file

    if isinstance(router, PreGatingRouter):
        meta = {"kind": "pregating", "config": router.cfg.to_dict()}
    else:
        g = router.gates[0]
        meta = {
            "kind": "layerwise",
            "num_layers": len(router.gates),
            "hidden_size": g.in_features,
            "num_experts": g.out_features,
            "top_k": router.top_k,
        }
    state = {k: v.contiguous() for k, v in router.state_dict().items()}
    save_file(state, str(Path(out) / ROUTER_WEIGHTS))
    (Path(out) / ROUTER_CONFIG).write_text(json.dumps(meta, indent=1))


def router_meta(path: str | Path) -> dict:
    """The parsed ROUTER_CONFIG of a directory that holds a router (kind, and config or gate shape)."""
    cfg_file = Path(path) / ROUTER_CONFIG
    if not cfg_file.is_file():
        raise RouterError(
            f"{path} holds no trained router ({ROUTER_CONFIG}); train one with `pregate train`."
        )
    return json.loads(cfg_file.read_text())


def load_router(path: str | Path, device=None) -> Gate:
    """The trained router of a `pregate train` output directory (float32, eval mode)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / ROUTER_CONFIG, path / ROUTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise RouterError(
            f"{path} holds no trained router ({ROUTER_CONFIG} + {ROUTER_WEIGHTS}); "
            "train one with `pregate train`."
        )
    meta = router_meta(path)
    if meta.get("kind") == "pregating":
        router: Gate = PreGatingRouter(RouterConfig.from_dict(meta["config"]))
    elif meta.get("kind") == "layerwise":
        router = LayerwiseGate(meta["num_layers"], meta["hidden_size"], meta["num_experts"], meta["top_k"])
    else:
        raise RouterError(f"{cfg_file}: unknown router kind {meta.get('kind')!r}.")
    router.load_state_dict(load_file(str(weights)), strict=True)
    return router.float().to(device).eval()


def routing_for(router: Gate, ids: Tensor) -> tuple[Routing | None, Callable | None]:
    """(routing, layer_router) for `MoEForCausalLM.forward(ids [B, n], routing, layer_router)`.

    Decisions and weights are constants (no gradient reaches the router or flows through the weights)."""
    if isinstance(router, LayerwiseGate):

        def layer_router(layer: int, h: Tensor) -> Routing:
            with torch.no_grad():
                eids, w = router.route(router(layer, h))  # [T, K]
            return Routing(eids, w.to(h.dtype))

        return None, layer_router
    with torch.no_grad():
        eids, w = router.route(router(ids))  # [B, n, K]
    k = eids.shape[-1]
    return Routing(eids.reshape(-1, k), w.reshape(-1, k).float()), None


# ---------------------------------------------------------------------------------------------------
# Distillation losses and metric (pure functions of router logits and targets)


def _flatten(logits: Tensor, target_scores: Tensor) -> tuple[Tensor, Tensor]:
    """logits [.., E], target_scores [.., Y, E] -> [N, E], [N, Y, E]."""
    if (
        target_scores.ndim != logits.ndim + 1
        or target_scores.shape[:-2] != logits.shape[:-1]
        or (target_scores.shape[-1] != logits.shape[-1])
    ):
        raise RouterError(
            f"target_scores shape {tuple(target_scores.shape)} does not fit logits {tuple(logits.shape)}: "
            "expected target_scores [..tokens, layers, experts] for logits [..tokens, experts]."
        )
    e = logits.shape[-1]
    return logits.reshape(-1, e), target_scores.reshape(-1, target_scores.shape[-2], e)


def distill_kl(logits: Tensor, target_scores: Tensor, temperature: float = 1.0) -> Tensor:
    """The paper's loss: sum over backbone layers y of KL(softmax(scores[:, y] / T) || softmax(logits)),
    mean over tokens. The temperature softens the targets only. logits [N, E], target_scores [N, Y, E]."""
    if not temperature > 0:
        raise RouterError(f"temperature={temperature} must be > 0.")
    logits, scores = _flatten(logits, target_scores)
    log_q = F.log_softmax(logits.float(), dim=-1).unsqueeze(1)  # [N, 1, E]
    log_p = F.log_softmax(scores.float() / temperature, dim=-1)  # [N, Y, E]
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [N, Y]
    return kl.sum(dim=1).mean()


def distill_graded(logits: Tensor, target_scores: Tensor, smoothing: float = 0.1) -> Tensor:
    """The official code's loss: sum over layers y of (0.75 * label-smoothed CE against
    argmax(scores[:, y]) + 0.25 * soft CE against softmax(scores[:, y])), each mean over tokens."""
    if not 0 <= smoothing < 1:
        raise RouterError(f"smoothing={smoothing} must be in [0, 1).")
    logits, scores = _flatten(logits, target_scores)
    n, y, e = scores.shape
    log_q = F.log_softmax(logits.float(), dim=-1).unsqueeze(1)  # [N, 1, E]
    labels = scores.argmax(dim=-1).reshape(-1)  # [N*Y]
    per_layer_logits = logits.float().unsqueeze(1).expand(n, y, e).reshape(-1, e)  # [N*Y, E]
    hard_ce = F.cross_entropy(per_layer_logits, labels, label_smoothing=smoothing, reduction="none")
    hard_ce = hard_ce.view(n, y)
    soft_ce = -(torch.softmax(scores.float(), dim=-1) * log_q).sum(dim=-1)  # [N, Y]
    return (0.75 * hard_ce + 0.25 * soft_ce).mean(dim=0).sum()


@torch.no_grad()
def oracle_experts(target_scores: Tensor) -> Tensor:
    """The oracle routing: target_scores [.., Y, E] -> the expert [..] with the highest score summed over
    the Y layers. With the distillation targets (log shares) this is the one expert that best covers
    the token's routed activation mass across layers: what `router_accuracy` compares a router against,
    `eval ppl`'s moe_oracle routes by and `analyze` calls the oracle."""
    return target_scores.sum(dim=-2).argmax(dim=-1)


@torch.no_grad()
def router_accuracy(logits: Tensor, target_scores: Tensor) -> float:
    """Fraction of tokens whose argmax(logits) equals the oracle expert (`oracle_experts`)."""
    logits, scores = _flatten(logits, target_scores)
    if logits.shape[0] == 0:
        raise RouterError("router_accuracy got no tokens.")
    return (logits.argmax(dim=-1) == oracle_experts(scores)).float().mean().item()


def num_parameters(module: nn.Module) -> int:
    """Parameter count of any module (routers, gates)."""
    return sum(p.numel() for p in module.parameters())
