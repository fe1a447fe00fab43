"""The `pregate` command: thin subcommands over library functions of the same name.

`COMMANDS` lists every subcommand with its one-line help and the function that adds its options.
Those functions import the library (and so torch) to read their defaults, so the parser fills in only
the subcommand on the command line: `pregate --help` and typos stay fast and import no torch.

Layout: `options` holds what several commands share (scheduling, workload, --json, --dtype ...);
`quality`, `offload` and `serving` hold the commands of the three halves of the tool.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pregate.errors import PregateError

DESCRIPTION = (
    "Refactor a dense LLM into a router-decoupled Mixture of Experts (Read-ME) and serve it with pre-gating."
)

GROUPS = {
    "eval": "evaluate quality",
    "bench": "measure serving systems",
    "trace": "routed traces and reference strings",
}

# (path, help, "module:add function"), in the order `pregate --help` lists them
COMMANDS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (
        ("data",),
        "list the domain corpora, their sources and sizes, and which are stand-ins",
        "quality:add_data",
    ),
    (
        ("refactor",),
        "turn a dense model into a MoE checkpoint (activation statistics -> experts)",
        "quality:add_refactor",
    ),
    (
        ("eval", "ppl"),
        "held-out perplexity per domain: dense, MoE under several routings, same-size control",
        "quality:add_eval_ppl",
    ),
    (
        ("eval", "tasks"),
        "downstream tasks (MMLU 5-shot, ARC, HellaSwag, WinoGrande, PIQA, LAMBADA, CoQA) through "
        "lm-evaluation-harness on the packaged data",
        "quality:add_eval_tasks",
    ),
    (
        ("train",),
        "train the router and experts (alternating rounds) and the same-size dense control",
        "quality:add_train",
    ),
    (
        ("export",),
        "write a Hugging Face checkpoint (MoE + pre-gating router in forward) that AutoModelForCausalLM "
        "loads with trust_remote_code=True",
        "quality:add_export",
    ),
    (
        ("analyze",),
        "the paper's routing analyses: layer redundancy (transition matrices, mutual information), "
        "temporal locality, reuse distance, domain x expert usage",
        "quality:add_analyze",
    ),
    (
        ("demo",),
        "the main job end to end on the packaged SmolLM2-135M: refactor, train, evaluate, serve, plot",
        "quality:add_demo",
    ),
    (
        ("bench", "cache"),
        "expert-cache hit ratios per policy and k, and latency with prefetching on/off",
        "offload:add_bench_cache",
    ),
    (
        ("bench", "memory"),
        "peak RSS of a serving engine against the experts it keeps resident (a fresh process per k)",
        "offload:add_bench_memory",
    ),
    (
        ("trace", "export"),
        "write the reference string the expert cache sees (step layer expert per line)",
        "offload:add_trace_export",
    ),
    (
        ("trace", "route"),
        "route ShareGPT prompts and reference answers token by token into a trace for `simulate`",
        "offload:add_trace_route",
    ),
    (
        ("simulate",),
        "replay a routed trace through the scheduler and expert cache with a cost model",
        "offload:add_simulate",
    ),
    (
        ("bench", "serve"),
        "every batching policy, the dense parent and HF generate on one ShareGPT trace, side by side",
        "serving:add_bench_serve",
    ),
    (
        ("bench", "step"),
        "decode- and prefill-step time by batch size and distinct experts, against the floor",
        "serving:add_bench_step",
    ),
    (
        ("bench", "server"),
        "bounded load and fault benchmark of the HTTP server on loopback (streams, disconnects, bursts of "
        "long prompts, bad requests)",
        "serving:add_bench_server",
    ),
    (
        ("serve",),
        "an OpenAI-compatible HTTP server (completions, chat, streaming) over a trained MoE",
        "serving:add_serve",
    ),
)


def _fill(p: argparse.ArgumentParser, target: str) -> None:
    module, _, name = target.partition(":")
    getattr(importlib.import_module(f"pregate.cli.{module}"), name)(p)


def _named_path(argv: Sequence[str]) -> tuple[str, ...]:
    """The leading words of argv, up to the first option: the subcommand it names, if any."""
    words = []
    for word in argv:
        if word.startswith("-") or len(words) == 2:
            break
        words.append(word)
    return tuple(words)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with argv, only the subcommand that argv names gets its options (see the module
    docstring). Without argv every subcommand is filled in."""
    named = None if argv is None else _named_path(argv)
    parser = argparse.ArgumentParser(prog="pregate", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, help, target in COMMANDS:
        parent = sub
        if len(path) == 2:
            if path[0] not in groups:
                group = sub.add_parser(path[0], help=GROUPS[path[0]])
                groups[path[0]] = group.add_subparsers(
                    dest=f"{path[0]}_command", required=True, metavar="KIND"
                )
            parent = groups[path[0]]
        p = parent.add_parser(path[-1], help=help, description=help)
        if named is None or named[: len(path)] == path:
            _fill(p, target)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        args.func(args)
    except PregateError as err:
        print(f"pregate: error: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print("pregate: interrupted", file=sys.stderr)
        return 130
    return 0
