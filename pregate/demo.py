"""`make demo`: the main job end to end on the packaged SmolLM2-135M, on a 2-core CPU budget.

refactor (7 domain experts + shared expert) -> train (router distillation, expert tuning, same-size control;
the `demo` training preset) -> test perplexity of every variant -> table and plot -> the serving half
(pregate.demo_serving: MoE vs dense vs HF generate, batching policies, expert cache hit ratios). Each
stage writes into the output directory and is skipped on a second run when its output is complete
(force=True redoes all).
A thin driver: it imports the entry points of each stage (`refactor`, `train`, `evaluate`, `plots`,
`demo_serving`) and the file names of `checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pregate.checkpoint import CONTROL_DIR, PLOT_FILE, STATE_FILE
from pregate.demo_serving import format_serving, serving_summary
from pregate.errors import PregateError
from pregate.evaluate import PplConfig, evaluate_ppl, format_ppl_table
from pregate.moe import load_moe
from pregate.plots import plot_perplexity
from pregate.refactor import REFACTOR_PRESETS, refactor
from pregate.train import TrainConfig, train

BASE = "smollm2-135m"
EVAL_TOKENS = 2048
TRAIN_PRESET = "demo"


def _complete(moe_dir: Path) -> bool:
    try:
        load_moe(moe_dir)
        load_moe(moe_dir / CONTROL_DIR)
        return True
    except PregateError:
        return False


def _trained(train_dir: Path, cfg: TrainConfig) -> bool:
    try:
        state = json.loads((train_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        state.get("config") == cfg.to_dict()
        and state["stages_done"] == len(state["stages"])
        and _complete(train_dir)
    )


def run_demo(out: Path, cache: str | None = None, force: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    moe_dir, train_dir = out / "moe", out / "train"
    cfg = REFACTOR_PRESETS["demo"]
    rebuilt = force or not _complete(moe_dir)
    if rebuilt:
        print(
            f"[1/4] refactor {BASE} into 7 domain experts ({cfg.tokens_per_domain} train tokens per domain)"
        )
        refactor(BASE, moe_dir, cfg, force=True, cache=cache)
    else:
        print(f"[1/4] reuse {moe_dir} (pass --force to rebuild)")
    tcfg = TrainConfig.preset(TRAIN_PRESET)
    if rebuilt or not _trained(train_dir, tcfg):
        print(
            f"[2/4] train: {tcfg.rounds} round of {tcfg.router_steps} router + {tcfg.expert_steps} "
            f"expert steps ({tcfg.batch_size} x {tcfg.seq_len} tokens each), then the same-size control "
            "on the same tokens"
        )
        train(moe_dir, train_dir, tcfg, force=True, cache=cache)
    else:
        print(f"[2/4] reuse {train_dir} (pass --force to retrain)")
    print(f"[3/4] test perplexity, {EVAL_TOKENS} tokens per domain")
    result = evaluate_ppl(train_dir, PplConfig(tokens_per_domain=EVAL_TOKENS), cache=cache)
    (out / "ppl.json").write_text(json.dumps(result, indent=1))
    plot = plot_perplexity(result, out / "ppl.png")
    print()
    print(format_ppl_table(result))
    print()
    print(
        f"activated MLP channels per token and layer: MoE {result['activated_channels']['moe']:.0f} "
        f"of {result['activated_channels']['dense']} dense (the control keeps the same number)"
    )
    print(f"wrote {out / 'ppl.json'}, {plot} and {train_dir / PLOT_FILE}")
    print()
    print("[4/4] serving: MoE vs dense parent vs HF generate, batching policies, expert cache")
    serving = serving_summary(train_dir)
    (out / "serving.json").write_text(json.dumps(serving, indent=1))
    print(format_serving(serving))
    print(f"wrote {out / 'serving.json'}")
    result["serving"] = serving
    return result
