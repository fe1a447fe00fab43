"""Read-ME training: alternating router distillation and expert tuning, plus a same-size dense control.

A round is a router stage then an expert stage (SPEC section 1):
- Router stage (backbone frozen): the router (token ids only) is fitted to per-layer targets from the
  current backbone run dense: the share of each token's routed activation mass each expert's channels
  hold (`distill`: targets, the "kl" or "graded" loss, accuracy against the oracle routing).
- Expert stage (router frozen): the backbone trains through the MoE path with the router's routing
  (ids and weights are constants), causal-LM loss, optionally mixed with KL to the dense parent's logits.
Each stage runs a cosine schedule (optional linear warmup) from its peak lr, the peak x round_decay per
round; a fresh AdamW starts every stage (weight decay on matrices only), so a checkpoint at a stage
boundary is the complete training state: resuming reproduces an uninterrupted run exactly.

Data: train-split blocks of the checkpoint's domains, `tokens_per_domain` each, pooled (so domains are
mixed uniformly); the batches of stage (round r, kind k) are a permutation drawn from seed (cfg.seed, r, k).
The control trains on exactly the MoE's tokens (budget "tokens": each control round sees the router-stage
then the expert-stage batches of that round, all as LM steps) or on the expert-stage batches only
(budget "updates": same number of backbone updates).

Distributed: the same code runs under `accelerate launch`. The global batch is split evenly across
processes; after backward every trainable parameter's gradient (zeros where unused) is averaged across
processes, which equals one process on the whole batch (equal-length rows). Only the main process
writes checkpoints, logs and progress bars.

This module owns the recipe: `TrainConfig` and its presets, the batches and the lr schedule, the
expert-stage loss, the `Trainer`, writing and resuming the output directory, and `train()`. Components own
their parts: router targets and loss in `distill`, router persistence in `router`, the file names in
`checkpoint`, the loss plot in `plots`. Serving code never imports this module.

Legend: B rows, n sequence length, T = B*n tokens, Y backbone layers, E routed experts, K experts per token.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pregate.checkpoint import (
    CONFIG_FILE,
    CONTROL_DIR,
    LOG_FILE,
    PLOT_FILE,
    RECORD_FILE,
    ROUTER_CONFIG,
    ROUTER_WEIGHTS,
    STATE_FILE,
    STATS_FILE,
    WEIGHTS_FILE,
    atomic_dir,
    copy_tokenizer,
    link_tree,
)
from pregate.distill import router_loss
from pregate.errors import PregateError, check_int
from pregate.moe import MoEForCausalLM, load_moe, save_moe
from pregate.plots import plot_losses
from pregate.router import (
    Gate,
    LayerwiseGate,
    PreGatingRouter,
    RouterConfig,
    load_router,
    routing_for,
    save_router,
)

KINDS = ("router", "expert", "control")
_ALWAYS_REWRITTEN = {STATE_FILE, LOG_FILE, PLOT_FILE}


class TrainError(PregateError):
    """Bad training configuration, checkpoint or resume directory."""


# ----------------------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """One training run. Steps count optimizer updates; batch_size is the global batch (rows of seq_len)."""

    rounds: int = 2
    router_steps: int = 4
    expert_steps: int = 8
    batch_size: int = 2
    seq_len: int = 256
    router_lr: float = 5e-4
    expert_lr: float = 5e-5
    round_decay: float = 0.8  # peak lr of round r = lr * round_decay**r
    weight_decay: float = 0.01
    warmup: int = 0  # linear warmup steps at the start of each stage
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of the stage's peak
    loss: str = "graded"  # "graded" (official code) or "kl" (paper)
    temperature: float = 1.0  # target sharpness: softmax(log(share) / T)
    smoothing: float = 0.1  # label smoothing of the graded loss
    head: str = "softmax"  # "softmax" (Read-ME, top-1) or "dselect" (DSelect-k, top_k weighted experts)
    top_k: int = 1
    dselect_entropy: float = 0.0  # weight of DSelect-k's selector-entropy regulariser
    router_preset: str = "readme"
    router_dim: int | None = None
    router_layers: int | None = None
    expert_distill: bool = False  # mix KL to the dense parent's logits into the expert-stage loss
    distill_weight: float = 0.5  # loss = (1 - w) * CE + w * KL(parent || student) when expert_distill
    layerwise: bool = False  # train a per-layer gate (conventional baseline) instead of the pre-gating router
    train_control: bool = True
    control_budget: str = "tokens"  # "tokens": router+expert steps per round; "updates": expert steps only
    tokens_per_domain: int = 16384  # train-split tokens per domain in the batch pool
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rounds", "router_steps", "expert_steps", "batch_size", "top_k", "tokens_per_domain"):
            value = getattr(self, name)
            check_int(f"TrainConfig.{name}", value, error=TrainError, why="zero steps train nothing")
        check_int("TrainConfig.seq_len", self.seq_len, 2, error=TrainError, why="next-token targets")
        if self.tokens_per_domain < self.seq_len:
            raise TrainError(
                f"TrainConfig.tokens_per_domain={self.tokens_per_domain} is below seq_len={self.seq_len}: "
                "raise it."
            )
        for name in ("router_lr", "expert_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise TrainError(f"TrainConfig.{name}={getattr(self, name)!r}: must be > 0.")
        for name, lo, hi in (("round_decay", 0, 1), ("min_lr_ratio", 0, 1), ("distill_weight", 0, 1)):
            if not lo <= getattr(self, name) <= hi:
                raise TrainError(f"TrainConfig.{name}={getattr(self, name)!r}: must lie in [{lo}, {hi}].")
        if not 0 <= self.smoothing < 1 or self.weight_decay < 0 or self.dselect_entropy < 0:
            raise TrainError(
                f"TrainConfig: smoothing={self.smoothing} must be in [0, 1), "
                f"weight_decay={self.weight_decay} "
                f"and dselect_entropy={self.dselect_entropy} must be >= 0."
            )
        if self.warmup < 0 or self.warmup >= min(self.router_steps, self.expert_steps):
            raise TrainError(f"TrainConfig.warmup={self.warmup}: must be >= 0 and below every stage's steps.")
        choices = {
            "loss": ("graded", "kl"),
            "head": ("softmax", "dselect"),
            "control_budget": ("tokens", "updates"),
            "router_preset": ("readme", "tiny"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainError(f"TrainConfig.{name}={getattr(self, name)!r}: choose one of {allowed}.")
        if self.layerwise and self.head != "softmax":
            raise TrainError("TrainConfig.layerwise=True uses linear per-layer gates: set head='softmax'.")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        if name not in TRAIN_PRESETS:
            raise TrainError(f"training preset {name!r} is unknown; choose one of {sorted(TRAIN_PRESETS)}.")
        return cls(**{**TRAIN_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainError(
                f"training config has unknown keys {unknown}: written by another pregate version?"
            )
        return cls(**data)

    def steps(self, kind: str) -> int:
        if kind == "router":
            return self.router_steps
        if kind == "expert":
            return self.expert_steps
        return self.expert_steps + (self.router_steps if self.control_budget == "tokens" else 0)


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's schedule (8 x (100 router + 200 expert steps)); the batch is ours (the paper: ~1B tokens).
    "paper": dict(
        rounds=8, router_steps=100, expert_steps=200, batch_size=16, seq_len=1024, tokens_per_domain=524288
    ),
    # 2 CPU cores, SmolLM2-135M, 7 domains: 57k tokens per model, every pool block seen once;
    # docs/training.md has the measured time. The router needs tens of steps to beat chance (40 steps at
    # 5e-4: 41-49 % agreement with the oracle; higher lrs were worse). The expert lr is 4x the paper's:
    # the budget is ~20,000x smaller.
    "cpu": dict(
        rounds=2,
        router_steps=40,
        expert_steps=16,
        batch_size=2,
        seq_len=256,
        tokens_per_domain=8192,
        expert_lr=2e-4,
    ),
    "tiny": dict(
        rounds=2,
        router_steps=2,
        expert_steps=2,
        batch_size=2,
        seq_len=32,
        tokens_per_domain=256,
        router_preset="tiny",
        router_lr=1e-2,
        expert_lr=1e-3,
    ),
}
TRAIN_PRESETS["demo"] = {
    **TRAIN_PRESETS["cpu"],
    "rounds": 1,
}  # make demo: ~5 minutes on 2 cores, control included


# ----------------------------------------------------------------------------------------- data and schedule


def batch_pool(tokenizer, domains: list[str], cfg: TrainConfig) -> torch.Tensor:
    """Equal train-split block counts of every domain, concatenated -> [N, seq_len] long."""
    from pregate import data

    return torch.cat(
        [data.token_blocks(tokenizer, d, "train", cfg.tokens_per_domain, cfg.seq_len) for d in domains]
    )


def stage_batches(pool: torch.Tensor, cfg: TrainConfig, round_: int, kind: str) -> Iterator[torch.Tensor]:
    """The global batches [batch_size, seq_len] of a stage, a pure function of (seed, round, kind).

    The control's batches are the MoE's router-stage batches then its expert-stage batches of that round
    (budget "tokens") or the expert-stage batches only ("updates"): the same tokens either way."""
    if kind == "control":
        if cfg.control_budget == "tokens":
            yield from stage_batches(pool, cfg, round_, "router")
        yield from stage_batches(pool, cfg, round_, "expert")
        return
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + round_ * 7919 + KINDS.index(kind) + 1)
    need = cfg.steps(kind) * cfg.batch_size
    order = torch.cat([torch.randperm(len(pool), generator=g) for _ in range(-(-need // len(pool)))])
    for i in range(cfg.steps(kind)):
        yield pool[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]]


def lr_at(step: int, steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup then cosine from `peak` down to min_ratio * peak at the stage's last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, steps - 1 - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / span)))


# ----------------------------------------------------------------------------------------- expert-stage loss


def lm_loss(
    cfg: TrainConfig, model: MoEForCausalLM, ids: torch.Tensor, router: Gate | None, parent: nn.Module | None
) -> tuple[torch.Tensor, float]:
    """(optimised loss, causal-LM cross-entropy) of ids [B, n] through the MoE path (or the control)."""
    routing, layer_router = routing_for(router, ids) if router is not None else (None, None)
    logits = model(ids, routing, layer_router)[:, :-1]  # [B, n-1, V]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    if parent is None or not cfg.expert_distill:
        return ce, ce.item()
    with torch.no_grad():
        teacher = F.log_softmax(parent(input_ids=ids).logits[:, :-1].float(), -1)
    kd = F.kl_div(
        F.log_softmax(logits, -1).flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean"
    )
    return (1 - cfg.distill_weight) * ce + cfg.distill_weight * kd, ce.item()


# ----------------------------------------------------------------------------------------- the trainer


class Trainer:
    """Holds the models, the batch pool and the log; `run_stage` trains one (round, kind) stage."""

    def __init__(
        self,
        cfg: TrainConfig,
        moe: MoEForCausalLM,
        router: Gate,
        pool: torch.Tensor,
        control: MoEForCausalLM | None = None,
        parent: nn.Module | None = None,
        accelerator=None,
        progress: bool = True,
    ):
        from accelerate import Accelerator

        self.cfg, self.pool = cfg, pool
        self.acc = accelerator or Accelerator()
        n = self.acc.num_processes
        if cfg.batch_size % n:
            raise TrainError(f"batch_size={cfg.batch_size} must be divisible by the {n} processes.")
        dev = self.acc.device
        self.moe, self.router = moe.float().to(dev), router.float().to(dev)
        self.control = control.float().to(dev) if control is not None else None
        self.parent = parent.float().to(dev).eval() if parent is not None else None
        for m in (self.moe, self.router, self.control, self.parent):
            if m is not None:
                m.requires_grad_(False)
        self.progress = progress and self.acc.is_main_process
        self.log: dict[str, list] = {"steps": [], "stages": []}

    def _local(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch."""
        b = len(batch) // self.acc.num_processes
        return batch[self.acc.process_index * b : (self.acc.process_index + 1) * b].to(self.acc.device)

    def _optimizer(self, module: nn.Module) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
        params = [p for p in module.parameters()]
        module.requires_grad_(True)
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95)), params

    def _sync_grads(self, params: list[nn.Parameter]) -> None:
        # Zeros for unused parameters so every process (and a single process) applies the same update.
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.acc.num_processes > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            flat = self.acc.reduce(flat, reduction="mean")
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def _mean(self, value: float) -> float:
        if self.acc.num_processes == 1:
            return value
        return self.acc.reduce(torch.tensor([value], device=self.acc.device), reduction="mean").item()

    def run_stage(self, round_: int, kind: str) -> dict:
        """Train one stage; returns its summary (also appended to self.log)."""
        cfg = self.cfg
        module = {"router": self.router, "expert": self.moe, "control": self.control}[kind]
        assert module is not None, f"no model for stage {kind}"
        steps = cfg.steps(kind)
        peak = (cfg.router_lr if kind == "router" else cfg.expert_lr) * cfg.round_decay**round_
        opt, params = self._optimizer(module)
        x0 = round_ * (cfg.router_steps + cfg.expert_steps) + (
            cfg.router_steps
            if kind == "expert" or (kind == "control" and cfg.control_budget == "updates")
            else 0
        )
        bar = tqdm(
            total=steps,
            desc=f"round {round_ + 1}/{cfg.rounds} {kind}",
            unit="step",
            disable=not self.progress,
            leave=False,
        )
        start, tokens, losses = time.perf_counter(), 0, []
        for i, batch in enumerate(stage_batches(self.pool, cfg, round_, kind)):
            ids = self._local(batch)
            lr = lr_at(i, steps, peak, cfg.warmup, cfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            if kind == "router":
                loss, metric = router_loss(cfg, self.router, self.moe, ids)
            else:
                loss, metric = lm_loss(
                    cfg, module, ids, self.router if kind == "expert" else None, self.parent
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            self._sync_grads(params)
            opt.step()
            tokens += batch.numel()
            entry = {
                "model": "control" if kind == "control" else "moe",
                "round": round_,
                "stage": kind,
                "step": i,
                "x": x0 + i,
                "loss": self._mean(loss.item()),
                "lr": lr,
                "tokens": tokens,
            }
            entry["acc" if kind == "router" else "lm"] = self._mean(metric)
            self.log["steps"].append(entry)
            losses.append(entry["loss"])
            rate = tokens / max(1e-9, time.perf_counter() - start)
            bar.set_postfix(
                loss=f"{entry['loss']:.4f}",
                lr=f"{lr:.2e}",
                tok_s=f"{rate:.0f}",
                **({"acc": f"{entry['acc']:.2f}"} if kind == "router" else {}),
            )
            bar.update()
        bar.close()
        module.requires_grad_(False)
        seconds = time.perf_counter() - start
        summary = {
            "round": round_,
            "stage": kind,
            "steps": steps,
            "tokens": tokens,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "first_loss": losses[0],
            "last_loss": losses[-1],
        }
        if kind == "router":
            summary["last_acc"] = self.log["steps"][-1]["acc"]
        self.log["stages"].append(summary)
        return summary


# ----------------------------------------------------------------------------------------- checkpoints


def _stage_list(cfg: TrainConfig) -> list[tuple[int, str]]:
    moe = [(r, k) for r in range(cfg.rounds) for k in ("router", "expert")]
    return moe + ([(r, "control") for r in range(cfg.rounds)] if cfg.train_control else [])


def write_checkpoint(
    out: Path, trainer: Trainer, source: Path, state: dict, changed: set[str] | None
) -> None:
    """Atomically replace `out` with the current models. changed None: write everything (a new run);
    otherwise the parts in `changed` ("moe", "router", "control") are written and the rest hard-linked
    from the previous checkpoint in `out`."""
    import shutil

    old = out if changed is not None else None
    changed = changed if changed is not None else {"moe", "router", "control"}
    with atomic_dir(out, force=True) as tmp:
        skip = set(_ALWAYS_REWRITTEN)
        if "moe" in changed:
            skip |= {CONFIG_FILE, WEIGHTS_FILE}
        if "router" in changed:
            skip |= {ROUTER_WEIGHTS, ROUTER_CONFIG}
        if "control" in changed:
            skip |= {f"{CONTROL_DIR}/{CONFIG_FILE}", f"{CONTROL_DIR}/{WEIGHTS_FILE}"}
        if old is not None:
            link_tree(old, tmp, skip)
        else:  # first checkpoint: the tokenizer and refactoring record come from the source
            copy_tokenizer(source, tmp)
            for name in (RECORD_FILE, STATS_FILE):
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
            if trainer.control is not None:
                (tmp / CONTROL_DIR).mkdir()
                copy_tokenizer(source / CONTROL_DIR, tmp / CONTROL_DIR)
        if "moe" in changed:
            save_moe(trainer.moe, tmp)
        if "router" in changed:
            save_router(trainer.router, tmp)
        if "control" in changed and trainer.control is not None:
            save_moe(trainer.control, tmp / CONTROL_DIR)
        (tmp / LOG_FILE).write_text(json.dumps({"config": state["config"], **trainer.log}, indent=1))
        plot_losses(trainer.log, tmp / PLOT_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))


# ----------------------------------------------------------------------------------------- entry point


def _new_router(cfg: TrainConfig, moe: MoEForCausalLM) -> Gate:
    torch.manual_seed(cfg.seed)
    base = moe.config.base
    if cfg.layerwise:
        return LayerwiseGate(len(moe.layers), base["hidden_size"], moe.num_experts, cfg.top_k)
    overrides: dict[str, Any] = {"head": cfg.head, "top_k": cfg.top_k}
    if cfg.router_dim is not None:
        overrides["dim"] = cfg.router_dim
    if cfg.router_layers is not None:
        overrides["n_layers"] = cfg.router_layers
    preset = RouterConfig.preset(
        cfg.router_preset, vocab_size=base["vocab_size"], num_experts=moe.num_experts, **overrides
    )
    overrides["max_seq_len"] = max(preset.max_seq_len, cfg.seq_len)
    router = PreGatingRouter(
        RouterConfig.preset(
            cfg.router_preset, vocab_size=base["vocab_size"], num_experts=moe.num_experts, **overrides
        )
    )
    router.init_embedding_from(moe.embed_tokens.weight.float())
    return router


def _load_source(moe_dir: Path, cfg: TrainConfig) -> MoEForCausalLM:
    if not moe_dir.is_dir():
        raise TrainError(f"{moe_dir} does not exist; give a MoE checkpoint written by `pregate refactor`.")
    moe = load_moe(moe_dir, torch.float32)  # raises for foreign checkpoints
    if moe.num_experts == 0:
        raise TrainError(
            f"{moe_dir} is a dense checkpoint (0 routed experts), not a pregate MoE; give the refactored "
            "MoE directory."
        )
    if cfg.top_k > moe.num_experts:
        raise TrainError(
            f"top_k={cfg.top_k} exceeds the {moe.num_experts} routed experts of {moe_dir}; use --top-k <= "
            f"{moe.num_experts}."
        )
    if cfg.train_control and not (moe_dir / CONTROL_DIR / CONFIG_FILE).is_file():
        raise TrainError(
            f"{moe_dir / CONTROL_DIR} (the same-size dense control) is missing; re-run `pregate refactor` "
            "or pass --no-control."
        )
    return moe


def read_state(out: str | Path) -> dict:
    """The training state of an output directory (for --resume)."""
    out = Path(out)
    if not out.is_dir():
        raise TrainError(f"--resume: {out} does not exist; start a new run without --resume.")
    if not (out / STATE_FILE).is_file():
        raise TrainError(
            f"--resume: {out} has no {STATE_FILE}: it is not a `pregate train` output directory."
        )
    return json.loads((out / STATE_FILE).read_text())


def train(
    moe_dir: str | Path,
    out: str | Path,
    cfg: TrainConfig | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    cache: str | None = None,
    progress: bool = True,
    accelerator=None,
    stop_after: int | None = None,
) -> Path:
    """Train the router and experts of `moe_dir` (and its control) into `out`; returns `out`.

    resume=True continues `out` after its last completed stage; cfg None means the saved config, and a
    given cfg must equal it. Without resume an existing `out` is refused unless force=True.
    stop_after: stop once this many stages (counted from the start of the run) are done, leaving a
    resumable checkpoint (a run split over sessions; the tests' stand-in for a kill).
    """
    moe_dir, out = Path(moe_dir).resolve(), Path(out)
    state = None
    if resume:
        state = read_state(out)
        saved = TrainConfig.from_dict(state["config"])
        if cfg is not None and cfg != saved:
            diff = {k: (v, getattr(cfg, k)) for k, v in saved.to_dict().items() if getattr(cfg, k) != v}
            raise TrainError(
                f"--resume: options differ from the run in {out} (saved, given): {diff}; drop them or "
                "start anew."
            )
        cfg = saved
        if Path(state["source"]) != moe_dir:
            raise TrainError(f"--resume: {out} was trained from {state['source']}, not {moe_dir}.")
    elif out.exists() and not force:
        raise TrainError(
            f"{out} already exists; choose another --out, pass --resume to continue it or --force to "
            "replace it."
        )
    cfg = cfg or TrainConfig.preset("cpu")
    moe = _load_source(moe_dir, cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    domains = list(moe.config.provenance.get("domains") or moe.config.expert_names)
    pool = batch_pool(tokenizer, domains, cfg)
    router = _new_router(cfg, moe)
    control = load_moe(moe_dir / CONTROL_DIR, torch.float32) if cfg.train_control else None
    parent = None
    if cfg.expert_distill:
        from pregate import hub

        parent = hub.load_dense(moe.config.provenance["base"], torch.float32, cache)[0]
    done = 0
    if state is not None:
        done = state["stages_done"]
        moe, router = load_moe(out, torch.float32), load_router(out)
        if control is not None:
            control = load_moe(out / CONTROL_DIR, torch.float32)
    provenance = {"parent": str(moe_dir), "training": cfg.to_dict()}
    moe.config.provenance = {**moe.config.provenance, **provenance}
    if control is not None:
        control.config.provenance = {
            **control.config.provenance,
            **provenance,
            "parent": str(moe_dir / CONTROL_DIR),
        }
    trainer = Trainer(cfg, moe, router, pool, control, parent, accelerator, progress)
    if state is not None and (out / LOG_FILE).is_file():
        saved_log = json.loads((out / LOG_FILE).read_text())
        trainer.log = {"steps": saved_log["steps"], "stages": saved_log["stages"]}
    stages = _stage_list(cfg)
    names = [f"{k}{r}" for r, k in stages]
    for index, (r, kind) in enumerate(stages):
        if index < done:
            continue
        if stop_after is not None and index >= stop_after:
            break
        trainer.run_stage(r, kind)
        changed = {"router"} if kind == "router" else {"moe"} if kind == "expert" else {"control"}
        if state is None and index == 0:
            changed = None  # a new run: write everything, link nothing from a replaced --force directory
        new_state = {
            "source": str(moe_dir),
            "config": cfg.to_dict(),
            "stages": names,
            "stages_done": index + 1,
            "num_processes": trainer.acc.num_processes,
        }
        if trainer.acc.is_main_process:
            write_checkpoint(out, trainer, moe_dir, new_state, changed)
        trainer.acc.wait_for_everyone()
    return out
