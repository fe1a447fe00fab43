"""The Read-ME MoE decoder for the Llama family (Llama, SmolLM, Qwen2, Mistral).

Attention, embeddings and norms are the dense parent's. Each MLP becomes a shared expert (channels every
domain uses; always runs) plus E routed experts stored as stacked tensors, so an expert is an index.
Every token carries K routed-expert ids with weights (Read-ME: K = 1, weight 1) chosen *once* by a router
outside the backbone and used in every layer; the grouping of tokens by expert is computed once per
forward (`RoutingPlan`) and reused by every layer.

Equivalence contract: when the shared and routed channel sets together cover every MLP channel and every
token uses all its experts with weight 1, the MoE equals the dense parent (tests prove it).

Layout of a step: tokens of several sequences are packed into one flat stream [T]; each sequence is a
`Segment` with its own `KVCache`, so prefill chunks and decode tokens of different requests share one
forward (what the serving engine needs) and a plain [B, L] batch is just B equal segments.

Legend: B batch, L sequence length, T tokens in the flat stream, H hidden, S shared channels,
R routed channels per expert (padded to the widest expert with zero rows), E routed experts,
K experts per token, V vocab, N query heads, G key/value heads, D head dim.

Persistence: `save_moe`, `load_moe` and `load_config` (the file names are `checkpoint`'s). Imports from
the package only `errors` and `checkpoint`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pregate import checkpoint
from pregate.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from pregate.errors import PregateError, check_expert_ids

FORMAT = "pregate-moe"
FORMAT_VERSION = 1

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class MoEConfig:
    """Shape of a pregate MoE; `base` is the parent's Hugging Face config as a dict."""

    base: dict
    num_experts: int
    shared_channels: list[int]  # per layer: |shared expert|
    expert_channels: list[list[int]]  # per layer, per expert: true width (the rest is zero padding)
    expert_names: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)  # how it was made: base, domains, tokens, remain rate...

    def __post_init__(self):
        n = self.base["num_hidden_layers"]
        if len(self.shared_channels) != n or len(self.expert_channels) != n:
            raise PregateError(
                f"MoE config lists channels for {len(self.shared_channels)} layers, model has {n}"
            )
        if any(len(row) != self.num_experts for row in self.expert_channels):
            raise PregateError("MoE config: every layer must list one width per routed expert")

    @property
    def num_layers(self) -> int:
        return self.base["num_hidden_layers"]

    @property
    def routed_width(self) -> int:
        """R: the padded width of the stacked routed experts."""
        return max((max(row) for row in self.expert_channels if row), default=0)

    def activated_channels(self) -> float:
        """Mean MLP channels a token activates per layer with top-1 routing (shared + mean routed)."""
        per_layer = [
            s + (sum(r) / len(r) if r else 0) for s, r in zip(self.shared_channels, self.expert_channels)
        ]
        return sum(per_layer) / len(per_layer)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> MoEConfig:
        if data.get("format") != FORMAT:
            raise PregateError(f"not a pregate MoE checkpoint (its {CONFIG_FILE} has the wrong format tag)")
        if data.get("version") != FORMAT_VERSION:
            raise PregateError(
                f"pregate MoE format version {data.get('version')} is not supported (need {FORMAT_VERSION})"
            )
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        return cls(**fields)


ExpertWeights = tuple[torch.Tensor, torch.Tensor]  # gate|up [2R, H] (see MoEMLP), down transposed [R, H]


class ExpertSource(Protocol):
    """Where routed-expert weights come from during a forward (an offloading store implements this)."""

    def begin_layer(
        self, layer: int, experts: list[int]
    ) -> None: ...  # the experts this layer will use, in order
    def fetch(self, layer: int, expert: int) -> ExpertWeights: ...  # blocks until resident


# ----------------------------------------------------------------------------------------- routing


@dataclass
class Routing:
    """K experts per token with mixing weights. expert_ids [T, K] long, weights [T, K]."""

    expert_ids: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def top1(cls, expert_ids: torch.Tensor) -> Routing:
        ids = expert_ids.reshape(-1, 1).long()
        return cls(ids, torch.ones(ids.shape, dtype=torch.float32, device=ids.device))

    @classmethod
    def all_experts(cls, num_tokens: int, num_experts: int, device=None) -> Routing:
        """Every token uses every expert with weight 1: the dense-equivalent path (and oracle scoring)."""
        ids = torch.arange(num_experts, device=device).expand(num_tokens, num_experts)
        return cls(ids.contiguous(), torch.ones(num_tokens, num_experts, device=device))


def expert_groups(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end): the slices of a step's assignments sorted by expert (stable, so by expert,
    then by token) that hold each expert with any; counts[e] = assignments to expert e. The one grouping
    rule: RoutingPlan sorts with torch, pregate.native's PlanArgs on host lists."""
    groups, start = [], 0
    for e, c in enumerate(counts):
        if c:
            groups.append((e, start, start + c))
        start += c
    return groups


class RoutingPlan:
    """Tokens grouped by expert once per forward; every layer reuses it.

    order [T*K]: token index of each (token, slot) assignment sorted by expert; weights [T*K] in that order;
    groups: (expert, start, end) slices of `order` for experts that have tokens.
    """

    def __init__(self, routing: Routing, num_experts: int):
        ids = routing.expert_ids
        if ids.numel():
            check_expert_ids(int(ids.min()), int(ids.max()), num_experts)
        flat = ids.reshape(-1)
        k = ids.shape[-1] if ids.dim() > 1 else 1
        sort = torch.argsort(flat, stable=True)
        self.order = sort // k
        self.weights = routing.weights.reshape(-1)[sort]
        self.groups = expert_groups(torch.bincount(flat, minlength=num_experts).tolist())
        self.num_tokens = ids.shape[0]
        # the common decode cases, where grouping and weighting are no-ops (Read-ME: top-1, weight 1)
        self.unit_weights = bool((self.weights == 1).all())
        self.one_group = len(self.groups) == 1 and k == 1  # every token to one expert, order = identity

    @property
    def unique_experts(self) -> int:
        return len(self.groups)


# ----------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, scale in the input dtype (bit-for-bit the HF order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel, the same float32 arithmetic as HF's x * rsqrt(mean(x^2) + eps) (tests: equal)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class KVCache:
    """Keys and values of up to S sequences ("slots") for every layer: k[l], v[l] [S, G, C, D].

    Slot s holds lengths[s] tokens. A one-sequence cache (`model.new_cache()`) is slot 0; the serving
    engine owns one cache for all its requests, gives each a slot at admission (`acquire`) and frees it
    at the end (`release`), so decode rows of every request share one tensor and one attention call per
    layer, and memory is reused across requests instead of growing with every burst. Buffers start as
    zeros (a masked-out position must be finite: 0 * NaN would poison the attention output), and grow
    (slots and capacity double) only when a request needs more than any before it.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype=torch.float32,
        device=None,
        capacity: int = 64,
        slots: int = 1,
    ):
        shape = (slots, num_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.lengths = [0] * slots
        self._free = list(range(slots - 1, -1, -1)) if slots > 1 else []  # slot 0 of a 1-slot cache is in use

    @property
    def length(self) -> int:
        """Tokens cached in slot 0 (the whole story for a one-sequence cache)."""
        return self.lengths[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[0]

    def acquire(self, capacity: int) -> int:
        """A free slot that can hold `capacity` tokens (lowest first, so used slots stay compact)."""
        if not self._free:
            self._grow(slots=2 * self.num_slots)
        self._free.sort(reverse=True)
        slot = self._free.pop()
        self.reserve(capacity)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.append(slot)

    def reserve(self, capacity: int) -> None:
        """Make every slot hold at least `capacity` tokens."""
        if capacity > self.capacity:
            self._grow(capacity=max(capacity, 2 * self.capacity))

    def _grow(self, slots: int | None = None, capacity: int | None = None) -> None:
        s, c = slots or self.num_slots, capacity or self.capacity
        for store in (self.k, self.v):
            for layer, old in enumerate(store):
                new = old.new_zeros(s, old.shape[1], c, old.shape[3])
                new[: old.shape[0], :, : old.shape[2]] = old
                store[layer] = new
        if s > len(self.lengths):
            self._free.extend(range(s - 1, len(self.lengths) - 1, -1))
            self.lengths.extend([0] * (s - len(self.lengths)))


@dataclass
class Segment:
    """A contiguous run of one sequence's tokens inside the flat stream; cache None means no past.
    slot: the sequence's slot in `cache` (0 for a one-sequence cache)."""

    length: int
    cache: KVCache | None = None
    slot: int = 0

    @property
    def past(self) -> int:
        return self.cache.lengths[self.slot] if self.cache is not None else 0


@dataclass
class DecodeGroup:
    """Decode rows (one new token each) of one cache, attended in one call per layer over the slot range
    [lo, hi) they span, each row masked to its own length (mask None: every row sees all `span` keys).

    direct: row r0 + i is slot lo + i for every slot of the range (the steady state: requests admitted
    together decode in slot order), so queries, cache writes and outputs are views, with no gather."""

    cache: KVCache
    rows: torch.Tensor  # the rows in the step's token stream
    slots: torch.Tensor
    pos: torch.Tensor  # each row's position (= its cached length)
    lo: int
    hi: int
    span: int
    mask: torch.Tensor | None  # [hi - lo, 1, 1, span]
    direct: bool
    r0: int


class AttentionPlan:
    """How the step's segments attend, worked out once per forward and reused by every layer.

    Decode rows (one new token with a cache) that share a cache are attended together: one call per
    layer over the slot range they span. Every other segment (prefill chunks, caches of their own) is
    attended alone. `only_direct`: the step is one direct decode group and nothing else (a decode step),
    so attention's output needs no assembling.
    """

    def __init__(self, segments: list[Segment], device):
        self.segments = segments
        self.equal_batch = all(s.cache is None for s in segments) and len({s.length for s in segments}) == 1
        self.starts = []
        start = 0
        for seg in segments:
            self.starts.append(start)
            start += seg.length
        by_cache: dict[int, list[int]] = {}
        for i, seg in enumerate(segments):
            if seg.length == 1 and seg.cache is not None:
                by_cache.setdefault(id(seg.cache), []).append(i)
        grouped = {i for idx in by_cache.values() for i in idx}
        self.alone = [i for i in range(len(segments)) if i not in grouped]
        self.groups = [self._decode_group(idx, device) for idx in by_cache.values()]
        self.only_direct = len(self.groups) == 1 and not self.alone and self.groups[0].direct

    def _decode_group(self, idx: list[int], device) -> DecodeGroup:
        segs = [self.segments[i] for i in idx]
        slots = [s.slot for s in segs]
        rows = [self.starts[i] for i in idx]
        lo, hi = min(slots), max(slots) + 1
        past = [s.past for s in segs]
        span = max(past) + 1
        direct = slots == list(range(lo, hi)) and rows == list(range(rows[0], rows[0] + len(rows)))
        mask = None
        if not (direct and min(past) == span - 1):  # rows of different lengths, or slots in between
            lengths = torch.ones(hi - lo, dtype=torch.long)  # slots in the range that do not decode: 1
            for s in segs:
                lengths[s.slot - lo] = s.past + 1
            mask = (torch.arange(span)[None, :] < lengths[:, None])[:, None, None, :].to(device)
        return DecodeGroup(
            segs[0].cache,
            torch.tensor(rows, device=device),
            torch.tensor(slots, device=device),
            torch.tensor(past, device=device),
            lo,
            hi,
            span,
            mask,
            direct,
            rows[0],
        )


class Attention(nn.Module):
    """Llama attention with q/k/v fused into one projection at load time (`qkv_proj`; checkpoints keep
    the parent's q_proj/k_proj/v_proj names, which load_state_dict fuses and state_dict splits)."""

    def __init__(self, cfg: dict, head_dim: int):
        super().__init__()
        h, n, g = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        bias = bool(cfg.get("attention_bias", False)) or cfg["model_type"] == "qwen2"
        self.n_heads, self.n_kv, self.head_dim = n, g, head_dim
        self.qkv_proj = nn.Linear(h, (n + 2 * g) * head_dim, bias=bias)
        self.o_proj = nn.Linear(n * head_dim, h, bias=False)
        self.register_load_state_dict_pre_hook(_fuse_qkv)
        self.register_state_dict_post_hook(_split_qkv)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan, layer: int
    ) -> torch.Tensor:
        t, dtype = x.shape[0], cos.dtype  # the attention dtype (see attention_dtype)
        n, g, d = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x).to(dtype).view(t, n + 2 * g, d)  # [T, N + 2G, D]
        # split_with_sizes, not split: Tensor.split's Python wrapper costs more than the split itself
        qk, v_tok = qkv.split_with_sizes((n + g, g), dim=1)
        qk = qk * cos + qk.roll(d // 2, dims=-1) * sin  # RoPE on q and k at once (sin carries the sign)
        q_tok, k_tok = qk.split_with_sizes((n, g), dim=1)  # token-major [T, N, D], [T, G, D], as decode uses
        gqa = n != g
        if plan.only_direct:  # a decode step: [B, N, 1, D] out of the one call is already [T, N*D]
            o = self._decode(plan.groups[0], q_tok, k_tok, v_tok, layer, gqa)
            return self.o_proj(o.reshape(t, n * d).to(x.dtype))
        q, k, v = q_tok.transpose(0, 1), k_tok.transpose(0, 1), v_tok.transpose(0, 1)  # [N|G, T, D]
        segments = plan.segments
        if plan.equal_batch:
            # Fast path (training, equal-length batches): one batched causal attention.
            b, m = len(segments), segments[0].length
            qb = q.reshape(n, b, m, d).transpose(0, 1)
            kb = k.reshape(g, b, m, d).transpose(0, 1)
            vb = v.reshape(g, b, m, d).transpose(0, 1)
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=gqa)  # [B, N, L, D]
            out = out.transpose(0, 1).reshape(n, t, d)
            return self.o_proj(out.transpose(0, 1).reshape(t, n * d).to(x.dtype))
        out = q.new_empty(n, t, d)
        for group in plan.groups:
            o = self._decode(group, q_tok, k_tok, v_tok, layer, gqa)  # [hi - lo, N, 1, D]
            if group.direct:
                out[:, group.r0 : group.r0 + o.shape[0]] = o[:, :, 0].transpose(0, 1)
            else:
                out[:, group.rows] = o[group.slots - group.lo, :, 0].transpose(0, 1)
        for i in plan.alone:
            seg, start = segments[i], plan.starts[i]
            end = start + seg.length
            qs, ks, vs = q[:, start:end], k[:, start:end], v[:, start:end]
            past = seg.past
            if seg.cache is not None:
                kl, vl = seg.cache.k[layer][seg.slot], seg.cache.v[layer][seg.slot]  # [G, C, D]
                kl[:, past : past + seg.length] = ks
                vl[:, past : past + seg.length] = vs
                ks, vs = kl[:, : past + seg.length], vl[:, : past + seg.length]
            if seg.length == 1:
                mask = None  # one new token sees everything cached
            else:
                # query i sits at position past + i and sees keys 0..past + i
                mask = torch.ones(seg.length, past + seg.length, dtype=torch.bool, device=x.device).tril(past)
            out[:, start:end] = F.scaled_dot_product_attention(
                qs[None], ks[None], vs[None], attn_mask=mask, enable_gqa=gqa
            )[0]
        return self.o_proj(out.transpose(0, 1).reshape(t, n * d).to(x.dtype))

    @staticmethod
    def _decode(group: DecodeGroup, q, k, v, layer: int, gqa: bool) -> torch.Tensor:
        """Write the group's new keys/values into its cache and attend: -> [hi - lo, N, 1, D].
        q, k, v are token-major ([T, N|G, D]), so a direct group's rows need no transposing."""
        kl, vl = group.cache.k[layer], group.cache.v[layer]  # [S, G, C, D]
        if group.direct:
            if group.r0 or group.hi - group.lo != k.shape[0]:  # else the group is the whole stream
                rows = slice(group.r0, group.r0 + group.hi - group.lo)
                q, k, v = q[rows], k[rows], v[rows]
            kl[group.slots, :, group.pos] = k  # [B, G, D]
            vl[group.slots, :, group.pos] = v
            qs = q.unsqueeze(2)  # [B, N, 1, D], a view
        else:
            kl[group.slots, :, group.pos] = k[group.rows]
            vl[group.slots, :, group.pos] = v[group.rows]
            qs = q.new_zeros(group.hi - group.lo, q.shape[1], 1, q.shape[2])
            qs[group.slots - group.lo, :, 0] = q[group.rows]
        lo, hi, span = group.lo, group.hi, group.span
        return F.scaled_dot_product_attention(
            qs, kl[lo:hi, :, :span], vl[lo:hi, :, :span], attn_mask=group.mask, enable_gqa=gqa
        )


def _fuse_qkv(module, state, prefix, *args) -> None:
    """Checkpoint names (q_proj, k_proj, v_proj) -> the fused qkv_proj."""
    for kind in ("weight", "bias"):
        names = [f"{prefix}{p}_proj.{kind}" for p in "qkv"]
        if all(name in state for name in names):
            state[f"{prefix}qkv_proj.{kind}"] = torch.cat([state.pop(name) for name in names])


def _split_qkv(module, state, prefix, *args) -> None:
    """The fused qkv_proj -> checkpoint names, so saved checkpoints keep the parent's layout."""
    n, g, d = module.n_heads, module.n_kv, module.head_dim
    for kind in ("weight", "bias"):
        fused = state.pop(f"{prefix}qkv_proj.{kind}", None)
        if fused is not None:
            for name, part in zip("qkv", fused.split([n * d, g * d, g * d])):
                state[f"{prefix}{name}_proj.{kind}"] = part


class MoEMLP(nn.Module):
    """Shared expert on every token + each token's routed experts on their token groups.

    In memory, what runs together is fused (at load time, so checkpoints keep their layout):
    - shared expert: `gate_up_proj` [2S, H] (gate rows, then up rows) and `down_proj` [H, S];
    - routed experts: `w_gate_up` [E, 2R, H], where expert e of true width w holds its gate rows in
      [0, w) and its up rows in [w, 2w), and `w_down_t` [E, R, H] (down, transposed), rows [0, w) used.
      So expert e is two contiguous blocks, `w_gate_up[e, :2w]` and `w_down_t[e, :w]`: no slicing copy,
      no strided read, and the zero padding past the true width is never read.
    Checkpoint names: gate_proj/up_proj/down_proj and w_gate/w_up [E, R, H], w_down [E, H, R] (padding rows
    zero: act(0) * 0 = 0). `shared_index` [S] and `expert_index` [E, R] (-1 = padding) record which dense
    channels each holds.
    """

    def __init__(
        self,
        hidden: int,
        shared: int,
        widths: list[int],
        routed_width: int,
        act: str,
        routed_weights: bool = True,
    ):
        super().__init__()
        num_experts = len(widths)
        self.widths = list(widths)
        self.shared = shared
        self.act = ACTIVATIONS[act]
        self.gate_up_proj = nn.Linear(hidden, 2 * shared, bias=False)
        self.down_proj = nn.Linear(shared, hidden, bias=False)
        r = routed_width if routed_weights else 0  # 0: the experts live in an expert store
        self.w_gate_up = nn.Parameter(torch.zeros(num_experts, 2 * r, hidden), requires_grad=routed_weights)
        self.w_down_t = nn.Parameter(torch.zeros(num_experts, r, hidden), requires_grad=routed_weights)
        self.register_buffer("shared_index", torch.zeros(shared, dtype=torch.long))
        self.register_buffer("expert_index", torch.full((num_experts, routed_width), -1, dtype=torch.long))
        # the routed experts in an inference layout (quantize.Int8Experts, packed.PackedExperts), with a
        # `run(e, width, x, act)`; then w_* are empty. None: the parameters above
        self.inference_experts = None
        self.register_load_state_dict_pre_hook(_fuse_mlp)
        self.register_state_dict_post_hook(_split_mlp)

    @property
    def num_experts(self) -> int:
        return self.w_gate_up.shape[0]

    def forward(
        self,
        x: torch.Tensor,
        plan: RoutingPlan | None,
        scores: torch.Tensor | None = None,
        fetch: Callable[[int], ExpertWeights] | None = None,
    ) -> torch.Tensor:
        """x [T, H] -> [T, H]. If `scores` [T, E] is given, add each expert's activation mass sum|a| per
        token.

        fetch(e) -> (gate|up [2R, H], down transposed [R, H]), in this module's fused layout, supplies expert
        weights from elsewhere (an offloading store); by default they are this module's own parameters.
        """
        gu = self.gate_up_proj(x)  # [T, 2S]
        out = self.down_proj(self.act(gu[:, : self.shared]) * gu[:, self.shared :])
        if plan is None or not plan.groups or not any(self.widths):
            return out
        one = plan.one_group
        xs = x if one else x[plan.order]  # [T*K, H] grouped by expert
        fast = self.inference_experts if fetch is None else None
        own = None
        if fetch is None and fast is None:
            if self.w_gate_up.shape[1] == 0:
                raise PregateError(
                    "this model's routed experts were released to an expert store; pass expert_source"
                )
            if torch.is_grad_enabled() and self.w_gate_up.requires_grad:
                # unbind, not w[e]: its backward stacks E gradients once instead of E full-size zero tensors
                own = list(zip(self.w_gate_up.unbind(0), self.w_down_t.unbind(0)))
        ys = []
        for e, start, end in plan.groups:
            w = self.widths[e]
            xe = xs if one else xs[start:end]
            if fast is not None:
                a, y = fast.run(e, w, xe, self.act)
            else:
                if fetch is not None:
                    gate_up, down_t = fetch(e)
                elif own is not None:
                    gate_up, down_t = own[e]
                else:
                    gate_up, down_t = self.w_gate_up[e], self.w_down_t[e]
                h = xe @ gate_up[: 2 * w].T  # [n, 2w]: two contiguous blocks, nothing copied
                a = self.act(h[:, :w]) * h[:, w:]  # [n, w]
                y = a @ down_t[:w]  # [n, H]
            if scores is not None:
                scores[plan.order[start:end], e] += a.detach().abs().sum(-1).float()
            ys.append(y if plan.unit_weights else y * plan.weights[start:end, None].to(a.dtype))
        if one:
            return out + ys[0]
        return out.index_add(0, plan.order, torch.cat(ys))


def _fuse_mlp(module, state, prefix, *args) -> None:
    """Checkpoint names -> the fused in-memory layout (see MoEMLP)."""
    gate, up = state.pop(f"{prefix}gate_proj.weight", None), state.pop(f"{prefix}up_proj.weight", None)
    if gate is not None and up is not None:
        state[f"{prefix}gate_up_proj.weight"] = torch.cat([gate, up])
    names = [f"{prefix}{n}" for n in ("w_gate", "w_up", "w_down")]
    if all(n in state for n in names):
        wg, wu, wd = (state.pop(n) for n in names)  # [E, R, H], [E, R, H], [E, H, R]
        gate_up = wg.new_zeros(wg.shape[0], 2 * wg.shape[1], wg.shape[2])
        for e, w in enumerate(module.widths[: wg.shape[0]] if wg.shape[1] else []):
            gate_up[e, :w], gate_up[e, w : 2 * w] = wg[e, :w], wu[e, :w]
        state[f"{prefix}w_gate_up"], state[f"{prefix}w_down_t"] = gate_up, wd.transpose(1, 2).contiguous()


def _split_mlp(module, state, prefix, *args) -> None:
    """The fused layout -> checkpoint names (gate_proj/up_proj, w_gate/w_up/w_down)."""
    fused = state.pop(f"{prefix}gate_up_proj.weight", None)
    if fused is not None:
        state[f"{prefix}gate_proj.weight"], state[f"{prefix}up_proj.weight"] = fused.chunk(2)
    gate_up, down_t = state.pop(f"{prefix}w_gate_up", None), state.pop(f"{prefix}w_down_t", None)
    if gate_up is not None and down_t is not None:
        r = gate_up.shape[1] // 2
        wg = gate_up.new_zeros(gate_up.shape[0], r, gate_up.shape[2])
        wu = torch.zeros_like(wg)
        for e, w in enumerate(module.widths if r else []):
            wg[e, :w], wu[e, :w] = gate_up[e, :w], gate_up[e, w : 2 * w]
        state[f"{prefix}w_gate"], state[f"{prefix}w_up"], state[f"{prefix}w_down"] = (
            wg,
            wu,
            down_t.transpose(1, 2),
        )


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: dict,
        head_dim: int,
        shared: int,
        widths: list[int],
        routed_width: int,
        routed_weights: bool = True,
    ):
        super().__init__()
        eps = cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.self_attn = Attention(cfg, head_dim)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        act = cfg.get("hidden_act", "silu")
        self.mlp = MoEMLP(cfg["hidden_size"], shared, widths, routed_width, act, routed_weights)


class MoEForCausalLM(nn.Module):
    """The MoE decoder. `forward` takes a [B, L] batch; `forward_packed` a flat stream of segments."""

    def __init__(self, config: MoEConfig, routed_weights: bool = True):
        """routed_weights False: no memory for the routed experts (an expert store serves them)."""
        super().__init__()
        cfg = config.base
        self.config = config
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        r = config.routed_width
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, self.head_dim, s, widths, r, routed_weights)
            for s, widths in zip(config.shared_channels, config.expert_channels)
        )
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self._inv_freq = _inv_freq(cfg)  # kept float32 and out of .to(dtype): RoPE needs the precision
        self.quantized: str | None = None  # "int8" after pregate.quantize.quantize_model
        self.packed = False  # True after pregate.packed.pack_model
        self.native = None  # pregate.native.NativeDecoder: decode steps' layers as native calls

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def _apply(self, fn, *args, **kwargs):
        if self.packed:  # pregate.packed: opaque tensors no conversion reaches; refuse before any change
            probe = fn(torch.empty(0, dtype=torch.bfloat16))
            if probe.dtype != torch.bfloat16 or probe.device.type != "cpu":
                raise PregateError(
                    "a packed model stays bfloat16 on CPU; load the checkpoint again for another dtype or "
                    "device"
                )
        return super()._apply(fn, *args, **kwargs)

    @property
    def attention_dtype(self) -> torch.dtype:
        """dtype of RoPE, attention and the KV cache: float32 on CPU, where the half-precision attention
        kernels are slower than float32 (weights stay in their dtype), else the weights' dtype."""
        w = self.norm.weight  # never quantized: the compute dtype and device
        return torch.float32 if w.device.type == "cpu" else w.dtype

    def new_cache(self, capacity: int = 64, slots: int = 1) -> KVCache:
        """A KV cache for one sequence (slot 0), or a pool of `slots` for the serving engine."""
        w = self.norm.weight
        g = self.config.base["num_key_value_heads"]
        return KVCache(len(self.layers), g, self.head_dim, self.attention_dtype, w.device, capacity, slots)

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] for x * cos + roll(x, D/2) * sin, which is HF's x * cos + rotate_half(x) * sin:
        rolling swaps the halves, so the first half of sin carries rotate_half's minus sign."""
        inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[:, None].float() * inv_freq[None, :]  # [T, D/2]
        cos = torch.cat((freqs, freqs), dim=-1).cos()
        sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # [T, 1, D]

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        # lm_head None: tied to the float embedding (a quantized or packed model has a head of its own)
        return h @ self.embed_tokens.weight.T if self.lm_head is None else self.lm_head(h)

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        segments: list[Segment],
        routing: Routing | None,
        layer_router=None,
        scores: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        expert_source: ExpertSource | None = None,
    ) -> torch.Tensor:
        """input_ids [T] packed by segment -> logits [T, V] (or only at rows `logits_at`).

        routing: one Routing for all layers (pre-gating), or None with `layer_router(layer, h [T, H]) ->
        Routing` for a conventional per-layer gate. scores [L, T, E], when given, receives each expert's
        activation mass per layer (distillation targets and oracle routing). expert_source, when given,
        supplies routed-expert weights (offloading); it is told each layer's experts before they run.
        Caches advance by each segment's length.
        """
        if sum(s.length for s in segments) != input_ids.shape[0]:
            raise PregateError("segment lengths must add up to the number of tokens")
        for s in segments:
            if s.cache is not None:
                s.cache.reserve(s.past + s.length)
        positions = torch.cat([torch.arange(s.past, s.past + s.length) for s in segments]).to(
            input_ids.device
        )
        h = self.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rope(positions, self.attention_dtype)
        attention = AttentionPlan(segments, input_ids.device)
        step = None
        if self.native is not None and layer_router is None and scores is None and expert_source is None:
            step = self.native.step(attention, routing, h)  # a small step wholly, else its decode rows
        if step is None:
            plan = (
                RoutingPlan(routing, self.num_experts) if routing is not None and self.num_experts else None
            )
            for i in range(len(self.layers)):
                h = self._layer(i, h, cos, sin, attention, plan, layer_router, scores, expert_source)
        else:
            hd, hr = step.split(h)
            (cd, cr), (sd, sr) = step.split(cos), step.split(sin)
            hd = self.native.run(hd, cd, sd, step)  # every layer, one native call
            if hr is not None:  # other sequences: the order between the two parts does not matter
                for i in range(len(self.layers)):
                    hr = self._layer(i, hr, cr, sr, step.rest_attention, step.rest_plan)
            h = step.merge(hd, hr)
        for s in segments:
            if s.cache is not None:
                s.cache.lengths[s.slot] += s.length
        h = self.norm(h)
        return self.lm_logits(h if logits_at is None else h[logits_at])

    def _layer(self, i, h, cos, sin, attention, plan, layer_router=None, scores=None, expert_source=None):
        """Decoder layer i over the stream h [T, H] through torch (forward_packed's arguments)."""
        layer = self.layers[i]
        h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, attention, i)
        x = layer.post_attention_layernorm(h)
        layer_plan = plan
        if layer_router is not None:
            layer_plan = RoutingPlan(layer_router(i, x), self.num_experts)
        fetch = None
        if expert_source is not None and layer_plan is not None:
            expert_source.begin_layer(i, [e for e, _, _ in layer_plan.groups])
            fetch = functools.partial(expert_source.fetch, i)
        return h + layer.mlp(x, layer_plan, None if scores is None else scores[i], fetch)

    def forward(
        self, input_ids: torch.Tensor, routing: Routing | None = None, layer_router=None, scores=None
    ) -> torch.Tensor:
        """input_ids [B, L]; routing over the B*L tokens in row-major order -> logits [B, L, V]."""
        b, n = input_ids.shape
        segments = [Segment(n) for _ in range(b)]
        logits = self.forward_packed(input_ids.reshape(-1), segments, routing, layer_router, scores)
        return logits.view(b, n, -1)

    def expert_scores(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-layer activation mass of each routed expert when every expert runs: [L, B*L_tokens, E]."""
        t = input_ids.numel()
        scores = torch.zeros(len(self.layers), t, self.num_experts, device=input_ids.device)
        self.forward(input_ids, Routing.all_experts(t, self.num_experts, input_ids.device), scores=scores)
        return scores


def release_routed_experts(model: MoEForCausalLM) -> int:
    """Drop the stacked routed-expert weights from memory (an `ExpertStore` serves them from then on);
    returns the bytes freed. Everything else (attention, shared experts, embeddings) stays."""
    return sum(release_layer_experts(layer.mlp) for layer in model.layers)


def release_layer_experts(mlp: MoEMLP) -> int:
    """`release_routed_experts` for one layer: one layer at a time, a conversion that copies the experts
    (int8, packing) never holds two copies of all of them."""
    freed = 0
    for name in ("w_gate_up", "w_down_t"):
        w = getattr(mlp, name)
        freed += 0 if w.is_meta else w.numel() * w.element_size()
        device = "cpu" if w.is_meta else w.device  # a model built on the meta device (load_moe)
        empty = torch.empty(w.shape[0], 0, w.shape[2], dtype=w.dtype, device=device)
        setattr(mlp, name, nn.Parameter(empty, requires_grad=False))
    return freed


def _inv_freq(cfg: dict) -> torch.Tensor:
    """RoPE inverse frequencies, computed by transformers' own rope code so scaled variants match."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.for_model(**cfg)
    with torch.device("cpu"):  # also when the model is built on the meta device (load_moe)
        return LlamaRotaryEmbedding(config).inv_freq.clone()


# ----------------------------------------------------------------------------------------- building and I/O


def dense_weights(hf_model) -> dict[str, torch.Tensor]:
    """The non-MLP weights of a HF Llama-family model under our parameter names, plus the dense MLPs."""
    out = {}
    for name, tensor in hf_model.state_dict().items():
        name = name.removeprefix("model.")
        if name.startswith("lm_head") and hf_model.config.tie_word_embeddings:
            continue
        out[name] = tensor
    return out


def build_moe_from_dense(
    hf_model,
    shared_idx: list[torch.Tensor],
    expert_idx: list[list[torch.Tensor]],
    names=None,
    provenance=None,
) -> MoEForCausalLM:
    """Slice a dense model's MLPs into shared + routed experts.

    shared_idx[l]: channel indices of the shared expert of layer l; expert_idx[l][e]: channels of routed
    expert e in layer l. Attention, embeddings and norms are copied unchanged.
    """
    base = hf_model.config.to_dict()
    num_experts = len(expert_idx[0]) if expert_idx else 0
    config = MoEConfig(
        base=_plain_config(base),
        num_experts=num_experts,
        shared_channels=[len(s) for s in shared_idx],
        expert_channels=[[len(e) for e in row] for row in expert_idx],
        expert_names=list(names or [f"expert{i}" for i in range(num_experts)]),
        provenance=dict(provenance or {}),
    )
    dtype = next(hf_model.parameters()).dtype
    model = MoEForCausalLM(config).to(dtype)
    weights = dense_weights(hf_model)
    state = {}
    r = config.routed_width
    for name, tensor in weights.items():
        if ".mlp." not in name:
            state[name] = tensor
    for layer_no in range(config.num_layers):
        p = f"layers.{layer_no}.mlp."
        gate, up, down = (
            weights[p + "gate_proj.weight"],
            weights[p + "up_proj.weight"],
            weights[p + "down_proj.weight"],
        )
        s = shared_idx[layer_no].long()
        state[p + "gate_proj.weight"] = gate[s]
        state[p + "up_proj.weight"] = up[s]
        state[p + "down_proj.weight"] = down[:, s]
        wg = gate.new_zeros(num_experts, r, gate.shape[1])
        wu = gate.new_zeros(num_experts, r, gate.shape[1])
        wd = gate.new_zeros(num_experts, down.shape[0], r)
        index = torch.full((num_experts, r), -1, dtype=torch.long)
        for e, idx in enumerate(expert_idx[layer_no]):
            idx = idx.long()
            n = len(idx)
            wg[e, :n], wu[e, :n], wd[e, :, :n] = gate[idx], up[idx], down[:, idx]
            index[e, :n] = idx
        state[p + "w_gate"], state[p + "w_up"], state[p + "w_down"] = wg, wu, wd
        state[p + "shared_index"], state[p + "expert_index"] = s, index
    model.load_state_dict(state, strict=True)
    return model.eval()


def _plain_config(base: dict) -> dict:
    keep = {k: v for k, v in base.items() if not k.startswith("_") and k not in ("quantization_config",)}
    keep["dtype"] = str(keep.get("dtype", "float32")).removeprefix("torch.")
    return json.loads(json.dumps(keep, default=str))


def save_moe(model: MoEForCausalLM, out: Path) -> None:
    """Write config + safetensors weights into an existing (temporary) directory."""
    from safetensors.torch import save_file

    out = Path(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    (out / CONFIG_FILE).write_text(json.dumps(model.config.to_json(), indent=1))


ROUTED_KEYS = ("w_gate", "w_up", "w_down")  # checkpoint names of the stacked routed experts


def load_config(path: str | Path) -> MoEConfig:
    """The MoEConfig of a checkpoint directory, without reading weights; a clear PregateError when
    `path` is not a pregate MoE checkpoint or its config is damaged."""
    data = checkpoint.read_config(path)
    try:
        return MoEConfig.from_json(data)
    except (TypeError, KeyError) as err:
        raise PregateError(f"{Path(path) / CONFIG_FILE} is damaged ({err}); rewrite the checkpoint") from err


def load_moe(
    path: str | Path, dtype: torch.dtype | None = None, device=None, routed_experts: bool = True
) -> MoEForCausalLM:
    """Load a pregate MoE checkpoint directory; clear errors for foreign or truncated checkpoints.

    routed_experts False: the routed experts are never read or allocated (serving with an expert store
    that holds k of them), so memory stays below the whole model even at start-up."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    config = load_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise PregateError(f"{path} has no {WEIGHTS_FILE}: the checkpoint is incomplete")
    try:
        with safe_open(str(weights), framework="pt") as f:
            keep = [k for k in f.keys() if routed_experts or k.rsplit(".", 1)[-1] not in ROUTED_KEYS]
            if "embed_tokens.weight" in keep:
                dtype = dtype or f.get_slice("embed_tokens.weight")[0:1].dtype
            # converted as read: the checkpoint's float32 copy is never held whole beside the model
            state = {k: _cast(f.get_tensor(k), dtype) for k in keep}
    except (SafetensorError, OSError, ValueError) as err:
        raise PregateError(f"{weights} cannot be read ({err}): truncated or damaged checkpoint") from err
    if "embed_tokens.weight" not in state:
        raise PregateError(f"{weights} does not match its config (no embed_tokens.weight)")
    with torch.device("meta"):  # no memory and no random init: the checkpoint's tensors become the weights
        model = MoEForCausalLM(config, routed_weights=routed_experts)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if not routed_experts:  # left out on purpose: empty placeholders
        release_routed_experts(model)
        missing = [m for m in missing if not m.endswith((".w_gate_up", ".w_down_t"))]
    if missing or unexpected:
        raise PregateError(
            f"{weights} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(device=device, dtype=dtype).eval()


def _cast(t: torch.Tensor, dtype: torch.dtype | str | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t
