"""Configuration of a pre-gated Mixture-of-Experts causal LM exported by `pregate export`.

This file ships inside every exported Hugging Face directory (config.json's `auto_map` points at it) and
is loaded with `trust_remote_code=True`; it imports only the standard library and transformers. pregate
copies it verbatim from `pregate/configuration_pregate.py`.

The backbone fields are those of the dense Llama-family parent (Llama, SmolLM, Qwen2, Mistral). The MoE
fields describe the experts: `shared_channels[l]` is the width of layer l's shared expert (always runs),
`expert_channels[l][e]` the true width of routed expert e (its stacked weights are zero-padded to the
widest). `router` is the pre-gating router's shape (a dict, as pregate's `RouterConfig.to_dict()` writes
it), or None for a model without routed experts.
"""

from __future__ import annotations

from dataclasses import field

from transformers import PreTrainedConfig


class PregateConfig(PreTrainedConfig):
    model_type = "pregate_moe"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # biases on q/k/v (Qwen2); o_proj never has one
    rope_parameters: dict | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 1
    shared_channels: list[int] = field(default_factory=list)
    expert_channels: list[list[int]] = field(default_factory=list)
    expert_names: list[str] = field(default_factory=list)
    router: dict | None = None
    parent_model_type: str = "llama"

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)  # turns a legacy rope_theta / rope_scaling into rope_parameters
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        layers = self.num_hidden_layers
        for name in ("shared_channels", "expert_channels"):
            given = len(getattr(self, name))
            if given and given != layers:
                raise ValueError(f"{name} lists {given} layers, the model has num_hidden_layers={layers}")
        if any(len(row) != self.num_experts for row in self.expert_channels):
            raise ValueError(f"expert_channels: every layer must list num_experts={self.num_experts} widths")
        if self.num_experts and self.router is None:
            raise ValueError(f"num_experts={self.num_experts} needs a router config (router=None)")

    @property
    def routed_width(self) -> int:
        """R: the padded width of the stacked routed experts."""
        return max((max(row) for row in self.expert_channels if row), default=0)


__all__ = ["PregateConfig"]
