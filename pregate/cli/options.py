"""Options that several `pregate` commands share, each defined once.

Defaults come from the config dataclasses, never from literals here. This module imports only the
torch-free `scheduler` and `errors` at the top, so that `pregate --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path

from pregate.errors import PregateError
from pregate.scheduler import SCHEDULING_POLICIES, SchedulerConfig

DTYPES = ("float32", "bfloat16")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def add_option(p, flag: str, default, help: str, **kw) -> None:
    """`p.add_argument(flag, default=default, ...)` whose help ends with the default it shows."""
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    p.add_argument(flag, default=default, help=f"{help} (default {shown})", **kw)


def config_from_args(cls, args: argparse.Namespace, **given):
    """A `cls` dataclass from the parsed flags named like its fields, then `given` (values whose flag has
    another name or is derived, e.g. dense=not args.no_dense)."""
    names = {f.name for f in fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **given})


def add_json(p: argparse.ArgumentParser, what: str = "the results") -> None:
    """`--json FILE` means the same in every command: also write `what` there; plots and traces, where a
    command makes any, go beside it. Without it a command prints its table and writes nothing."""
    p.add_argument(
        "--json", metavar="FILE", help=f"also write {what} as JSON to FILE (plots, if any, beside it)"
    )


def write_json(path: str | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1, default=str))
        print(f"wrote {path}")


def add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where converted base models are cached (default: $PREGATE_CACHE, else ~/.cache/pregate)",
    )


def add_domains(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--add-domain",
        action="append",
        metavar="NAME=PATH",
        help='register your own domain from a folder of .txt/.md files or a JSONL file with a "text" field '
        "(repeatable)",
    )


def register_domains(specs: list[str] | None) -> dict[str, str]:
    from pregate import data

    added = {}
    for spec in specs or []:
        name, _, where = spec.partition("=")
        if not name or not where:
            raise PregateError(f"--add-domain expects NAME=PATH, got {spec!r}")
        data.register_domain(name, where)
        added[name] = str(Path(where).resolve())
    return added


def add_dtype(p: argparse.ArgumentParser, default: str, help: str = "weight dtype") -> None:
    p.add_argument("--dtype", choices=DTYPES, default=default, help=f"{help} (default {default})")


def add_quantize(p: argparse.ArgumentParser, what: str = "the model") -> None:
    """`--quantize int8`: weight-only int8 for inference (pregate.quantize); the default keeps --dtype."""
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help=f"weight-only int8 for {what} and its router: half the bytes of bfloat16 and a faster CPU "
        "kernel; activations keep their dtype (default: off)",
    )


def add_native(p: argparse.ArgumentParser, what: str = "the model") -> None:
    """`--native`: decode rows and the router's decode step in C (pregate.native, pregate.native_router)."""
    p.add_argument(
        "--native",
        action="store_true",
        help=f"run {what}'s decode rows (and whole steps of at most 128 tokens; of any size in bfloat16 "
        "where oneDNN cannot pack bfloat16), every layer in C calls "
        "of at most 8 rows (16 on AVX512-BF16's pair dot products), "
        "and the router's decode step in C "
        "(bfloat16 or --quantize int8 weights, x86-64 with AVX2, their products on AVX512-BF16 where the "
        "CPU has it; built on first use with the C compiler; "
        "within rounding of the default path, docs/serving.md; default: off)",
    )


def add_resident_experts(
    p: argparse.ArgumentParser, many: bool = False, default=None, help: str = ""
) -> None:
    """One name for the expert-cache capacity k, in whole experts: one value (`serve`) or a sweep."""
    kw = {"nargs": "+", "default": list(default)} if many else {"default": default}
    p.add_argument("--resident-experts", metavar="K", type=positive_int, help=help, **kw)


def add_scheduler_options(
    p: argparse.ArgumentParser, defaults: SchedulerConfig | None = None, policy: bool = True
) -> None:
    """The batching options of every command that schedules, with `defaults` (a command's own
    SchedulerConfig, else the dataclass's) shown in the help. `scheduler_config` reads them back.
    policy=False leaves --policy out, for commands that compare several (`--policies`)."""
    d = defaults or SchedulerConfig()
    g = p.add_argument_group("scheduling")
    if policy:
        g.add_argument(
            "--policy",
            choices=SCHEDULING_POLICIES,
            default=d.policy,
            help=f"batching policy (default {d.policy})",
        )
    add_option(g, "--token-budget", d.token_budget, "tokens per step, prefill and decode", type=positive_int)
    add_option(g, "--max-running", d.max_running, "requests running at once", type=positive_int)
    add_option(
        g,
        "--kv-capacity",
        d.kv_capacity_tokens,
        "KV-cache budget in tokens over running requests",
        type=positive_int,
    )
    add_option(
        g,
        "--prefill-chunk",
        d.prefill_chunk,
        "longest prefill chunk of one request in a step",
        type=positive_int,
    )
    g.add_argument(
        "--max-wait-steps",
        type=int,
        default=d.max_wait_steps,
        help="expert-aware: most consecutive steps a decoding request is skipped (default "
        f"{d.max_wait_steps})",
    )
    g.add_argument(
        "--min-queue-tokens",
        type=positive_int,
        default=d.min_queue_tokens,
        help="expert-aware: expert queues below this many tokens wait once a step is half full "
        f"(default {d.min_queue_tokens}; 1 = never)",
    )
    add_option(
        g,
        "--long-prefill-tokens",
        d.long_prefill_tokens,
        "prompts with more prefill left than this share half a step while a shorter prompt waits",
        type=positive_int,
    )
    g.add_argument(
        "--max-bypass-steps",
        type=int,
        default=d.max_bypass_steps,
        help="steps that later requests fitting the KV budget may be admitted past a queue head that "
        f"does not (default {d.max_bypass_steps}; 0 = strict FCFS)",
    )


def scheduler_config(args: argparse.Namespace, policy: str | None = None) -> SchedulerConfig:
    """The SchedulerConfig that `add_scheduler_options` flags describe (`policy` overrides --policy)."""
    given = {"kv_capacity_tokens": args.kv_capacity} | ({"policy": policy} if policy else {})
    return config_from_args(SchedulerConfig, args, **given)


def scheduler_budgets(args: argparse.Namespace) -> dict:
    """The flags' budgets and expert-aware knobs as SchedulerConfig keyword arguments, without the
    policy: for configs that run several policies under the same budgets (`BenchConfig`)."""
    budgets = asdict(scheduler_config(args, policy=SchedulerConfig().policy))
    del budgets["policy"]
    return budgets


def add_workload_options(
    p: argparse.ArgumentParser, requests: int, max_prompt: int, max_output: int, seed: int = 0
) -> None:
    """The ShareGPT workload: how many requests and how long their prompts and outputs may be."""
    g = p.add_argument_group("workload")
    add_option(g, "--requests", requests, "ShareGPT requests", type=positive_int)
    add_option(g, "--max-prompt", max_prompt, "longest prompt in tokens", type=positive_int)
    add_option(g, "--max-output", max_output, "reference output tokens kept", type=positive_int)
    add_option(g, "--seed", seed, "seed of the sample", type=int)
