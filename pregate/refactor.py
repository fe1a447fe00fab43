"""`pregate refactor`: from activation statistics to masks, experts and a MoE checkpoint (Read-ME).

Per domain d and layer l keep the top `remain_rate` channels by mean |a| (the domain mask). The shared
expert is the intersection of all domain masks; routed expert d is domain d's mask minus the shared
channels. A same-size dense control keeps, per layer, as many channels as a token activates in the MoE
(shared + mean routed width), ranked by statistics pooled over all domains.

This module owns the refactoring: its typed configuration `RefactorConfig` with the named presets
`REFACTOR_PRESETS`, the channel selection and `refactor()`, which writes the checkpoint layout of
`checkpoint`. Imports from the package: `errors`, `checkpoint`, `data`, `hub`, `stats` and `moe`.

Legend: D domains (= routed experts), L layers, I MLP channels.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from pregate import data, hub, stats
from pregate.checkpoint import CONTROL_DIR, RECORD_FILE, STATS_FILE, atomic_dir, parse_dtype
from pregate.errors import PregateError
from pregate.moe import build_moe_from_dense, save_moe


@dataclass
class RefactorConfig:
    """How `pregate refactor` turns a dense model into a MoE (SPEC section 1)."""

    domains: list[str] = field(default_factory=lambda: list(data.DOMAIN_NAMES))
    tokens_per_domain: int = 16 * 4096  # the paper: ~16 x 4096 tokens per domain
    block_len: int = 512
    remain_rate: float = 0.5  # fraction of MLP channels each domain keeps
    seed: int = 0
    dtype: str = "bfloat16"  # dtype of the written checkpoint (statistics are always float32)
    batch_size: int = 4

    def __post_init__(self):
        if not 0.0 < self.remain_rate <= 1.0:
            raise PregateError(f"remain_rate must lie in (0, 1], got {self.remain_rate}")
        if not self.domains:
            raise PregateError("domains: give at least one domain")
        if len(set(self.domains)) != len(self.domains):
            raise PregateError(f"domains: {self.domains} lists a domain twice")
        if self.block_len < 2:
            raise PregateError(f"block_len must be >= 2, got {self.block_len}")
        if self.tokens_per_domain < self.block_len:
            raise PregateError(
                f"tokens_per_domain ({self.tokens_per_domain}) must be at least block_len ({self.block_len})"
            )
        if self.batch_size < 1:
            raise PregateError(f"batch_size must be >= 1, got {self.batch_size}")
        parse_dtype(self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


REFACTOR_PRESETS = {
    "paper": RefactorConfig(),
    # make demo: the seven domains on a budget that runs in a few minutes on 2 CPU cores
    "demo": RefactorConfig(tokens_per_domain=8192, block_len=512),
    "tiny": RefactorConfig(tokens_per_domain=256, block_len=64, dtype="float32"),
}


def domain_masks(means: torch.Tensor, remain_rate: float) -> torch.Tensor:
    """means [D, L, I] -> bool [D, L, I]: the top round(remain_rate * I) channels per domain and layer."""
    keep = max(1, round(remain_rate * means.shape[-1]))
    top = means.topk(keep, dim=-1).indices
    return torch.zeros_like(means, dtype=torch.bool).scatter_(-1, top, True)


def expert_channels(masks: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """masks [D, L, I] -> (shared[layer] indices, routed[layer][d] indices), sorted ascending."""
    shared_mask = masks.all(dim=0)  # [L, I]
    shared = [torch.nonzero(shared_mask[layer]).flatten() for layer in range(masks.shape[1])]
    routed = [
        [torch.nonzero(masks[d, layer] & ~shared_mask[layer]).flatten() for d in range(masks.shape[0])]
        for layer in range(masks.shape[1])
    ]
    return shared, routed


def control_channels(means: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """Top `widths[i]` channels of layer i by statistics pooled (averaged) over domains; means [D, L, I]."""
    pooled = means.mean(dim=0)  # [L, I]
    return [pooled[i].topk(w).indices.sort().values for i, w in enumerate(widths)]


def collect_statistics(hf_model, tokenizer, cfg: RefactorConfig) -> torch.Tensor:
    """Per-domain channel means on each domain's train split -> [D, L, I] float32."""
    blocks = {
        d: data.token_blocks(tokenizer, d, "train", cfg.tokens_per_domain, cfg.block_len) for d in cfg.domains
    }
    return torch.stack(
        [
            stats.channel_means(hf_model, blocks[d], cfg.batch_size, desc=f"statistics {d}")
            for d in cfg.domains
        ]
    )


def refactor(
    base: str,
    out: str | Path,
    cfg: RefactorConfig,
    force: bool = False,
    cache: str | None = None,
    custom_domains: dict | None = None,
) -> Path:
    """Refactor dense `base` into a MoE checkpoint at `out` (and its same-size dense control in out/control).

    custom_domains {name: path}: user domains (already registered) to record, so evaluation can find them
    again.
    """
    out = Path(out)
    if out.exists() and not force:  # fail before minutes of statistics, not after
        raise PregateError(f"{out} already exists; choose another --out or pass --force to replace it")
    for d in cfg.domains:
        data.domain_info(d)
    torch.manual_seed(cfg.seed)
    hf_model, tokenizer = hub.load_dense(base, torch.float32, cache)
    means = collect_statistics(hf_model, tokenizer, cfg)
    masks = domain_masks(means, cfg.remain_rate)
    shared, routed = expert_channels(masks)
    provenance = {
        "base": base,
        "domains": cfg.domains,
        "tokens_per_domain": cfg.tokens_per_domain,
        "remain_rate": cfg.remain_rate,
        "custom_domains": {d: p for d, p in (custom_domains or {}).items() if d in cfg.domains},
        "refactor_config": cfg.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    dtype = parse_dtype(cfg.dtype)
    moe = build_moe_from_dense(hf_model, shared, routed, names=cfg.domains, provenance=provenance)
    widths = [
        round(moe.config.shared_channels[layer] + sum(r) / len(r))
        for layer, r in enumerate(moe.config.expert_channels)
    ]
    control = build_moe_from_dense(
        hf_model,
        control_channels(means, widths),
        [[] for _ in widths],
        names=[],
        provenance={**provenance, "kind": "same-size dense control", "channels_per_layer": widths},
    )
    with atomic_dir(out, force) as tmp:
        save_moe(moe.to(dtype), tmp)
        tokenizer.save_pretrained(tmp)
        save_file(
            {"means": means.contiguous()},
            str(tmp / STATS_FILE),
            metadata={"domains": json.dumps(cfg.domains)},
        )
        record = {
            **provenance,
            "channels_per_layer": {
                "total": hf_model.config.intermediate_size,
                "shared": moe.config.shared_channels,
                "routed": dict(zip(cfg.domains, map(list, zip(*moe.config.expert_channels)))),
                "control": widths,
            },
            "activated_channels_mean": moe.config.activated_channels(),
        }
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))
        (tmp / CONTROL_DIR).mkdir()
        save_moe(control.to(dtype), tmp / CONTROL_DIR)
        tokenizer.save_pretrained(tmp / CONTROL_DIR)
    return out
