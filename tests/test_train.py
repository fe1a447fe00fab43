"""Tests for pregate.train on a tiny refactored Llama (float32, CPU).

This file is also the worker of the 2-process test: `accelerate launch ... tests/test_train.py worker ARGS`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pregate.errors import PregateError
from pregate.moe import load_moe
from pregate.router import LayerwiseGate, PreGatingRouter
from tests.conftest import make_moe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def moe_dir(tiny_checkpoint, tmp_path):
    return make_moe(tiny_checkpoint, tmp_path)


def tiny_cfg(**overrides):
    from pregate.train import TrainConfig

    return TrainConfig.preset("tiny", **overrides)


def trainer_on_one_batch(moe_dir: Path, cfg, **kw):
    """A Trainer whose pool is one fixed batch, so every step of a stage sees exactly that batch."""
    from pregate.train import Trainer, _new_router

    moe = load_moe(moe_dir, torch.float32)
    torch.manual_seed(1)
    batch = torch.randint(0, moe.config.base["vocab_size"], (cfg.batch_size, cfg.seq_len))
    control = load_moe(moe_dir / "control", torch.float32)
    return Trainer(cfg, moe, _new_router(cfg, moe), batch, control=control, progress=False, **kw), batch


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------- steps


@pytest.mark.parametrize("loss", ["graded", "kl"])
def test_router_step_lowers_distillation_loss_and_freezes_backbone(moe_dir, loss):
    from pregate.distill import router_loss

    cfg = tiny_cfg(router_steps=1, loss=loss)
    trainer, batch = trainer_on_one_batch(moe_dir, cfg)
    before_moe, before_router = snapshot(trainer.moe), snapshot(trainer.router)
    with torch.no_grad():
        first, _ = router_loss(cfg, trainer.router, trainer.moe, batch)
    trainer.run_stage(0, "router")
    with torch.no_grad():
        second, acc = router_loss(cfg, trainer.router, trainer.moe, batch)
    assert second < first
    assert same(before_moe, snapshot(trainer.moe))  # backbone frozen
    assert not same(before_router, snapshot(trainer.router))
    assert 0.0 <= acc <= 1.0 and trainer.log["steps"][0]["loss"] == pytest.approx(first.item(), rel=1e-5)


def test_expert_step_lowers_lm_loss_and_freezes_router(moe_dir):
    from pregate.train import lm_loss

    cfg = tiny_cfg(expert_steps=1)
    trainer, batch = trainer_on_one_batch(moe_dir, cfg)
    before_moe, before_router = snapshot(trainer.moe), snapshot(trainer.router)
    with torch.no_grad():
        first, _ = lm_loss(cfg, trainer.moe, batch, trainer.router, None)
    trainer.run_stage(0, "expert")
    with torch.no_grad():
        second, _ = lm_loss(cfg, trainer.moe, batch, trainer.router, None)
    assert second < first
    assert same(before_router, snapshot(trainer.router))  # router frozen
    after = snapshot(trainer.moe)
    assert not torch.equal(before_moe["embed_tokens.weight"], after["embed_tokens.weight"])
    # zero padding of the stacked experts stays zero (no gradient, decay of 0 is 0)
    for name, w in after.items():
        if name.endswith("mlp.expert_index"):
            pad = w < 0
            prefix = name.removesuffix("expert_index")
            assert torch.all(after[prefix + "w_gate"][pad] == 0) and torch.all(
                after[prefix + "w_down"].transpose(1, 2)[pad] == 0
            )


def test_expert_distillation_from_dense_parent_lowers_loss(moe_dir, tiny_checkpoint):
    from pregate import hub
    from pregate.train import lm_loss

    cfg = tiny_cfg(expert_steps=1, expert_distill=True)
    parent = hub.load_dense(str(tiny_checkpoint))[0]
    trainer, batch = trainer_on_one_batch(moe_dir, cfg, parent=parent)
    with torch.no_grad():
        first, ce = lm_loss(cfg, trainer.moe, batch, trainer.router, parent)
    assert first.item() != pytest.approx(ce)  # the KD term is in the loss
    trainer.run_stage(0, "expert")
    with torch.no_grad():
        assert lm_loss(cfg, trainer.moe, batch, trainer.router, parent)[0] < first


def test_control_stage_gets_the_moe_tokens():
    from pregate.train import TrainConfig, stage_batches

    pool = torch.arange(40 * 4).view(40, 4)
    for budget, kinds in (("tokens", ("router", "expert")), ("updates", ("expert",))):
        cfg = TrainConfig(
            router_steps=3,
            expert_steps=5,
            batch_size=2,
            seq_len=4,
            tokens_per_domain=8,
            control_budget=budget,
        )
        control = torch.cat(list(stage_batches(pool, cfg, 1, "control")))
        moe = torch.cat([b for k in kinds for b in stage_batches(pool, cfg, 1, k)])
        assert torch.equal(control, moe) and cfg.steps("control") * 2 == len(control)
    cfg = TrainConfig(router_steps=3, expert_steps=5, batch_size=2, seq_len=4, tokens_per_domain=8)
    assert not torch.equal(
        next(stage_batches(pool, cfg, 0, "expert")), next(stage_batches(pool, cfg, 1, "expert"))
    )


def test_lr_schedule_cosine_and_warmup():
    from pregate.train import lr_at

    lrs = [lr_at(i, 10, 1.0, 2, 0.1) for i in range(10)]
    assert lrs[0] == 0.5 and lrs[2] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


# ----------------------------------------------------------------------------------------- whole runs


def test_resume_after_a_kill_gives_the_same_losses(moe_dir, tmp_path):
    from pregate.train import read_state, train

    cfg = tiny_cfg()  # 2 rounds x (router, expert) + 2 control stages
    full = train(moe_dir, tmp_path / "full", cfg, progress=False)
    part = train(moe_dir, tmp_path / "part", cfg, progress=False, stop_after=3)
    assert read_state(part)["stages_done"] == 3
    assert load_moe(part).num_experts == 2 and not list(tmp_path.glob(".part*"))
    train(moe_dir, part, resume=True, progress=False)
    logs = [json.loads((d / "train_log.json").read_text()) for d in (full, part)]
    assert [s["loss"] for s in logs[0]["steps"]] == [s["loss"] for s in logs[1]["steps"]]
    assert len(logs[0]["steps"]) == 2 * (2 + 2) + 2 * 4
    for name in ("model.safetensors", "router.safetensors", "control/model.safetensors"):
        assert (full / name).read_bytes() == (part / name).read_bytes()
    assert (full / "loss.png").stat().st_size > 1000
    with pytest.raises(PregateError, match="differ"):
        train(moe_dir, part, tiny_cfg(seed=5), resume=True, progress=False)


def test_dselect_top2_trains_and_routes_two_weighted_experts(moe_dir, tmp_path):
    from pregate.router import load_router, routing_for
    from pregate.train import train

    out = train(
        moe_dir,
        tmp_path / "ds",
        tiny_cfg(rounds=1, head="dselect", top_k=2, dselect_entropy=0.01, train_control=False),
        progress=False,
    )
    router = load_router(out)
    assert isinstance(router, PreGatingRouter) and router.cfg.head == "dselect"
    ids = torch.randint(0, router.cfg.vocab_size, (2, 16))
    routing, _ = routing_for(router, ids)
    assert routing.expert_ids.shape == (32, 2)
    assert torch.all(routing.expert_ids[:, 0] != routing.expert_ids[:, 1])
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(32))
    moe = load_moe(out)
    assert torch.isfinite(moe(ids, routing)).all()


def test_layerwise_gate_trains_and_runs_in_the_moe(moe_dir, tmp_path):
    from pregate.router import load_router, routing_for
    from pregate.train import train

    out = train(
        moe_dir, tmp_path / "lw", tiny_cfg(rounds=1, layerwise=True, train_control=False), progress=False
    )
    log = json.loads((out / "train_log.json").read_text())
    assert log["stages"][0]["stage"] == "router" and "last_acc" in log["stages"][0]
    gate = load_router(out)
    assert isinstance(gate, LayerwiseGate) and len(gate.gates) == 3
    ids = torch.randint(0, 50, (2, 8))
    moe = load_moe(out)
    routing, layer_router = routing_for(gate, ids)
    assert routing is None and torch.isfinite(moe(ids, None, layer_router)).all()


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field", ["rounds", "router_steps", "expert_steps"])
def test_zero_steps_are_refused(field):
    from pregate.train import TrainConfig

    with pytest.raises(PregateError, match=f"{field}=0"):
        TrainConfig(**{field: 0})


def test_bad_checkpoints_and_options(moe_dir, tiny_checkpoint, tmp_path):
    from pregate.train import TrainConfig, train

    with pytest.raises(PregateError, match="top_k=3 exceeds the 2 routed experts"):
        train(moe_dir, tmp_path / "a", tiny_cfg(top_k=3), progress=False)
    with pytest.raises(PregateError, match="not a pregate MoE"):
        train(tiny_checkpoint, tmp_path / "b", tiny_cfg(), progress=False)  # a plain HF checkpoint
    with pytest.raises(PregateError, match="dense checkpoint"):
        train(moe_dir / "control", tmp_path / "c", tiny_cfg(train_control=False), progress=False)
    with pytest.raises(PregateError, match="does not exist"):
        train(moe_dir, tmp_path / "missing", resume=True, progress=False)
    with pytest.raises(PregateError, match="already exists"):
        train(moe_dir, moe_dir, tiny_cfg(), progress=False)
    with pytest.raises(PregateError, match="loss='mse'"):
        TrainConfig(loss="mse")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_train_then_eval_shows_router_and_trained_control(moe_dir, tmp_path, capsys):
    from pregate.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(moe_dir),
                "--out",
                str(out),
                "--preset",
                "tiny",
                "--rounds",
                "1",
                "--control-budget",
                "updates",
            ]
        )
        == 0
    )
    assert "router acc" in capsys.readouterr().out
    state = json.loads((out / "train_state.json").read_text())
    assert state["stages_done"] == 3 and state["config"]["rounds"] == 1
    log = json.loads((out / "train_log.json").read_text())
    control, expert = (next(s for s in log["stages"] if s["stage"] == k) for k in ("control", "expert"))
    # --control-budget updates
    assert control["steps"] == expert["steps"] and control["tokens"] == expert["tokens"]
    assert load_moe(out).config.provenance["parent"] == str(moe_dir.resolve())
    path = tmp_path / "ppl.json"
    assert (
        main(
            ["eval", "ppl", str(out), "--tokens-per-domain", "128", "--block-len", "64", "--json", str(path)]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "moe_router" in table and "control_trained" in table
    result = json.loads(path.read_text())
    for row in result["domains"].values():
        assert {"dense", "moe_oracle", "control", "moe_router", "control_trained"} <= set(row)
        assert row["control"] != row["control_trained"]  # the untrained control comes from the parent dir
    assert main(["train", str(moe_dir), "--out", str(tmp_path / "nope"), "--resume"]) == 2


# ----------------------------------------------------------------------------------------- 2 processes


@pytest.mark.subprocess
def test_two_processes_give_the_same_update_as_one(moe_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo) vs one process, same global batch of 4.

    `accelerate launch --cpu` starts a single process on one machine; `--multi_gpu` with
    ACCELERATE_USE_CPU=1 starts 2 local processes on the CPU (DistributedType.MULTI_CPU, gloo)."""
    from pregate.train import train

    cfg = dict(rounds=1, router_steps=1, expert_steps=1, batch_size=4, train_control=True)
    one = train(moe_dir, tmp_path / "one", tiny_cfg(**cfg), progress=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(Path(__file__)),
        "worker",
        str(moe_dir),
        str(tmp_path / "two"),
        json.dumps(cfg),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "two" / "train_state.json").read_text())
    assert state["num_processes"] == 2
    logs = [json.loads((d / "train_log.json").read_text())["steps"] for d in (one, tmp_path / "two")]
    for a, b in zip(*logs, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for name in ("model.safetensors", "router.safetensors", "control/model.safetensors"):
        from safetensors.torch import load_file

        x, y = load_file(str(one / name)), load_file(str(tmp_path / "two" / name))
        for k in x:
            # Adam's first step is lr * g / (|g| + eps): where |g| ~ eps the summation order of the two
            # halves shows; 1e-5 is 1 % of the smallest step (expert lr 1e-3).
            torch.testing.assert_close(y[k], x[k], atol=1e-5, rtol=1e-4)


def _worker(moe_dir: str, out: str, cfg_json: str) -> None:
    from pregate.train import train

    train(moe_dir, out, tiny_cfg(**json.loads(cfg_json)), progress=False)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    # The registered tiny domains live in the parent's process; re-register them from the MoE's tokenizer dir.
    from pregate import data
    from tests.conftest import TEXTS

    corpus = Path(sys.argv[3]).parent / f"worker-corpora-{os.environ.get('RANK', '0')}"
    for name, docs in TEXTS.items():
        (corpus / name).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(docs):
            (corpus / name / f"{i}.txt").write_text(text)
        data.register_domain(name, corpus / name)
    _worker(*sys.argv[2:5])
