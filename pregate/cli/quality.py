"""The commands that build a model and measure its quality: data, refactor, train, eval, export,
analyze and demo. Each `add_*` fills its parser; each `cmd_*` calls the library function of its name."""

from __future__ import annotations

import json
from pathlib import Path

from pregate.cli.options import (
    add_cache,
    add_domains,
    add_json,
    add_option,
    add_quantize,
    config_from_args,
    positive_int,
    register_domains,
    write_json,
)
from pregate.errors import PregateError

# ----------------------------------------------------------------------------------------- data


def add_data(p) -> None:
    add_domains(p)
    add_json(p, "the listing")
    p.set_defaults(func=cmd_data)


def cmd_data(args) -> None:
    from pregate import data

    register_domains(args.add_domain)
    rows = data.describe_domains()
    write_json(args.json, {"domains": rows})
    cols = ["name", "documents", "train", "validation", "test", "bytes", "stand_in", "source"]
    print("  ".join(c.ljust(12) if c != "source" else c for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(12) if c != "source" else str(r.get(c, "")) for c in cols))
    for r in rows:
        if r.get("stand_in") and r.get("note"):
            print(f"  {r['name']}: {r['note']}")


# ----------------------------------------------------------------------------------------- refactor

_REFACTOR_FLAGS = ("domains", "tokens_per_domain", "block_len", "remain_rate", "seed", "dtype", "batch_size")


def add_refactor(p) -> None:
    from pregate.refactor import REFACTOR_PRESETS

    p.add_argument(
        "base", help="base model: a packaged name (smollm2-135m), a .gguf file or a HF checkpoint directory"
    )
    p.add_argument(
        "--out", required=True, help="output checkpoint directory (refused if it exists, unless --force)"
    )
    p.add_argument(
        "--preset",
        choices=sorted(REFACTOR_PRESETS),
        default="paper",
        help="starting values for the options below (default: paper)",
    )
    p.add_argument("--domains", nargs="+", help="domains whose experts to extract (default: all seven)")
    p.add_argument(
        "--tokens-per-domain",
        type=positive_int,
        help="train-split tokens per domain for the statistics (paper: 65536)",
    )
    p.add_argument("--block-len", type=positive_int, help="tokens per statistics block (default 512)")
    p.add_argument(
        "--remain-rate",
        type=float,
        help="fraction of MLP channels each domain keeps, in (0, 1] (default 0.5)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the written weights (default bfloat16)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, help="blocks per forward pass while collecting statistics"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it exists (only once the new checkpoint is complete)",
    )
    add_domains(p)
    add_cache(p)
    p.set_defaults(func=cmd_refactor)


def cmd_refactor(args) -> None:
    from pregate.checkpoint import CONTROL_DIR, RECORD_FILE
    from pregate.refactor import REFACTOR_PRESETS, RefactorConfig, refactor

    base = REFACTOR_PRESETS[args.preset].to_dict()
    for key in _REFACTOR_FLAGS:
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    custom = register_domains(args.add_domain)
    if custom and args.domains is None:
        raise PregateError(
            "with --add-domain, also list the experts' domains with --domains (built-in and your own)"
        )
    cfg = RefactorConfig(**base)
    out = refactor(args.base, args.out, cfg, force=args.force, cache=args.cache_dir, custom_domains=custom)
    record = json.loads((out / RECORD_FILE).read_text())
    ch = record["channels_per_layer"]
    shared = sum(ch["shared"]) / len(ch["shared"])
    print(f"wrote MoE checkpoint {out} (same-size dense control in {out / CONTROL_DIR})")
    print(
        f"  MLP channels per layer: {ch['total']} dense; shared expert mean {shared:.0f}; "
        f"activated per token {record['activated_channels_mean']:.0f}"
    )
    for d, widths in ch["routed"].items():
        print(f"  expert {d:14s} mean routed channels {sum(widths) / len(widths):.0f}")


# ----------------------------------------------------------------------------------------- eval


def add_eval_ppl(p) -> None:
    from pregate.evaluate import PPL_VARIANTS, PplConfig

    d = PplConfig()
    p.add_argument("model", help="a MoE checkpoint directory written by `pregate refactor`")
    add_json(p)
    p.add_argument(
        "--domains", nargs="+", help="domains to evaluate (default: the checkpoint's expert domains)"
    )
    add_option(
        p, "--tokens-per-domain", d.tokens_per_domain, "test-split tokens per domain", type=positive_int
    )
    p.add_argument("--block-len", type=positive_int, default=d.block_len, help=f"default {d.block_len}")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--variants", nargs="+", help=f"subset of: {' '.join(PPL_VARIANTS)}")
    add_option(p, "--seed", d.seed, "seed of the random routing", type=int)
    add_quantize(p, "the served variant, as an extra column (moe_router_int8, else moe_oracle_int8)")
    add_domains(p)
    add_cache(p)
    p.set_defaults(func=cmd_eval_ppl)


def cmd_eval_ppl(args) -> None:
    from pregate.evaluate import PplConfig, evaluate_ppl, format_ppl_table

    register_domains(args.add_domain)
    cfg = config_from_args(PplConfig, args, variants=args.variants or PplConfig().variants)
    result = evaluate_ppl(args.model, cfg, cache=args.cache_dir)
    print(format_ppl_table(result))
    write_json(args.json, result)


def add_eval_tasks(p) -> None:
    from pregate.tasks import DEFAULT_LIMIT, DEFAULT_LIMITS, DEFAULT_TASKS

    p.add_argument(
        "model", help="a MoE checkpoint (`pregate refactor`/`train` output) or a base model (dense only)"
    )
    add_json(p)
    p.add_argument(
        "--tasks",
        nargs="+",
        default=list(DEFAULT_TASKS),
        help=f"tasks (default: {' '.join(DEFAULT_TASKS)}); mmlu_<subject> for one MMLU subject",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        help="subset of: dense moe_router control_trained control moe_random "
        "(default: those of dense moe_router control_trained the checkpoint has)",
    )
    p.add_argument(
        "--limit",
        type=int,
        help=f"first N documents of every task (MMLU: per subject); default {DEFAULT_LIMITS['mmlu']} per "
        "MMLU "
        f"subject, {DEFAULT_LIMITS['coqa']} for coqa, {DEFAULT_LIMIT} otherwise (a 2-core CPU budget, "
        "docs/evaluation.md)",
    )
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random routing")
    p.add_argument(
        "--check-hf",
        action="store_true",
        help="instead: compare the dense variant with lm-eval's own `hf` backend on the parent checkpoint "
        "(per-item log-likelihoods and accuracies; --limit default 20)",
    )
    add_cache(p)
    p.set_defaults(func=cmd_eval_tasks)


def cmd_eval_tasks(args) -> None:
    from pregate.tasks import evaluate_tasks, format_paper_table, format_tasks_table

    if args.check_hf:
        _check_hf(args)
        return
    result = evaluate_tasks(
        args.model,
        args.tasks,
        args.variants,
        limit=args.limit,
        batch_size=args.batch_size,
        cache=args.cache_dir,
        seed=args.seed,
    )
    print(format_tasks_table(result))
    print()
    print(format_paper_table(result))
    write_json(args.json, result)


def _check_hf(args) -> None:
    from pregate.harness import crosscheck_hf

    report = crosscheck_hf(args.model, args.tasks, args.limit or 20, args.cache_dir, args.batch_size)
    print("task                      items  requests  max |dlogL|   acc ours / hf      acc_norm ours / hf")
    for task, r in report["tasks"].items():
        norm = "-"
        if r["acc_norm_pregate"] is not None:
            norm = f"{r['acc_norm_pregate']:.3f} / {r['acc_norm_hf']:.3f}"
        print(
            f"{task:24s} {r['items']:6d} {r['requests']:9d}  {r['max_abs_diff']:11.2e}   "
            f"{r['acc_pregate']:.3f} / {r['acc_hf']:.3f}      {norm}"
        )
    write_json(args.json, report)


# ----------------------------------------------------------------------------------------- train

_TRAIN_FLAGS = (
    "rounds",
    "router_steps",
    "expert_steps",
    "batch_size",
    "seq_len",
    "router_lr",
    "expert_lr",
    "head",
    "top_k",
    "loss",
    "tokens_per_domain",
    "seed",
    "control_budget",
)


def add_train(p) -> None:
    from pregate.train import TRAIN_PRESETS

    p.add_argument("model", help="a MoE checkpoint directory written by `pregate refactor`")
    p.add_argument("--out", required=True, help="output directory (checkpointed after every stage)")
    p.add_argument(
        "--preset", choices=sorted(TRAIN_PRESETS), help="starting values for the options below (default: cpu)"
    )
    p.add_argument("--rounds", type=positive_int, help="router+expert rounds")
    p.add_argument("--router-steps", type=positive_int, help="router steps per round")
    p.add_argument("--expert-steps", type=positive_int, help="expert steps per round")
    p.add_argument("--batch-size", type=positive_int, help="global batch (rows of --seq-len tokens)")
    p.add_argument("--seq-len", type=positive_int)
    p.add_argument("--router-lr", type=float, help="peak router lr of round 1 (default 5e-4)")
    p.add_argument("--expert-lr", type=float, help="peak backbone lr of round 1 (default 5e-5)")
    p.add_argument(
        "--head", choices=["softmax", "dselect"], help="router head (dselect: DSelect-k, use with --top-k)"
    )
    p.add_argument("--top-k", type=positive_int, help="experts per token")
    p.add_argument("--loss", choices=["graded", "kl"], help="router distillation loss (default graded)")
    p.add_argument(
        "--tokens-per-domain", type=positive_int, help="train-split tokens per domain in the batch pool"
    )
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--layerwise",
        action="store_true",
        help="train per-layer gates (baseline) instead of the pre-gating router",
    )
    p.add_argument(
        "--distill", action="store_true", help="expert stages also distil the dense parent's logits"
    )
    p.add_argument("--no-control", action="store_true", help="do not train the same-size dense control")
    p.add_argument(
        "--control-budget",
        choices=["tokens", "updates"],
        help="tokens (default): the control trains on the router- and expert-stage batches; updates: on the "
        "expert-stage batches only (as many backbone updates as the MoE)",
    )
    p.add_argument("--resume", action="store_true", help="continue --out after its last completed stage")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_cache(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    from pregate.checkpoint import LOG_FILE, PLOT_FILE
    from pregate.train import TrainConfig, read_state, train

    flags = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    if args.layerwise:
        flags["layerwise"] = True
    if args.distill:
        flags["expert_distill"] = True
    if args.no_control:
        flags["train_control"] = False
    if args.resume and not args.preset:  # continue with the saved options; given flags must agree with them
        base = read_state(args.out)["config"]
    else:
        base = TrainConfig.preset(args.preset or "cpu").to_dict()
    cfg = TrainConfig(**{**base, **flags})
    out = train(args.model, args.out, cfg, resume=args.resume, force=args.force, cache=args.cache_dir)
    log = json.loads((out / LOG_FILE).read_text())
    for s in log["stages"]:
        extra = f"  router acc {s['last_acc']:.2f}" if "last_acc" in s else ""
        print(
            f"round {s['round'] + 1} {s['stage']:7s} loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}  "
            f"{s['tokens_per_s']:.0f} tok/s  {s['seconds']:.0f} s{extra}"
        )
    parts = "router, MoE" + (", control" if cfg.train_control else "")
    print(f"wrote {out} ({parts}, {LOG_FILE}, {PLOT_FILE}); evaluate with `pregate eval ppl {out}`")


# ----------------------------------------------------------------------------------------- export


def add_export(p) -> None:
    p.add_argument("model", help="a `pregate train` output directory (MoE + pre-gating router + tokenizer)")
    p.add_argument(
        "--out",
        required=True,
        help="output directory (refused if it exists and is not empty, unless --force)",
    )
    p.add_argument("--router", help="directory holding the router, if not the model's own")
    p.add_argument(
        "--force", action="store_true", help="replace --out (only once the new export is complete)"
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    from pregate.export import export_hf

    info = export_hf(args.model, args.out, router_dir=args.router, force=args.force)
    tok = ", ".join(info["tokenizer_files"]) or "none found in the checkpoint"
    print(
        f"wrote {info['out']}: {info['num_experts']} routed experts, router {info['router']}, "
        f"{info['parameters']:,} parameters ({info['dtype']}); tokenizer: {tok}"
    )
    print(f"  load with AutoModelForCausalLM.from_pretrained({info['out']!r}, trust_remote_code=True)")


# ----------------------------------------------------------------------------------------- analyze


def add_analyze(p) -> None:
    from pregate.analyze import AnalyzeConfig

    d = AnalyzeConfig()
    p.add_argument("model", help="a `pregate train` output directory (MoE + pre-gating router)")
    p.add_argument("--out", required=True, help="directory for analysis.json and the PNG figures")
    p.add_argument(
        "--layerwise",
        metavar="DIR",
        help="a `pregate train --layerwise` output trained from the same refactored model "
        "(without it the layer-wise gate analyses are skipped)",
    )
    p.add_argument(
        "--domains", nargs="+", help="domains whose test split to route (default: the experts' domains)"
    )
    p.add_argument(
        "--tokens-per-domain",
        type=positive_int,
        default=d.tokens_per_domain,
        help=f"test-split tokens per domain (default {d.tokens_per_domain}, the paper's sample size)",
    )
    add_option(p, "--block-len", d.block_len, "tokens per block", type=positive_int)
    add_option(p, "--batch-size", d.batch_size, "blocks per forward pass", type=positive_int)
    add_domains(p)
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> None:
    from pregate.analyze import RESULT_FILE, AnalyzeConfig, analyze, format_mi_table, format_summary

    register_domains(args.add_domain)
    cfg = config_from_args(AnalyzeConfig, args)
    result = analyze(args.model, args.out, cfg, layerwise_dir=args.layerwise)
    if "layerwise_gates" not in result:
        print("layer-wise gates: not analysed (see the note below); the per-layer oracle stands in")
    print(format_mi_table(result))
    print(format_summary(result))
    out = Path(args.out)
    print(f"wrote {out / RESULT_FILE} and " + ", ".join(str(out / f) for f in result["figures"]))


# ----------------------------------------------------------------------------------------- demo


def add_demo(p) -> None:
    p.add_argument(
        "--out", default="runs/demo", help="where checkpoints, JSON and plots go (default runs/demo)"
    )
    p.add_argument("--force", action="store_true", help="redo every stage even if its output exists")
    add_cache(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> None:
    from pregate.demo import run_demo

    run_demo(Path(args.out), cache=args.cache_dir, force=args.force)
