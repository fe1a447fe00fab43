"""Activation statistics of a dense model's MLPs.

For every layer and MLP channel c, the mean over tokens of |a_c|, where a = act(gate(x)) * up(x) is the
input of down_proj. Read-ME ranks channels per domain by this number to carve out experts.

Legend: L layers, I MLP channels, T tokens, B blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm


def mlp_modules(hf_model) -> list:
    """The gated MLP of every decoder layer (HF Llama-family layout: model.layers[i].mlp)."""
    return [layer.mlp for layer in hf_model.model.layers]


@contextmanager
def capture_mlp_inputs(hf_model) -> Iterator[list]:
    """Within the block, `captured[l]` holds layer l's down_proj input [..., I] of the latest forward."""
    captured: list = [None] * len(mlp_modules(hf_model))
    handles = []
    for i, mlp in enumerate(mlp_modules(hf_model)):

        def hook(_module, args, i=i):
            captured[i] = args[0].detach()

        handles.append(mlp.down_proj.register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def channel_means(
    hf_model, blocks: torch.Tensor, batch_size: int = 4, desc: str = "statistics"
) -> torch.Tensor:
    """Mean |act(gate x) * up x| per layer and channel over all tokens of `blocks` [B, n] -> [L, I] "
    "float32."""
    total = None
    tokens = 0
    with capture_mlp_inputs(hf_model) as captured:
        for start in tqdm(range(0, len(blocks), batch_size), desc=desc, unit="batch", leave=False):
            batch = blocks[start : start + batch_size]
            hf_model(input_ids=batch)
            sums = torch.stack([a.float().abs().sum(dim=(0, 1)) for a in captured])  # [L, I]
            total = sums if total is None else total + sums
            tokens += batch.numel()
    return total / tokens
