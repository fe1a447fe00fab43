"""Held-out perplexity per domain for the dense parent, the MoE under several routings, and the control.

Variants (all on the same test-split blocks of every domain):
- dense:      the parent model.
- moe_domain: every token of domain d routed to d's expert (only for domains that have an expert).
- moe_oracle: each token routed by the oracle routing (`router.oracle_experts` of the distillation
              scores `distill.normalised_scores`) of the activation mass the dense parent produced for it:
              the expert whose channels best cover the token's routed mass across layers, the expert a
              trained router's accuracy is measured against, and a bound for any token-level router.
- moe_random: a uniformly random expert per token (seeded): the floor.
- control:    the same-size dense control (as many channels per token as the MoE activates); for a
              checkpoint written by `pregate train`, the untrained one of the parent MoE it was trained from.
- moe_router: (trained checkpoints) routed by the trained router, its top-k experts with its weights.
- control_trained: (trained checkpoints) the control trained with the same tokens and recipe
  (<model>/control).
Variants a checkpoint cannot provide (no router, no control) are left out of the table.
With `quantize="int8"` the served variant is also run with weight-only int8 weights (pregate.quantize):
moe_router_int8 (trained checkpoints) or moe_oracle_int8, so the table shows what int8 costs.
Perplexity = exp(mean next-token cross-entropy over all predicted positions of the blocks).

Imports from the package: `errors`, `checkpoint`, `data`, `hub`, `stats`, `moe`, `quantize`, `router` and
`distill` (never the trainer).

Legend: B blocks, n block length, T = B*n tokens, L layers, E experts, I MLP channels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pregate import data, hub
from pregate.checkpoint import CONTROL_DIR, has_router
from pregate.distill import normalised_scores
from pregate.errors import PregateError
from pregate.moe import MoEForCausalLM, Routing, load_moe
from pregate.quantize import check_mode, quantize_model, quantize_router
from pregate.router import load_router, oracle_experts, routing_for
from pregate.stats import capture_mlp_inputs

PPL_VARIANTS = ("dense", "moe_domain", "moe_oracle", "moe_random", "control", "moe_router", "control_trained")


@dataclass
class PplConfig:
    domains: list[str] | None = None  # None: the experts' domains
    tokens_per_domain: int = 4096
    block_len: int = 512
    batch_size: int = 4
    variants: list[str] = field(default_factory=lambda: list(PPL_VARIANTS))
    seed: int = 0
    quantize: str | None = None  # "int8": add the int8 column of moe_router (or moe_oracle)

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in PPL_VARIANTS]
        if unknown:
            raise PregateError(f"unknown variant(s) {unknown}; choose from {', '.join(PPL_VARIANTS)}")
        check_mode(self.quantize)
        if self.block_len < 2 or self.tokens_per_domain < self.block_len:
            raise PregateError(
                f"need block_len >= 2 and tokens_per_domain >= block_len (got {self.block_len}, "
                f"{self.tokens_per_domain})"
            )


def expert_masks(moe: MoEForCausalLM, num_channels: int) -> torch.Tensor:
    """[L, E, I] float: 1 where routed expert e of layer l holds dense channel i."""
    masks = torch.zeros(len(moe.layers), moe.num_experts, num_channels)
    for layer_no, layer in enumerate(moe.layers):
        index = layer.mlp.expert_index  # [E, R], -1 = padding
        for e in range(moe.num_experts):
            idx = index[e][index[e] >= 0]
            masks[layer_no, e, idx] = 1.0
    return masks


def expert_mass(captured: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Activation mass sum |a| over each routed expert's channels, from the dense parent's MLP inputs
    (one [.., I] per layer) -> [L, T, E]: what `MoEForCausalLM.expert_scores` measures on the MoE."""
    out = []
    for i, a in enumerate(captured):
        out.append(a.float().abs().reshape(-1, a.shape[-1]) @ masks[i].T)  # [T, I] @ [I, E]
    return torch.stack(out)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy of predicting ids[:, 1:] from logits[:, :-1], and the count."""
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )
    return loss.item(), ids[:, 1:].numel()


def register_recorded_domains(moe: MoEForCausalLM) -> None:
    """Register the user's own domains that `pregate refactor` recorded in the checkpoint (if still there)."""
    for name, path in moe.config.provenance.get("custom_domains", {}).items():
        if name not in data.available_domains() and Path(path).exists():
            data.register_domain(name, path)


@torch.no_grad()
def domain_perplexities(
    blocks: torch.Tensor,
    runs: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    dense,
    masks: torch.Tensor | None,
    batch_size: int,
    desc: str,
) -> dict[str, float]:
    """One dense pass per batch (its MLP inputs give the oracle routing), then each variant's pass.

    runs[name](ids [b, n], oracle_experts [b*n] or None) -> logits [b, n, V].
    """
    totals = {name: [0.0, 0] for name in ["dense", *runs]}
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, unit="batch", leave=False):
        ids = blocks[start : start + batch_size]
        with capture_mlp_inputs(dense) as captured:
            dense_logits = dense(input_ids=ids).logits
        oracle = None
        if masks is not None:
            oracle = oracle_experts(normalised_scores(expert_mass(captured, masks)))  # [T]
        for name, logits in [("dense", dense_logits)] + [(n, f(ids, oracle)) for n, f in runs.items()]:
            loss, count = next_token_nll(logits, ids)
            totals[name][0] += loss
            totals[name][1] += count
    return {name: math.exp(loss / count) for name, (loss, count) in totals.items()}


def evaluate_ppl(moe_dir: str | Path, cfg: PplConfig, cache: str | None = None, extra_runs=None) -> dict:
    """Perplexity table {"domains": {domain: {variant: ppl}}, ...} for a refactored checkpoint.

    extra_runs: optional {name: (domain -> run function)} for variants that later stages add (trained
    router...).
    """
    moe = load_moe(moe_dir, torch.float32)
    base = moe.config.provenance.get("base")
    if not base:
        raise PregateError(f"{moe_dir} does not record its base model; was it written by `pregate refactor`?")
    dense, tokenizer = hub.load_dense(base, torch.float32, cache)
    experts = moe.config.expert_names
    register_recorded_domains(moe)
    domains = cfg.domains or experts
    for d in domains:
        data.domain_info(d)
    parent = moe.config.provenance.get("parent")  # set by `pregate train`: the MoE it was trained from
    control = None
    if "control" in cfg.variants:
        control_dir = (Path(parent) if parent else Path(moe_dir)) / CONTROL_DIR
        control = load_moe(control_dir, torch.float32) if control_dir.is_dir() else None
    trained_runs = _trained_runs(moe_dir, moe, cfg.variants) if parent else {}
    quantized = quantize_model(copy.deepcopy(moe), cfg.quantize) if cfg.quantize else None
    if quantized is not None and "moe_router" in trained_runs:
        router = quantize_router(load_router(moe_dir), cfg.quantize)  # as serve --quantize runs it
        trained_runs["moe_router_int8"] = lambda ids, _o: quantized(ids, *routing_for(router, ids))
    masks = expert_masks(moe, dense.config.intermediate_size) if "moe_oracle" in cfg.variants else None
    gen = torch.Generator().manual_seed(cfg.seed)
    table = {}
    for d in domains:
        blocks = data.token_blocks(tokenizer, d, "test", cfg.tokens_per_domain, cfg.block_len)
        runs: dict[str, Callable] = {}
        if "moe_domain" in cfg.variants and d in experts:
            e = experts.index(d)
            runs["moe_domain"] = lambda ids, _o, e=e: moe(ids, Routing.top1(torch.full((ids.numel(),), e)))
        if "moe_oracle" in cfg.variants:
            runs["moe_oracle"] = lambda ids, oracle: moe(ids, Routing.top1(oracle))
            if quantized is not None and "moe_router" not in trained_runs:
                runs["moe_oracle_int8"] = lambda ids, oracle: quantized(ids, Routing.top1(oracle))
        if "moe_random" in cfg.variants:
            runs["moe_random"] = lambda ids, _o: moe(
                ids, Routing.top1(torch.randint(0, moe.num_experts, (ids.numel(),), generator=gen))
            )
        if control is not None:
            runs["control"] = lambda ids, _o: control(ids, None)
        runs.update(trained_runs)
        for name, make in (extra_runs or {}).items():
            runs[name] = make(d)
        result = domain_perplexities(blocks, runs, dense, masks, cfg.batch_size, desc=f"perplexity {d}")
        table[d] = {
            v: result[v]
            for v in ["dense", *runs]
            if v in result and (v.removesuffix("_int8") in cfg.variants or v in (extra_runs or {}))
        }
    return {
        "model": str(moe_dir),
        "base": base,
        "domains": table,
        "tokens_per_domain": cfg.tokens_per_domain,
        "block_len": cfg.block_len,
        "split": "test",
        "activated_channels": {
            "moe": moe.config.activated_channels(),
            "dense": dense.config.intermediate_size,
        },
    }


def _trained_runs(moe_dir: str | Path, moe: MoEForCausalLM, variants: list[str]) -> dict[str, Callable]:
    """moe_router and control_trained for a `pregate train` output directory (when present)."""
    runs: dict[str, Callable] = {}
    if "moe_router" in variants and has_router(moe_dir):
        router = load_router(moe_dir)
        runs["moe_router"] = lambda ids, _o: moe(ids, *routing_for(router, ids))
    control_dir = Path(moe_dir) / CONTROL_DIR
    if "control_trained" in variants and control_dir.is_dir():
        trained = load_moe(control_dir, torch.float32)
        runs["control_trained"] = lambda ids, _o: trained(ids, None)
    return runs


def format_ppl_table(result: dict) -> str:
    """A plain-text table: one row per domain, one column per variant, plus the geometric mean."""
    domains = result["domains"]
    variants = [
        v
        for v in [*PPL_VARIANTS, *sorted({k for r in domains.values() for k in r} - set(PPL_VARIANTS))]
        if any(v in r for r in domains.values())
    ]
    width = max(12, *(len(v) + 2 for v in variants))
    lines = ["domain".ljust(14) + "".join(v.rjust(width) for v in variants)]
    for d, row in domains.items():
        lines.append(
            d.ljust(14) + "".join((f"{row[v]:.2f}" if v in row else "-").rjust(width) for v in variants)
        )
    geo = []
    for v in variants:
        vals = [row[v] for row in domains.values() if v in row]
        geo.append(f"{math.exp(sum(map(math.log, vals)) / len(vals)):.2f}" if vals else "-")
    lines.append("geo-mean".ljust(14) + "".join(g.rjust(width) for g in geo))
    return "\n".join(lines)
