"""The offloading commands: `bench cache`, `bench memory`, `trace route`, `trace export` and `simulate`.

`trace export` and `simulate` replay the traces that `bench cache` and `trace route` write, so their
workload and scheduling defaults are the cache benchmark's (`CacheBenchConfig`)."""

from __future__ import annotations

import json
from pathlib import Path

from pregate.cli.options import (
    add_dtype,
    add_json,
    add_option,
    add_resident_experts,
    add_scheduler_options,
    add_workload_options,
    config_from_args,
    positive_int,
    scheduler_config,
    write_json,
)
from pregate.errors import PregateError


def _cache_bench_defaults():
    from pregate.cache_bench import CacheBenchConfig

    return CacheBenchConfig()


def _add_cache_workload(p) -> None:
    d = _cache_bench_defaults()
    add_workload_options(p, d.requests, d.max_prompt, d.max_output, d.seed)


def _add_cache_scheduler(p) -> None:
    add_scheduler_options(p, _cache_bench_defaults().scheduler)


# ----------------------------------------------------------------------------------------- bench cache


def add_bench_cache(p) -> None:
    d = _cache_bench_defaults()
    p.add_argument("model", help="a MoE checkpoint directory")
    add_json(p)
    add_resident_experts(
        p,
        many=True,
        default=d.capacities,
        help=f"cache capacities k to compare, in whole experts (default {' '.join(map(str, d.capacities))})",
    )
    p.add_argument(
        "--bandwidth",
        type=float,
        default=d.bandwidth,
        help=f"bytes/s cap of the emulated slow tier (default {d.bandwidth:g})",
    )
    add_option(p, "--depth", d.depth, "layers prefetched ahead", type=positive_int)
    p.add_argument(
        "--router", help="directory of a trained router (default: the model's, else oracle routing)"
    )
    p.add_argument("--no-measure", action="store_true", help="only the cache simulation, no model runs")
    add_option(
        p,
        "--repeats",
        d.repeats,
        "measured runs of every setting, interleaved; odd (the median is one of them)",
        type=positive_int,
    )
    _add_cache_workload(p)
    _add_cache_scheduler(p)
    p.set_defaults(func=cmd_bench_cache)


def cmd_bench_cache(args) -> None:
    from pregate.cache_bench import CacheBenchConfig, bench_cache, format_cache_table

    cfg = config_from_args(
        CacheBenchConfig,
        args,
        capacities=tuple(args.resident_experts),
        scheduler=scheduler_config(args),
        measure=not args.no_measure,
    )
    out_dir = Path(args.json).parent if args.json else None
    result = bench_cache(args.model, cfg, out_dir)
    print(format_cache_table(result))
    print(f"routing: {result['routing']}")
    if out_dir is not None:
        print(f"plots, routed trace and reference string in {out_dir}")
    write_json(args.json, result)


# ----------------------------------------------------------------------------------------- traces


def add_trace_route(p) -> None:
    p.add_argument(
        "model", help="a MoE checkpoint directory (its trained router is used, else oracle routing)"
    )
    p.add_argument("--out", required=True, help="output JSONL trace")
    p.add_argument("--router", help="directory of a trained router (default: the model's own)")
    _add_cache_workload(p)
    p.set_defaults(func=cmd_trace_route)


def cmd_trace_route(args) -> None:
    from pregate.cache_bench import route_sharegpt
    from pregate.workload import save_trace

    requests, how = route_sharegpt(
        args.model, args.requests, args.max_prompt, args.max_output, args.seed, args.router
    )
    save_trace(args.out, [r.trace for r in requests])
    print(f"wrote {args.out}: {len(requests)} ShareGPT requests, {how}")


def add_trace_export(p) -> None:
    from pregate.eviction import UNITS

    p.add_argument(
        "model", help="a MoE checkpoint directory (layer and expert counts; routes ShareGPT if no --trace)"
    )
    p.add_argument("--out", required=True, help="output text file")
    p.add_argument("--trace", help="a routed trace JSONL (e.g. routed_trace.jsonl from `bench cache`)")
    p.add_argument(
        "--unit", choices=UNITS, default="expert", help="cache unit: whole expert or (layer, expert) slice"
    )
    _add_cache_workload(p)
    _add_cache_scheduler(p)
    p.set_defaults(func=cmd_trace_export)


def cmd_trace_export(args) -> None:
    from pregate.moe import load_config
    from pregate.references import write_references
    from pregate.sim import scheduled_steps
    from pregate.workload import load_trace

    moe_cfg = load_config(args.model)  # the checkpoint gives the layer and expert counts
    if args.trace:
        traces = load_trace(args.trace)
    else:
        from pregate.cache_bench import route_sharegpt

        routed, _ = route_sharegpt(args.model, args.requests, args.max_prompt, args.max_output, args.seed)
        traces = [r.trace for r in routed]
    steps = scheduled_steps(traces, scheduler_config(args))
    path = write_references(args.out, steps, moe_cfg.num_layers, moe_cfg.num_experts, args.unit)
    print(
        f"wrote {path}: {len(steps)} steps, unit {args.unit} (format: see "
        "pregate.references.write_references)"
    )


# ----------------------------------------------------------------------------------------- simulate


def add_simulate(p) -> None:
    from pregate.eviction import EVICTION_POLICIES, UNITS
    from pregate.scheduler import SCHEDULING_POLICIES
    from pregate.sim import PRESETS

    d = _cache_bench_defaults()
    p.add_argument("trace", help="a routed trace JSONL (prompt_experts and output_experts per request)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="llama2-7b-a100",
        help="documented cost model (default llama2-7b-a100)",
    )
    p.add_argument(
        "--cost",
        help="a cost model JSON, a `bench cache` JSON (its calibrated model) or a `bench serve` JSON "
        "(fitted to its measured engine steps); overrides --preset",
    )
    p.add_argument(
        "--policies",
        nargs="+",
        choices=SCHEDULING_POLICIES,
        help="compare these batching policies instead (every expert resident, no offloading)",
    )
    p.add_argument(
        "--rate",
        type=float,
        help="with --policies: Poisson arrivals at this many requests/s (default: the trace's times)",
    )
    p.add_argument("--requests", type=positive_int, help="use only the first N requests of the trace")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    add_resident_experts(
        p,
        many=True,
        default=d.capacities,
        help=f"cache capacities k, in units (default {' '.join(map(str, d.capacities))})",
    )
    p.add_argument("--unit", choices=UNITS, default="expert")
    p.add_argument(
        "--cache-policy", choices=EVICTION_POLICIES, default="belady", help="eviction policy (default belady)"
    )
    add_option(p, "--depth", d.depth, "layers prefetched ahead", type=positive_int)
    add_json(p)
    _add_cache_scheduler(p)
    p.set_defaults(func=cmd_simulate)


def _read_cost(args):
    from pregate.sim import PRESETS, cost_from_json

    if not args.cost:
        return PRESETS[args.preset]()
    path = Path(args.cost)
    if not path.is_file():
        raise PregateError(f"--cost {path}: no such file")
    try:
        return cost_from_json(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise PregateError(f"--cost {path} is not JSON ({err})") from None


def cmd_simulate(args) -> None:
    from pregate.workload import load_trace

    cost = _read_cost(args)
    traces = load_trace(args.trace)
    if args.requests is not None:
        traces = traces[: args.requests]
    scfg = scheduler_config(args)  # a bad option is refused before anything prints
    print(f"cost model: {cost.source}")
    if args.policies:
        _compare_policies(args, cost, traces, scfg)
    else:
        _sweep_capacities(args, cost, traces, scfg)


def _compare_policies(args, cost, traces, scfg) -> None:
    from pregate.sim import compare_policies, format_policy_table

    result = compare_policies(traces, cost, args.policies, scfg, args.rate, args.seed)
    arrivals = "trace arrival times" if args.rate is None else f"Poisson {args.rate} req/s (seed {args.seed})"
    print(
        f"{len(traces)} requests, {arrivals}, token budget {scfg.token_budget}, max running "
        f"{scfg.max_running}, "
        "every expert resident (normalized latency in ms/token, simulated)"
    )
    baseline = "decode-first" if "decode-first" in args.policies else args.policies[0]
    print(format_policy_table(result, baseline))
    write_json(
        args.json,
        {"cost_model": cost.to_dict(), "rate": args.rate, "requests": len(traces), "policies": result},
    )


def _sweep_capacities(args, cost, traces, scfg) -> None:
    from pregate.sim import SimConfig, simulate

    rows = []
    print("k   prefetch  hit ratio  normalized latency (s/token)  stall (s)")
    for k in args.resident_experts:
        for prefetch in (False, True):
            sim_cfg = SimConfig(
                capacity=k,
                unit=args.unit,
                policy=args.cache_policy,
                prefetch=prefetch,
                depth=args.depth,
                scheduler=scfg,
            )
            r = simulate(traces, cost, sim_cfg)
            nl = r.summary["normalized_latency"]["mean"]
            rows.append({"k": k, "prefetch": prefetch, **r.to_dict()})
            print(
                f"{k:<3d} {str(prefetch):<9s} {100 * r.cache.hit_ratio:6.1f}%    {nl:<28.4g}  {r.stall_s:.3g}"
            )
    write_json(args.json, {"cost_model": cost.to_dict(), "runs": rows})


# ----------------------------------------------------------------------------------------- bench memory


def add_bench_memory(p) -> None:
    from pregate.memory_bench import MemoryBenchConfig

    d = MemoryBenchConfig()
    p.add_argument("model", help="a `pregate train` output directory (MoE + pre-gating router)")
    add_json(p)
    add_resident_experts(
        p,
        many=True,
        default=d.resident_experts,
        help="experts the store keeps resident, one fresh process each "
        f"(default {' '.join(map(str, d.resident_experts))}; every expert resident and the imports alone "
        "are always measured)",
    )
    add_option(p, "--requests", d.requests, "prompts each probe serves", type=positive_int)
    add_option(p, "--prompt-len", d.prompt_len, "tokens per prompt", type=positive_int)
    add_option(p, "--max-tokens", d.max_tokens, "tokens generated per prompt", type=positive_int)
    add_dtype(p, d.dtype)
    p.set_defaults(func=cmd_bench_memory)


def cmd_bench_memory(args) -> None:
    from pregate.memory_bench import MemoryBenchConfig, format_memory_table, run_memory_bench

    result = run_memory_bench(args.model, config_from_args(MemoryBenchConfig, args))
    print(format_memory_table(result))
    write_json(args.json, result)
