"""`make demo`: the main job end to end on the packaged SmolLM2-135M, on a 2-core CPU budget.

Each stage writes into the output directory and is skipped on a second run when its output is complete
(pass force=True to redo everything).
"""

from __future__ import annotations

import json
from pathlib import Path

from pregate.config import REFACTOR_PRESETS
from pregate.errors import PregateError
from pregate.evaluate import PplConfig, evaluate_ppl, format_table
from pregate.extract import refactor
from pregate.moe import load_moe
from pregate.plots import plot_perplexity

BASE = "smollm2-135m"
EVAL_TOKENS = 2048


def _complete(moe_dir: Path) -> bool:
    try:
        load_moe(moe_dir)
        load_moe(moe_dir / "control")
        return True
    except PregateError:
        return False


def run_demo(out: Path, cache: str | None = None, force: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    moe_dir = out / "moe"
    cfg = REFACTOR_PRESETS["demo"]
    if force or not _complete(moe_dir):
        print(f"[1/2] refactor {BASE} into 7 domain experts ({cfg.tokens_per_domain} train tokens per domain)")
        refactor(BASE, moe_dir, cfg, force=True, cache=cache)
    else:
        print(f"[1/2] reuse {moe_dir} (pass --force to rebuild)")
    print(f"[2/2] test perplexity, {EVAL_TOKENS} tokens per domain")
    result = evaluate_ppl(moe_dir, PplConfig(tokens_per_domain=EVAL_TOKENS), cache=cache)
    (out / "ppl.json").write_text(json.dumps(result, indent=1))
    plot = plot_perplexity(result, out / "ppl.png")
    print()
    print(format_table(result))
    print()
    print(f"activated MLP channels per token and layer: MoE {result['activated_channels']['moe']:.0f} "
          f"of {result['activated_channels']['dense']} dense (the control keeps the same number)")
    print(f"wrote {out / 'ppl.json'} and {plot}")
    return result
