"""The `pregate` command: thin subcommands over library functions of the same name."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pregate.errors import PregateError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where converted base models are cached (default: $PREGATE_CACHE, else ~/.cache/pregate)",
    )


def _write_json(path: str | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1))
        print(f"wrote {path}")


# ----------------------------------------------------------------------------------------- data


def cmd_data(args) -> None:
    from pregate import data

    for path in args.add or []:
        name, _, where = path.partition("=")
        if not where:
            raise PregateError(f"--add expects NAME=PATH, got {path!r}")
        data.register_domain(name, where)
    rows = data.describe_domains()
    if args.json:
        _write_json(args.json, {"domains": rows})
    cols = ["name", "documents", "train", "validation", "test", "bytes", "stand_in", "source"]
    print("  ".join(c.ljust(12) if c != "source" else c for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(12) if c != "source" else str(r.get(c, "")) for c in cols))
    for r in rows:
        if r.get("stand_in") and r.get("note"):
            print(f"  {r['name']}: {r['note']}")


# ----------------------------------------------------------------------------------------- refactor


def cmd_refactor(args) -> None:
    from pregate.config import REFACTOR_PRESETS, RefactorConfig
    from pregate.extract import refactor

    base = REFACTOR_PRESETS[args.preset].to_dict()
    for key in ("domains", "tokens_per_domain", "block_len", "remain_rate", "seed", "dtype", "batch_size"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    cfg = RefactorConfig(**base)
    out = refactor(args.base, args.out, cfg, force=args.force, cache=args.cache_dir)
    record = json.loads((out / "refactor.json").read_text())
    ch = record["channels_per_layer"]
    print(f"wrote MoE checkpoint {out} (same-size dense control in {out / 'control'})")
    print(f"  MLP channels per layer: {ch['total']} dense; shared expert mean {sum(ch['shared']) / len(ch['shared']):.0f}; "
          f"activated per token {record['activated_channels_mean']:.0f}")
    for d, widths in ch["routed"].items():
        print(f"  expert {d:14s} mean routed channels {sum(widths) / len(widths):.0f}")


# ----------------------------------------------------------------------------------------- eval


def cmd_eval_ppl(args) -> None:
    from pregate.evaluate import PplConfig, evaluate_ppl, format_table

    cfg = PplConfig(
        domains=args.domains,
        tokens_per_domain=args.tokens_per_domain,
        block_len=args.block_len,
        batch_size=args.batch_size,
        variants=args.variants or PplConfig().variants,
        seed=args.seed,
    )
    result = evaluate_ppl(args.model, cfg, cache=args.cache_dir)
    print(format_table(result))
    _write_json(args.json, result)


# ----------------------------------------------------------------------------------------- demo


def cmd_demo(args) -> None:
    from pregate.demo import run_demo

    run_demo(Path(args.out), cache=args.cache_dir, force=args.force)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pregate",
        description="Refactor a dense LLM into a router-decoupled Mixture of Experts (Read-ME) and serve it with pre-gating.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="list the domain corpora, their sources and sizes, and which are stand-ins")
    p.add_argument("--add", action="append", metavar="NAME=PATH", help="also register a domain from a folder of text files or a JSONL file")
    p.add_argument("--json", help="also write the listing as JSON to this file")
    p.set_defaults(func=cmd_data)

    from pregate.config import REFACTOR_PRESETS

    p = sub.add_parser("refactor", help="turn a dense model into a MoE checkpoint (activation statistics -> experts)")
    p.add_argument("base", help="base model: a packaged name (smollm2-135m), a .gguf file or a HF checkpoint directory")
    p.add_argument("--out", required=True, help="output checkpoint directory (refused if it exists, unless --force)")
    p.add_argument("--preset", choices=sorted(REFACTOR_PRESETS), default="paper", help="starting values for the options below (default: paper)")
    p.add_argument("--domains", nargs="+", help="domains whose experts to extract (default: all seven)")
    p.add_argument("--tokens-per-domain", type=_positive_int, help="train-split tokens per domain for the statistics (paper: 65536)")
    p.add_argument("--block-len", type=_positive_int, help="tokens per statistics block (default 512)")
    p.add_argument("--remain-rate", type=float, help="fraction of MLP channels each domain keeps, in (0, 1] (default 0.5)")
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the written weights (default bfloat16)")
    p.add_argument("--batch-size", type=_positive_int, help="blocks per forward pass while collecting statistics")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (only once the new checkpoint is complete)")
    _add_cache(p)
    p.set_defaults(func=cmd_refactor)

    ev = sub.add_parser("eval", help="evaluate quality").add_subparsers(dest="eval_command", required=True, metavar="KIND")
    p = ev.add_parser("ppl", help="held-out perplexity per domain: dense, MoE under several routings, same-size control")
    p.add_argument("model", help="a MoE checkpoint directory written by `pregate refactor`")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--domains", nargs="+", help="domains to evaluate (default: the checkpoint's expert domains)")
    p.add_argument("--tokens-per-domain", type=_positive_int, default=4096, help="test-split tokens per domain (default 4096)")
    p.add_argument("--block-len", type=_positive_int, default=512)
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--variants", nargs="+", help="subset of: dense moe_domain moe_oracle moe_random control")
    p.add_argument("--seed", type=int, default=0, help="seed of the random routing")
    _add_cache(p)
    p.set_defaults(func=cmd_eval_ppl)

    p = sub.add_parser("demo", help="the main job end to end on the packaged SmolLM2-135M: refactor, evaluate, plot")
    p.add_argument("--out", default="runs/demo", help="where checkpoints, JSON and plots go (default runs/demo)")
    p.add_argument("--force", action="store_true", help="redo every stage even if its output exists")
    _add_cache(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PregateError as err:
        print(f"pregate: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pregate: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
