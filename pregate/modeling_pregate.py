"""A pre-gated Mixture-of-Experts causal LM (Read-ME) as a self-contained Hugging Face model.

This file ships inside every directory written by `pregate export` (config.json's `auto_map` points at
it) and loads with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. It imports only
torch and transformers; pregate copies it verbatim from `pregate/modeling_pregate.py`.

Pre-gating runs inside `forward`: a small causal transformer over token ids (`PregateRouter`) picks each
token's K routed experts once, before the backbone runs, and every MoE layer uses that choice. Each MLP
is a shared expert (runs on every token) plus E routed experts stored stacked, gate/up [E, R, H] and
down [E, H, R], zero-padded past each expert's true width (`config.expert_channels`).

Equivalence contract: this model equals pregate's `MoEForCausalLM` under its router's routing, and
greedy `generate` equals pregate's serving engine (tests/test_export.py). When the shared and routed
channels together cover every dense channel and every token uses all experts, it equals the dense parent.

Cache: the router is autoregressive, so a decode step needs the router's keys/values of the past tokens.
They live in the same standard `DynamicCache` as the backbone's, at layer indices num_hidden_layers + j
(j = router layer). Everything transformers does to a cache (beam reordering, repeating for
num_return_sequences, cropping) then applies to the router's state too, a decode step routes one new
token in O(past) like pregate's engine (`PreGatingRouter.step`), and a caller's own loop over `forward`
with a `DynamicCache` routes correctly without passing the earlier ids again.

Padding: a 2-D `attention_mask` masks padded keys in the backbone and in the router, and `position_ids`
(generate derives them from the mask) place both RoPEs, so a left-padded row equals the same row alone.

Legend: B batch, L tokens in this call, P tokens already cached, T = P + L, H hidden, N query heads,
G key/value heads, D head dim, E routed experts, K experts per token, R padded routed width, V vocab;
router: Dr width, Nr heads, Dh head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_pregate import PregateConfig

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_mask_4d(
    attention_mask: torch.Tensor | None, length: int, past: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """(mask [B, 1, L, T] bool or None, is_causal) for scaled_dot_product_attention.

    Query i sits at cache index past + i and sees keys 0..past + i that are not padding; it always sees
    itself, so a padded query row stays finite (its output is never used).
    """
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    if not padded:
        if past == 0:
            return None, length > 1
        if length == 1:
            return None, False  # one new token sees everything cached
    total = past + length
    causal = torch.ones(length, total, dtype=torch.bool, device=device).tril(past)  # [L, T]
    if not padded:
        return causal[None, None], False
    if attention_mask.dim() != 2 or attention_mask.shape[1] != total:
        shape = tuple(attention_mask.shape)
        raise ValueError(f"attention_mask must be 2-D [batch, past + new tokens = {total}], got {shape}")
    keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    key_index = torch.arange(total, device=device)
    own = key_index[None, :] == (past + torch.arange(length, device=device))[:, None]  # [L, T]: key past + i
    return (causal & keys) | own, False


class PregateRMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------------------- router


class PregateRouterAttention(nn.Module):
    def __init__(self, dim: int, heads: int, layer_idx: int):
        super().__init__()
        self.heads, self.head_dim, self.layer_idx = heads, dim // heads, layer_idx
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin, mask, is_causal, cache: Cache | None) -> torch.Tensor:
        """x [B, L, Dr], cos/sin [B, 1, L, Dh] -> [B, L, Dr]."""
        b, length, _ = x.shape
        qkv = self.qkv_proj(x).view(b, length, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, Nr, L, Dh]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, Nr, T, Dh]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.o_proj(y.transpose(1, 2).reshape(b, length, -1))


class PregateRouterMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PregateRouterBlock(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg["dim"], eps=cfg["norm_eps"])
        self.attn = PregateRouterAttention(cfg["dim"], cfg["n_heads"], layer_idx)
        self.mlp_norm = nn.RMSNorm(cfg["dim"], eps=cfg["norm_eps"])
        self.mlp = PregateRouterMLP(cfg["dim"], cfg["mlp_hidden"])

    def forward(self, x, cos, sin, mask, is_causal, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.mlp_norm(x))


class PregateDSelectHead(nn.Module):
    """DSelect-k: K binary-encoded selectors mixed by softmax(alpha); returns log q [.., E]."""

    def __init__(self, dim: int, num_experts: int, k: int, gamma: float):
        super().__init__()
        self.num_experts, self.k, self.gamma = num_experts, k, gamma
        self.code_bits = max(1, math.ceil(math.log2(num_experts)))
        self.z_proj = nn.Linear(dim, k * self.code_bits)
        self.alpha_proj = nn.Linear(dim, k)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g = self.gamma
        z = self.z_proj(h).unflatten(-1, (self.k, self.code_bits))  # [.., K, M]
        cubic = -2.0 / g**3 * z**3 + 3.0 / (2.0 * g) * z + 0.5  # the smooth step
        s = torch.where(z <= -g / 2, torch.zeros_like(z), torch.where(z >= g / 2, torch.ones_like(z), cubic))
        codes = torch.arange(self.num_experts, device=h.device)
        bits = ((codes[:, None] >> torch.arange(self.code_bits, device=h.device)) & 1).to(z.dtype)  # [E, M]
        s = s.unsqueeze(-2)  # [.., K, 1, M]
        r = (bits * s + (1 - bits) * (1 - s)).prod(dim=-1)  # [.., K, E]
        total = r.sum(dim=-1, keepdim=True)
        ok = total > 0
        r = torch.where(ok, r / torch.where(ok, total, torch.ones_like(total)), 1.0 / self.num_experts)
        mix = torch.softmax(self.alpha_proj(h), dim=-1)  # [.., K]
        q = (mix.unsqueeze(-1) * r).sum(dim=-2)  # [.., E]
        return q.clamp_min(torch.finfo(q.dtype).tiny).log()


class PregateRouter(nn.Module):
    """Pre-gating router: embedding -> blocks (RMSNorm, causal RoPE attention, RMSNorm, SwiGLU) -> RMSNorm
    -> head; top-k of softmax(logits), weights renormalised (k = 1: the argmax with weight 1).

    Its keys/values sit in the backbone's cache at layer indices `first_cache_layer + j`.
    """

    def __init__(self, cfg: dict, first_cache_layer: int):
        super().__init__()
        self.cfg = cfg
        self.first_cache_layer = first_cache_layer
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["dim"])
        self.layers = nn.ModuleList(
            PregateRouterBlock(cfg, first_cache_layer + j) for j in range(cfg["n_layers"])
        )
        self.norm = nn.RMSNorm(cfg["dim"], eps=cfg["norm_eps"])
        if cfg["head"] == "softmax":
            self.head = nn.Linear(cfg["dim"], cfg["num_experts"], bias=False)
        else:
            self.head = PregateDSelectHead(cfg["dim"], cfg["num_experts"], cfg["top_k"], cfg["dselect_gamma"])

    def rope(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] -> cos, sin [B, 1, L, Dh], computed in float64 as pregate's tables are."""
        dh = self.cfg["dim"] // self.cfg["n_heads"]
        steps = torch.arange(0, dh, 2, dtype=torch.float64, device=position_ids.device)
        inv_freq = 1.0 / self.cfg["rope_theta"] ** (steps / dh)
        angles = position_ids.to(torch.float64)[..., None] * inv_freq  # [B, L, Dh/2]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().float().to(dtype)[:, None], angles.sin().float().to(dtype)[:, None]

    def forward(self, input_ids, position_ids, mask, is_causal, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, L] -> (expert_ids [B, L, K] long, weights [B, L, K] float32)."""
        x = self.embed_tokens(input_ids)  # [B, L, Dr]
        if cache is not None:
            # Make room for the router's cache layers in a cache built for the backbone's layers only.
            while len(cache.layers) < self.first_cache_layer + len(self.layers):
                cache.layers.append(DynamicLayer())
        cos, sin = self.rope(position_ids, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, mask, is_causal, cache)
        logits = self.head(self.norm(x))  # [B, L, E]
        k = self.cfg["top_k"]
        if k == 1:
            ids = logits.argmax(dim=-1, keepdim=True)
            return ids, torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
        weights, ids = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
        return ids, weights / weights.sum(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------- backbone


class PregateAttention(nn.Module):
    def __init__(self, config: PregateConfig, layer_idx: int):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(h, self.heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)

    def forward(self, x, cos, sin, mask, is_causal, cache: Cache | None) -> torch.Tensor:
        """x [B, L, H], cos/sin [B, 1, L, D] -> [B, L, H]."""
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.heads, self.head_dim).transpose(1, 2)  # [B, N, L, D]
        k = self.k_proj(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, G, L, D]
        v = self.v_proj(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, G, T, D]
        gqa = self.heads != self.kv_heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, self.heads * self.head_dim))


class PregateSharedExpert(nn.Module):
    """The channels every token uses: a plain gated MLP of width S."""

    def __init__(self, hidden: int, width: int, act):
        super().__init__()
        self.act = act
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PregateExperts(nn.Module):
    """E routed experts stacked: gate_proj, up_proj [E, R, H], down_proj [E, H, R].

    Expert e's true width is widths[e]; rows past it are zeros (they would add act(0) * 0 = 0) and are
    skipped. The loop over experts is the plain reference; pregate serves the same math grouped by expert.
    """

    def __init__(self, hidden: int, widths: list[int], width: int, act):
        super().__init__()
        num = len(widths)
        self.widths = list(widths)
        self.act = act
        self.gate_proj = nn.Parameter(torch.zeros(num, width, hidden))
        self.up_proj = nn.Parameter(torch.zeros(num, width, hidden))
        self.down_proj = nn.Parameter(torch.zeros(num, hidden, width))

    def forward(self, x, out, expert_ids, weights) -> torch.Tensor:
        """Add to out [n, H] each token's experts on x [n, H]: expert_ids [n, K] long, weights [n, K]."""
        for e, w in enumerate(self.widths):
            token, slot = torch.where(expert_ids == e)  # [m] each
            if w == 0 or token.numel() == 0:
                continue
            xe = x[token]  # [m, H]
            a = self.act(xe @ self.gate_proj[e, :w].T) * (xe @ self.up_proj[e, :w].T)  # [m, w]
            y = (a @ self.down_proj[e, :, :w].T) * weights[token, slot, None].to(a.dtype)  # [m, H]
            out = out.index_add(0, token, y)
        return out


class PregateMoEMLP(nn.Module):
    def __init__(self, config: PregateConfig, layer_idx: int):
        super().__init__()
        act = _ACTIVATIONS[config.hidden_act]
        self.shared = PregateSharedExpert(config.hidden_size, config.shared_channels[layer_idx], act)
        widths = config.expert_channels[layer_idx] if config.num_experts else []
        # stacked to R, the widest expert of any layer (what pregate stores)
        self.experts = PregateExperts(config.hidden_size, widths, config.routed_width, act)

    def forward(self, x, expert_ids, weights) -> torch.Tensor:
        """x [B, L, H], expert_ids/weights [B, L, K] (None: no routed experts) -> [B, L, H]."""
        out = self.shared(x)
        if expert_ids is None or not any(self.experts.widths):
            return out
        h, k = x.shape[-1], expert_ids.shape[-1]
        flat_ids, flat_w = expert_ids.reshape(-1, k), weights.reshape(-1, k)  # [B*L, K]
        return self.experts(x.reshape(-1, h), out.reshape(-1, h), flat_ids, flat_w).view(x.shape)


class PregateDecoderLayer(nn.Module):
    def __init__(self, config: PregateConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = PregateRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = PregateAttention(config, layer_idx)
        self.post_attention_layernorm = PregateRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = PregateMoEMLP(config, layer_idx)

    def forward(self, h, cos, sin, mask, is_causal, cache, expert_ids, weights) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, is_causal, cache)
        return h + self.mlp(self.post_attention_layernorm(h), expert_ids, weights)


class PregatePreTrainedModel(PreTrainedModel):
    config_class = PregateConfig
    base_model_prefix = "model"
    _no_split_modules = ["PregateDecoderLayer", "PregateRouter"]
    _keep_in_fp32_modules_strict = ["router"]  # pregate routes in float32 whatever the backbone's dtype
    _supports_sdpa = True


class PregateModel(PregatePreTrainedModel):
    """Embeddings, decoder layers and final norm; routing comes from the caller (the CausalLM's router)."""

    def __init__(self, config: PregateConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PregateDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = PregateRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def rope(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] -> cos, sin [B, 1, L, D] (float32 angles, as transformers' Llama)."""
        rope_type = self.config.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            d = self.config.head_dim
            steps = torch.arange(0, d, 2, dtype=torch.int64, device=position_ids.device).float()
            inv_freq = 1.0 / (self.config.rope_parameters["rope_theta"] ** (steps / d))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](self.config, position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)  # [B, L, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(dtype)[:, None], (emb.sin() * scaling).to(dtype)[:, None]

    def forward(self, input_ids, position_ids, mask, is_causal, cache, expert_ids, weights) -> torch.Tensor:
        """input_ids [B, L] -> final hidden states [B, L, H]."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, is_causal, cache, expert_ids, weights)
        return self.norm(h)


class PregateForCausalLM(PregatePreTrainedModel, GenerationMixin):
    """Router + backbone + LM head. `forward(input_ids, ...)` pre-gates, then runs every layer."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PregateConfig):
        super().__init__(config)
        self.model = PregateModel(config)
        self.router = None
        if config.num_experts:
            self.router = PregateRouter(config.router, first_cache_layer=config.num_hidden_layers)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def route(self, input_ids, position_ids=None, attention_mask=None, cache=None):
        """The router's choice for input_ids [B, L] after the cached tokens: expert_ids, weights [B, L, K]."""
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
            position_ids = position_ids.expand(input_ids.shape[0], -1)
        mask, is_causal = attention_mask_4d(attention_mask, input_ids.shape[1], past, input_ids.device)
        return self.router(input_ids, position_ids, mask, is_causal, cache)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, L] (after `cache`'s tokens) -> logits [B, L, V] (or the last `logits_to_keep`)."""
        if input_ids is None:
            raise ValueError("PregateForCausalLM needs input_ids: the pre-gating router reads token ids")
        if inputs_embeds is not None:
            raise ValueError("PregateForCausalLM cannot take inputs_embeds: the router routes token ids")
        cache = kwargs.pop("past_key_values", None) if cache is None else cache  # older callers' name
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        b, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0  # layer 0: the backbone's
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=input_ids.device)[None].expand(b, -1)
        mask, is_causal = attention_mask_4d(attention_mask, length, past, input_ids.device)
        expert_ids = weights = None
        if self.router is not None:
            # pre-gating: one choice per token, before the backbone runs, used by every layer
            expert_ids, weights = self.router(input_ids, position_ids, mask, is_causal, cache)  # [B, L, K]
        h = self.model(input_ids, position_ids, mask, is_causal, cache, expert_ids, weights)  # [B, L, H]
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)  # [B, L, V]
        loss = None
        if labels is not None:
            shift = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            loss = F.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)


__all__ = ["PregateForCausalLM", "PregateModel", "PregatePreTrainedModel"]
