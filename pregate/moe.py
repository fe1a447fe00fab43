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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pregate.errors import PregateError

FORMAT = "pregate-moe"
FORMAT_VERSION = 1
CONFIG_FILE = "pregate_config.json"
WEIGHTS_FILE = "model.safetensors"

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


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
            raise PregateError(f"MoE config lists channels for {len(self.shared_channels)} layers, model has {n}")
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
        per_layer = [s + (sum(r) / len(r) if r else 0) for s, r in zip(self.shared_channels, self.expert_channels)]
        return sum(per_layer) / len(per_layer)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> "MoEConfig":
        if data.get("format") != FORMAT:
            raise PregateError("not a pregate MoE checkpoint (its pregate_config.json has the wrong format tag)")
        if data.get("version") != FORMAT_VERSION:
            raise PregateError(f"pregate MoE format version {data.get('version')} is not supported (need {FORMAT_VERSION})")
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        return cls(**fields)


ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [R, H], up [R, H], down [H, R]


class ExpertSource(Protocol):
    """Where routed-expert weights come from during a forward (an offloading store implements this)."""

    def begin_layer(self, layer: int, experts: list[int]) -> None: ...  # the experts this layer will use, in order
    def fetch(self, layer: int, expert: int) -> ExpertWeights: ...  # blocks until resident


# ----------------------------------------------------------------------------------------- routing


@dataclass
class Routing:
    """K experts per token with mixing weights. expert_ids [T, K] long, weights [T, K]."""

    expert_ids: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def top1(cls, expert_ids: torch.Tensor) -> "Routing":
        ids = expert_ids.reshape(-1, 1).long()
        return cls(ids, torch.ones(ids.shape, dtype=torch.float32, device=ids.device))

    @classmethod
    def all_experts(cls, num_tokens: int, num_experts: int, device=None) -> "Routing":
        """Every token uses every expert with weight 1: the dense-equivalent path (and oracle scoring)."""
        ids = torch.arange(num_experts, device=device).expand(num_tokens, num_experts)
        return cls(ids.contiguous(), torch.ones(num_tokens, num_experts, device=device))


class RoutingPlan:
    """Tokens grouped by expert once per forward; every layer reuses it.

    order [T*K]: token index of each (token, slot) assignment sorted by expert; weights [T*K] in that order;
    groups: (expert, start, end) slices of `order` for experts that have tokens.
    """

    def __init__(self, routing: Routing, num_experts: int):
        ids = routing.expert_ids
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
            raise PregateError(f"expert ids must lie in [0, {num_experts}), got [{int(ids.min())}, {int(ids.max())}]")
        flat = ids.reshape(-1)
        k = ids.shape[-1] if ids.dim() > 1 else 1
        sort = torch.argsort(flat, stable=True)
        self.order = sort // k
        self.weights = routing.weights.reshape(-1)[sort]
        counts = torch.bincount(flat, minlength=num_experts).tolist()
        self.groups: list[tuple[int, int, int]] = []
        start = 0
        for e, c in enumerate(counts):
            if c:
                self.groups.append((e, start, start + c))
            start += c
        self.num_tokens = ids.shape[0]

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
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache:
    """Keys and values of one sequence for every layer, grown in place (capacity doubles)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype=torch.float32, device=None, capacity: int = 64):
        self.k = [torch.empty(num_kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty_like(t) for t in self.k]
        self.length = 0  # tokens whose K/V are stored in every layer

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [G, n, D] after the cached ones; return all keys and values [G, length + n, D]."""
        n, end = k.shape[1], self.length + k.shape[1]
        if end > self.k[layer].shape[1]:
            cap = max(end, 2 * self.k[layer].shape[1])
            for store in (self.k, self.v):
                old = store[layer]
                new = old.new_empty(old.shape[0], cap, old.shape[2])
                new[:, : self.length] = old[:, : self.length]
                store[layer] = new
        self.k[layer][:, self.length : end] = k
        self.v[layer][:, self.length : end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(t.element_size() * t[:, : self.length].numel() for t in self.k + self.v)


@dataclass
class Segment:
    """A contiguous run of one sequence's tokens inside the flat stream; cache None means no past."""

    length: int
    cache: KVCache | None = None

    @property
    def past(self) -> int:
        return self.cache.length if self.cache is not None else 0


class Attention(nn.Module):
    def __init__(self, cfg: dict, head_dim: int):
        super().__init__()
        h, n, g = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        bias = bool(cfg.get("attention_bias", False)) or cfg["model_type"] == "qwen2"
        self.n_heads, self.n_kv, self.head_dim = n, g, head_dim
        self.q_proj = nn.Linear(h, n * head_dim, bias=bias)
        self.k_proj = nn.Linear(h, g * head_dim, bias=bias)
        self.v_proj = nn.Linear(h, g * head_dim, bias=bias)
        self.o_proj = nn.Linear(n * head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[Segment], layer: int) -> torch.Tensor:
        t, dtype = x.shape[0], cos.dtype  # the attention dtype (see attention_dtype)
        q = self.q_proj(x).to(dtype).view(t, self.n_heads, self.head_dim).transpose(0, 1)  # [N, T, D]
        k = self.k_proj(x).to(dtype).view(t, self.n_kv, self.head_dim).transpose(0, 1)  # [G, T, D]
        v = self.v_proj(x).to(dtype).view(t, self.n_kv, self.head_dim).transpose(0, 1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        gqa = self.n_heads != self.n_kv
        if all(s.cache is None for s in segments) and len({s.length for s in segments}) == 1:
            # Fast path (training, equal-length batches): one batched causal attention.
            b, n = len(segments), segments[0].length
            qb = q.view(self.n_heads, b, n, self.head_dim).transpose(0, 1)
            kb = k.view(self.n_kv, b, n, self.head_dim).transpose(0, 1)
            vb = v.view(self.n_kv, b, n, self.head_dim).transpose(0, 1)
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=gqa)  # [B, N, L, D]
            out = out.transpose(0, 1).reshape(self.n_heads, t, self.head_dim)
        else:
            outs, start = [], 0
            for seg in segments:
                end = start + seg.length
                qs, ks, vs = q[:, start:end], k[:, start:end], v[:, start:end]
                if seg.cache is not None:
                    ks, vs = seg.cache.append(layer, ks, vs)
                past = ks.shape[1] - seg.length
                if seg.length == 1:
                    mask = None  # one new token sees everything cached
                else:
                    # query i sits at position past + i and sees keys 0..past + i
                    mask = torch.ones(seg.length, ks.shape[1], dtype=torch.bool, device=x.device).tril(past)
                outs.append(F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=mask, enable_gqa=gqa)[0])
                start = end
            out = torch.cat(outs, dim=1)  # [N, T, D]
        return self.o_proj(out.transpose(0, 1).reshape(t, self.n_heads * self.head_dim).to(x.dtype))


class MoEMLP(nn.Module):
    """Shared expert on every token + each token's routed experts on their token groups.

    Routed weights are stacked: gate/up [E, R, H], down [E, H, R]. An expert narrower than R has zero rows
    at the end (act(0) * 0 = 0: padding adds nothing and receives no gradient); `widths` [E] are the true
    widths, and only those rows are computed.
    `shared_index` [S] and `expert_index` [E, R] (-1 = padding) record which dense channels each holds.
    """

    def __init__(self, hidden: int, shared: int, widths: list[int], routed_width: int, act: str):
        super().__init__()
        num_experts = len(widths)
        self.widths = list(widths)
        self.act = ACTIVATIONS[act]
        self.gate_proj = nn.Linear(hidden, shared, bias=False)
        self.up_proj = nn.Linear(hidden, shared, bias=False)
        self.down_proj = nn.Linear(shared, hidden, bias=False)
        self.w_gate = nn.Parameter(torch.zeros(num_experts, routed_width, hidden))
        self.w_up = nn.Parameter(torch.zeros(num_experts, routed_width, hidden))
        self.w_down = nn.Parameter(torch.zeros(num_experts, hidden, routed_width))
        self.register_buffer("shared_index", torch.zeros(shared, dtype=torch.long))
        self.register_buffer("expert_index", torch.full((num_experts, routed_width), -1, dtype=torch.long))

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[0]

    def forward(
        self,
        x: torch.Tensor,
        plan: RoutingPlan | None,
        scores: torch.Tensor | None = None,
        fetch: "Callable[[int], ExpertWeights] | None" = None,
    ) -> torch.Tensor:
        """x [T, H] -> [T, H]. If `scores` [T, E] is given, add each expert's activation mass sum|a| per token.

        fetch(e) -> (gate [R, H], up [R, H], down [H, R]) supplies expert weights from elsewhere (an offloading
        store); by default they are this module's own stacked parameters.
        """
        out = self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        if plan is None or not plan.groups or not any(self.widths):
            return out
        xs = x[plan.order]  # [T*K, H] grouped by expert
        if fetch is None:
            if self.w_gate.shape[1] == 0:
                raise PregateError("this model's routed experts were released to an expert store; pass expert_source")
            # unbind, not w[e]: its backward stacks E gradients once instead of E full-size zero tensors
            own = list(zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0)))
        ys = []
        for e, start, end in plan.groups:
            gate, up, down = own[e] if fetch is None else fetch(e)  # [R, H], [R, H], [H, R]
            w = self.widths[e]
            gate, up, down = gate[:w], up[:w], down[:, :w]  # the padding rows would only add zeros
            xe = xs[start:end]
            a = self.act(xe @ gate.T) * (xe @ up.T)  # [n, w]
            if scores is not None:
                scores[plan.order[start:end], e] += a.detach().abs().sum(-1).float()
            ys.append((a @ down.T) * plan.weights[start:end, None].to(a.dtype))
        return out.index_add(0, plan.order, torch.cat(ys))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, head_dim: int, shared: int, widths: list[int], routed_width: int):
        super().__init__()
        eps = cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.self_attn = Attention(cfg, head_dim)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.mlp = MoEMLP(cfg["hidden_size"], shared, widths, routed_width, cfg.get("hidden_act", "silu"))


class MoEForCausalLM(nn.Module):
    """The MoE decoder. `forward` takes a [B, L] batch; `forward_packed` a flat stream of segments."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        cfg = config.base
        self.config = config
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        r = config.routed_width
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, self.head_dim, s, widths, r) for s, widths in zip(config.shared_channels, config.expert_channels)
        )
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self._inv_freq = _inv_freq(cfg)  # kept float32 and out of .to(dtype): RoPE needs the precision

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def attention_dtype(self) -> torch.dtype:
        """dtype of RoPE, attention and the KV cache: float32 on CPU, where the half-precision attention
        kernels are slower than float32 (weights stay in their dtype), else the weights' dtype."""
        w = self.embed_tokens.weight
        return torch.float32 if w.device.type == "cpu" else w.dtype

    def new_cache(self, capacity: int = 64) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(len(self.layers), self.config.base["num_key_value_heads"], self.head_dim, self.attention_dtype, w.device, capacity)

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[:, None].float() * inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[None], emb.sin().to(dtype)[None]  # [1, T, D]

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.embed_tokens.weight.T if self.tied else self.lm_head(h)

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
        positions = torch.cat([torch.arange(s.past, s.past + s.length) for s in segments]).to(input_ids.device)
        h = self.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rope(positions, self.attention_dtype)
        plan = RoutingPlan(routing, self.num_experts) if routing is not None and self.num_experts else None
        for i, layer in enumerate(self.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, segments, i)
            x = layer.post_attention_layernorm(h)
            layer_plan = plan
            if layer_router is not None:
                layer_plan = RoutingPlan(layer_router(i, x), self.num_experts)
            fetch = None
            if expert_source is not None and layer_plan is not None:
                expert_source.begin_layer(i, [e for e, _, _ in layer_plan.groups])
                fetch = lambda e, i=i: expert_source.fetch(i, e)
            h = h + layer.mlp(x, layer_plan, None if scores is None else scores[i], fetch)
        for s in segments:
            if s.cache is not None:
                s.cache.advance(s.length)
        h = self.norm(h)
        return self.lm_logits(h if logits_at is None else h[logits_at])

    def forward(self, input_ids: torch.Tensor, routing: Routing | None = None, layer_router=None, scores=None) -> torch.Tensor:
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
    freed = 0
    for layer in model.layers:
        mlp = layer.mlp
        for name in ("w_gate", "w_up", "w_down"):
            w = getattr(mlp, name)
            freed += w.numel() * w.element_size()
            shape = (w.shape[0], w.shape[1], 0) if name == "w_down" else (w.shape[0], 0, w.shape[2])
            setattr(mlp, name, nn.Parameter(w.new_empty(shape), requires_grad=False))
    return freed


def _inv_freq(cfg: dict) -> torch.Tensor:
    """RoPE inverse frequencies, computed by transformers' own rope code so scaled variants match."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.for_model(**cfg)
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


def build_moe_from_dense(hf_model, shared_idx: list[torch.Tensor], expert_idx: list[list[torch.Tensor]], names=None, provenance=None) -> MoEForCausalLM:
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
    for l in range(config.num_layers):
        p = f"layers.{l}.mlp."
        gate, up, down = weights[p + "gate_proj.weight"], weights[p + "up_proj.weight"], weights[p + "down_proj.weight"]
        s = shared_idx[l].long()
        state[p + "gate_proj.weight"] = gate[s]
        state[p + "up_proj.weight"] = up[s]
        state[p + "down_proj.weight"] = down[:, s]
        wg = gate.new_zeros(num_experts, r, gate.shape[1])
        wu = gate.new_zeros(num_experts, r, gate.shape[1])
        wd = gate.new_zeros(num_experts, down.shape[0], r)
        index = torch.full((num_experts, r), -1, dtype=torch.long)
        for e, idx in enumerate(expert_idx[l]):
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


def load_moe(path: str | Path, dtype: torch.dtype | None = None, device=None) -> MoEForCausalLM:
    """Load a pregate MoE checkpoint directory; clear errors for foreign or truncated checkpoints."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise PregateError(f"{path} is not a directory; give a checkpoint written by `pregate refactor`")
    if not cfg_file.is_file():
        raise PregateError(f"{path} is not a pregate MoE checkpoint (no {CONFIG_FILE}); make one with `pregate refactor`")
    try:
        config = MoEConfig.from_json(json.loads(cfg_file.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise PregateError(f"{cfg_file} is damaged ({err}); rewrite the checkpoint") from err
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise PregateError(f"{path} has no {WEIGHTS_FILE}: the checkpoint is incomplete")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise PregateError(f"{weights} cannot be read ({err}): truncated or damaged checkpoint") from err
    model = MoEForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PregateError(f"{weights} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    dtype = dtype or state["embed_tokens.weight"].dtype
    return model.to(device=device, dtype=dtype).eval()
