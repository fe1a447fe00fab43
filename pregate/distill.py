"""Router distillation: the targets a router is fitted to, and its loss (SPEC section 1, router stage).

Run the backbone with every expert on (shared + all routed experts, weight 1: the dense path); per token
t, layer y and routed expert e take the activation mass m[y, t, e] = sum |a| over e's channels
(`MoEForCausalLM.expert_scores`). Normalised target: share[y, t, e] = m / sum_e' m (the fraction of the
token's routed activation mass that e's channels hold), scores = log(share) / temperature, so
softmax(scores) = share^(1/T), renormalised. The router (token ids only) is fitted to these per-layer
targets, summed over layers, with the paper's KL ("kl") or the official code's graded loss ("graded").
Its accuracy is measured against the oracle routing `router.oracle_experts` of the same scores.

`pregate train` (router stage) and `bench`'s stand-in router both use `router_loss`, so there is one
target and one loss. Imports from the package: `errors`, `moe` and `router`; no training loop, so
serving code may import it.

Legend: B rows, n sequence length, T = B*n tokens, Y backbone layers, H hidden, E routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pregate.errors import PregateError
from pregate.moe import MoEForCausalLM, Routing
from pregate.router import Gate, LayerwiseGate, distill_graded, distill_kl, dselect_entropy, router_accuracy

LOSSES = ("graded", "kl")


class DistillSpec(Protocol):
    """What `router_loss` reads; `DistillConfig` and `train.TrainConfig` both have these fields."""

    loss: str
    temperature: float
    smoothing: float
    head: str
    dselect_entropy: float


@dataclass(frozen=True)
class DistillConfig:
    """How a router is fitted to its targets (the defaults are `TrainConfig`'s)."""

    loss: str = "graded"  # "graded" (official code) or "kl" (paper)
    temperature: float = 1.0  # target sharpness: softmax(log(share) / T)
    smoothing: float = 0.1  # label smoothing of the graded loss
    head: str = "softmax"  # the router's head; "dselect" adds the selector-entropy term when weighted
    dselect_entropy: float = 0.0  # weight of DSelect-k's selector-entropy regulariser

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise PregateError(f"DistillConfig.loss={self.loss!r}: choose one of {LOSSES}.")
        if not self.temperature > 0:
            raise PregateError(f"DistillConfig.temperature={self.temperature!r}: must be > 0.")
        if not 0 <= self.smoothing < 1:
            raise PregateError(f"DistillConfig.smoothing={self.smoothing!r}: must lie in [0, 1).")
        if self.dselect_entropy < 0:
            raise PregateError(f"DistillConfig.dselect_entropy={self.dselect_entropy!r}: must be >= 0.")


# ----------------------------------------------------------------------------------------- targets


def normalised_scores(mass: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Expert activation mass [Y, T, E] -> distillation scores [T, Y, E] = log(share) / temperature."""
    share = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)
    return (share.clamp_min(1e-6).log() / temperature).transpose(0, 1)


@torch.no_grad()
def distill_targets(moe: MoEForCausalLM, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ids [B, n] -> scores [B*n, Y, E] from the current backbone run dense (every expert, weight 1)."""
    return normalised_scores(moe.expert_scores(ids), temperature)


@torch.no_grad()
def layer_inputs(
    moe: MoEForCausalLM, ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense run recording each MLP's input: (hidden [Y, T, H], scores [T, Y, E]) for a LayerwiseGate."""
    t, e = ids.numel(), moe.num_experts
    every = Routing.all_experts(t, e, ids.device)
    hidden: list[torch.Tensor] = []

    def record(_layer: int, h: torch.Tensor) -> Routing:
        hidden.append(h)
        return every

    mass = torch.zeros(len(moe.layers), t, e, device=ids.device)
    moe(ids, None, layer_router=record, scores=mass)
    return torch.stack(hidden), normalised_scores(mass, temperature)


# ----------------------------------------------------------------------------------------- the loss


def router_loss(
    cfg: DistillSpec, router: Gate, moe: MoEForCausalLM, ids: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Distillation loss and accuracy of the router on ids [B, n] (targets from the frozen backbone)."""

    def lossf(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if cfg.loss == "kl":
            return distill_kl(logits, scores)
        return distill_graded(logits, scores, cfg.smoothing)

    if isinstance(router, LayerwiseGate):
        hidden, scores = layer_inputs(moe, ids, cfg.temperature)  # [Y, T, H], [T, Y, E]
        losses, accs = [], []
        for y in range(hidden.shape[0]):
            logits = router(y, hidden[y])
            losses.append(lossf(logits, scores[:, y : y + 1]))
            accs.append(router_accuracy(logits, scores[:, y : y + 1]))
        return torch.stack(losses).sum(), sum(accs) / len(accs)
    scores = distill_targets(moe, ids, cfg.temperature)
    if cfg.head == "dselect" and cfg.dselect_entropy > 0:
        logits, selectors = router.forward_with_selectors(ids)
        extra = cfg.dselect_entropy * dselect_entropy(selectors)
    else:
        logits, extra = router(ids), 0.0
    logits = logits.reshape(-1, logits.shape[-1])  # [T, E]
    return lossf(logits, scores) + extra, router_accuracy(logits, scores)
