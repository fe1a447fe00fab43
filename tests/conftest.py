"""Shared fixtures: tiny random Llama-family models (float32, CPU) built with transformers itself."""

import pytest
import torch


def tiny_hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A random HF causal LM of the given family, small enough for exact float32 comparisons."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=model_type == "llama",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF initialises small; larger weights make equivalence tests meaningful
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(params=["llama", "qwen2"])
def hf_model(request):
    return tiny_hf_model(request.param)
