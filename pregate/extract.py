"""From activation statistics to masks, experts and a physical MoE checkpoint (Read-ME refactoring).

Per domain d and layer l keep the top `remain_rate` channels by mean |a| (the domain mask). The shared
expert is the intersection of all domain masks; routed expert d is domain d's mask minus the shared
channels. A same-size dense control keeps, per layer, as many channels as a token activates in the MoE
(shared + mean routed width), ranked by statistics pooled over all domains.

Legend: D domains (= routed experts), L layers, I MLP channels.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pregate import data, hub, stats
from pregate.config import RefactorConfig, parse_dtype
from pregate.errors import PregateError
from pregate.moe import build_moe_from_dense, save_moe

STATS_FILE = "stats.safetensors"
RECORD_FILE = "refactor.json"
CONTROL_DIR = "control"


def domain_masks(means: torch.Tensor, remain_rate: float) -> torch.Tensor:
    """means [D, L, I] -> bool [D, L, I]: the top round(remain_rate * I) channels per domain and layer."""
    keep = max(1, round(remain_rate * means.shape[-1]))
    top = means.topk(keep, dim=-1).indices
    return torch.zeros_like(means, dtype=torch.bool).scatter_(-1, top, True)


def expert_channels(masks: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """masks [D, L, I] -> (shared[l] indices, routed[l][d] indices), sorted ascending."""
    shared_mask = masks.all(dim=0)  # [L, I]
    shared = [torch.nonzero(shared_mask[l]).flatten() for l in range(masks.shape[1])]
    routed = [
        [torch.nonzero(masks[d, l] & ~shared_mask[l]).flatten() for d in range(masks.shape[0])]
        for l in range(masks.shape[1])
    ]
    return shared, routed


def control_channels(means: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """Top `widths[l]` channels of layer l by statistics pooled (averaged) over domains; means [D, L, I]."""
    pooled = means.mean(dim=0)  # [L, I]
    return [pooled[l].topk(w).indices.sort().values for l, w in enumerate(widths)]


@contextmanager
def atomic_dir(out: Path, force: bool):
    """Yield a temporary directory that replaces `out` only when the block finishes without error."""
    out = Path(out)
    if out.exists() and not force:
        raise PregateError(f"{out} already exists; choose another --out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{int(time.time())}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def collect_statistics(hf_model, tokenizer, cfg: RefactorConfig) -> torch.Tensor:
    """Per-domain channel means on each domain's train split -> [D, L, I] float32."""
    blocks = {d: data.token_blocks(tokenizer, d, "train", cfg.tokens_per_domain, cfg.block_len) for d in cfg.domains}
    return torch.stack(
        [stats.channel_means(hf_model, blocks[d], cfg.batch_size, desc=f"statistics {d}") for d in cfg.domains]
    )


def refactor(
    base: str, out: str | Path, cfg: RefactorConfig, force: bool = False, cache: str | None = None, custom_domains: dict | None = None
) -> Path:
    """Refactor dense `base` into a MoE checkpoint at `out` (and its same-size dense control in out/control).

    custom_domains {name: path}: user domains (already registered) to record, so evaluation can find them again.
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
    widths = [round(moe.config.shared_channels[l] + sum(r) / len(r)) for l, r in enumerate(moe.config.expert_channels)]
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
        save_file({"means": means.contiguous()}, str(tmp / STATS_FILE), metadata={"domains": json.dumps(cfg.domains)})
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


def load_statistics(moe_dir: str | Path) -> tuple[list[str], torch.Tensor]:
    path = Path(moe_dir) / STATS_FILE
    if not path.is_file():
        raise PregateError(f"{path} is missing: this checkpoint was not written by `pregate refactor`")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        domains = json.loads(f.metadata()["domains"])
    return domains, load_file(str(path))["means"]
