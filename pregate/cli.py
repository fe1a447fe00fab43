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


def _add_domains(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--add-domain",
        action="append",
        metavar="NAME=PATH",
        help="register your own domain from a folder of .txt/.md files or a JSONL file with a \"text\" field (repeatable)",
    )


def _register_domains(specs: list[str] | None) -> dict[str, str]:
    from pregate import data

    added = {}
    for spec in specs or []:
        name, _, where = spec.partition("=")
        if not name or not where:
            raise PregateError(f"--add-domain expects NAME=PATH, got {spec!r}")
        data.register_domain(name, where)
        added[name] = str(Path(where).resolve())
    return added


def _write_json(path: str | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1))
        print(f"wrote {path}")


# ----------------------------------------------------------------------------------------- data


def cmd_data(args) -> None:
    from pregate import data

    _register_domains(args.add_domain)
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
    from pregate.checkpoint import CONTROL_DIR, RECORD_FILE
    from pregate.refactor import REFACTOR_PRESETS, RefactorConfig, refactor

    base = REFACTOR_PRESETS[args.preset].to_dict()
    for key in ("domains", "tokens_per_domain", "block_len", "remain_rate", "seed", "dtype", "batch_size"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    custom = _register_domains(args.add_domain)
    if custom and args.domains is None:
        raise PregateError("with --add-domain, also list the experts' domains with --domains (built-in and your own)")
    cfg = RefactorConfig(**base)
    out = refactor(args.base, args.out, cfg, force=args.force, cache=args.cache_dir, custom_domains=custom)
    record = json.loads((out / RECORD_FILE).read_text())
    ch = record["channels_per_layer"]
    print(f"wrote MoE checkpoint {out} (same-size dense control in {out / CONTROL_DIR})")
    print(f"  MLP channels per layer: {ch['total']} dense; shared expert mean {sum(ch['shared']) / len(ch['shared']):.0f}; "
          f"activated per token {record['activated_channels_mean']:.0f}")
    for d, widths in ch["routed"].items():
        print(f"  expert {d:14s} mean routed channels {sum(widths) / len(widths):.0f}")


# ----------------------------------------------------------------------------------------- eval


def cmd_eval_ppl(args) -> None:
    from pregate.evaluate import PplConfig, evaluate_ppl, format_table

    _register_domains(args.add_domain)
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


def cmd_eval_tasks(args) -> None:
    from pregate.tasks import evaluate_tasks, format_paper_table, format_table

    if args.check_hf:
        from pregate.harness import crosscheck_hf

        limit = args.limit or 20
        report = crosscheck_hf(args.model, args.tasks, limit, args.cache_dir, args.batch_size)
        print("task                      items  requests  max |dlogL|   acc ours / hf      "
              "acc_norm ours / hf")
        for task, r in report["tasks"].items():
            norm = "-"
            if r["acc_norm_pregate"] is not None:
                norm = f"{r['acc_norm_pregate']:.3f} / {r['acc_norm_hf']:.3f}"
            print(f"{task:24s} {r['items']:6d} {r['requests']:9d}  {r['max_abs_diff']:11.2e}   "
                  f"{r['acc_pregate']:.3f} / {r['acc_hf']:.3f}      {norm}")
        _write_json(args.json, report)
        return
    result = evaluate_tasks(args.model, args.tasks, args.variants, limit=args.limit,
                            batch_size=args.batch_size, cache=args.cache_dir, seed=args.seed)
    print(format_table(result))
    print()
    print(format_paper_table(result))
    _write_json(args.json, result)


# ----------------------------------------------------------------------------------------- train

_TRAIN_FLAGS = ("rounds", "router_steps", "expert_steps", "batch_size", "seq_len", "router_lr", "expert_lr",
                "head", "top_k", "loss", "tokens_per_domain", "seed", "control_budget")


def cmd_train(args) -> None:
    from pregate.checkpoint import LOG_FILE, PLOT_FILE
    from pregate.train import TrainConfig, read_state, train

    flags = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    flags.update({k: v for k, v in (("layerwise", args.layerwise), ("expert_distill", args.distill)) if v})
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
        print(f"round {s['round'] + 1} {s['stage']:7s} loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}  "
              f"{s['tokens_per_s']:.0f} tok/s  {s['seconds']:.0f} s{extra}")
    print(f"wrote {out} (router, MoE{', control' if cfg.train_control else ''}, {LOG_FILE}, {PLOT_FILE}); "
          f"evaluate with `pregate eval ppl {out}`")


# ----------------------------------------------------------------------------------------- export


def cmd_export(args) -> None:
    from pregate.export import export_hf

    info = export_hf(args.model, args.out, router_dir=args.router, force=args.force)
    tok = ", ".join(info["tokenizer_files"]) or "none found in the checkpoint"
    print(f"wrote {info['out']}: {info['num_experts']} routed experts, router {info['router']}, "
          f"{info['parameters']:,} parameters ({info['dtype']}); tokenizer: {tok}")
    print(f"  load with AutoModelForCausalLM.from_pretrained({info['out']!r}, trust_remote_code=True)")


# ----------------------------------------------------------------------------------------- analyze


def cmd_analyze(args) -> None:
    from pregate.analyze import RESULT_FILE, AnalyzeConfig, analyze, format_mi_table, format_summary

    _register_domains(args.add_domain)
    cfg = AnalyzeConfig(
        domains=args.domains,
        tokens_per_domain=args.tokens_per_domain,
        block_len=args.block_len,
        batch_size=args.batch_size,
    )
    result = analyze(args.model, args.out, cfg, layerwise_dir=args.layerwise)
    if "layerwise_gates" not in result:
        print("layer-wise gates: not analysed (see the note below); the per-layer oracle stands in")
    print(format_mi_table(result))
    print(format_summary(result))
    out = Path(args.out)
    print(f"wrote {out / RESULT_FILE} and " + ", ".join(str(out / f) for f in result["figures"]))


# ----------------------------------------------------------------------------------------- demo


def cmd_demo(args) -> None:
    from pregate.demo import run_demo

    run_demo(Path(args.out), cache=args.cache_dir, force=args.force)


# ----------------------------------------------------------------------------------------- offloading


def _group(sub, name: str, help: str):
    """The sub-command group `name`, reused if another command already created it."""
    if name in sub.choices:
        return next(a for a in sub.choices[name]._actions if isinstance(a, argparse._SubParsersAction))
    return sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True, metavar="KIND")


def cmd_bench_cache(args) -> None:
    from pregate.sim import format_cache_table, save_json
    from pregate.store import CacheBenchConfig, bench_cache

    cfg = CacheBenchConfig(requests=args.requests, max_prompt=args.max_prompt, max_output=args.max_output, seed=args.seed,
                           capacities=tuple(args.k), bandwidth=args.bandwidth, depth=args.depth,
                           token_budget=args.token_budget, max_running=args.max_running, router=args.router,
                           measure=not args.no_measure)
    out_dir = Path(args.json).parent if args.json else Path("runs/offload")
    result = bench_cache(args.model, cfg, out_dir)
    print(format_cache_table(result))
    print(f"routing: {result['routing']}; plots, routed trace and reference string in {out_dir}")
    if args.json:
        save_json(args.json, result)
        print(f"wrote {args.json}")


def cmd_trace_export(args) -> None:
    from pregate.moe import load_config
    from pregate.scheduler import SchedulerConfig
    from pregate.sim import scheduled_steps, write_references
    from pregate.workload import load_trace

    moe_cfg = load_config(args.model)  # the checkpoint gives the layer and expert counts
    layers, experts = moe_cfg.num_layers, moe_cfg.num_experts
    if args.trace:
        traces = load_trace(args.trace)
    else:
        from pregate.store import route_sharegpt

        traces = [r.trace for r in route_sharegpt(args.model, args.requests, args.max_prompt, args.max_output, args.seed)[0]]
    steps = scheduled_steps(traces, SchedulerConfig(policy=args.policy, token_budget=args.token_budget, max_running=args.max_running))
    path = write_references(args.out, steps, layers, experts, args.unit)
    print(f"wrote {path}: {len(steps)} steps, unit {args.unit} (format: see pregate.sim.write_references)")


def cmd_simulate(args) -> None:
    from pregate.scheduler import SchedulerConfig
    from pregate.sim import PRESETS, SimConfig, compare_policies, cost_from_json, format_policy_table, save_json, simulate
    from pregate.workload import load_trace

    if args.cost:
        path = Path(args.cost)
        if not path.is_file():
            raise PregateError(f"--cost {path}: no such file")
        try:
            cost = cost_from_json(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise PregateError(f"--cost {path} is not JSON ({err})") from None
    else:
        cost = PRESETS[args.preset]()
    traces = load_trace(args.trace)
    if args.requests is not None:
        traces = traces[: args.requests]
    scfg = SchedulerConfig(policy=args.policy, token_budget=args.token_budget, max_running=args.max_running)
    print(f"cost model: {cost.source}")
    if args.policies:
        result = compare_policies(traces, cost, args.policies, scfg, args.rate, args.seed)
        arrivals = "trace arrival times" if args.rate is None else f"Poisson {args.rate} req/s (seed {args.seed})"
        print(f"{len(traces)} requests, {arrivals}, token budget {args.token_budget}, max running {args.max_running}, "
              f"every expert resident (normalized latency in ms/token, simulated)")
        print(format_policy_table(result, args.policies[0] if "decode-first" not in args.policies else "decode-first"))
        if args.json:
            save_json(args.json, {"cost_model": cost.to_dict(), "rate": args.rate, "requests": len(traces), "policies": result})
            print(f"wrote {args.json}")
        return
    rows = []
    print("k   prefetch  hit ratio  normalized latency (s/token)  stall (s)")
    for k in args.k:
        for prefetch in (False, True):
            r = simulate(traces, cost, SimConfig(capacity=k, unit=args.unit, policy=args.cache_policy, prefetch=prefetch,
                                                  depth=args.depth, scheduler=scfg))
            nl = r.summary["normalized_latency"]["mean"]
            rows.append({"k": k, "prefetch": prefetch, **r.to_dict()})
            print(f"{k:<3d} {str(prefetch):<9s} {100 * r.cache.hit_ratio:6.1f}%    {nl:<28.4g}  {r.stall_s:.3g}")
    if args.json:
        save_json(args.json, {"cost_model": cost.to_dict(), "runs": rows})
        print(f"wrote {args.json}")


def cmd_trace_route(args) -> None:
    from pregate.store import route_sharegpt
    from pregate.workload import save_trace

    requests, how = route_sharegpt(args.model, args.requests, args.max_prompt, args.max_output, args.seed, args.router)
    save_trace(args.out, [r.trace for r in requests])
    print(f"wrote {args.out}: {len(requests)} ShareGPT requests, {how}")


def _add_offload_commands(sub) -> None:
    from pregate.eviction import POLICY_NAMES
    from pregate.scheduler import POLICY_NAMES as SCHED_POLICIES
    from pregate.sim import PRESETS, UNITS

    def workload_args(p) -> None:
        p.add_argument("--requests", type=_positive_int, default=24, help="ShareGPT requests (default 24)")
        p.add_argument("--max-prompt", type=_positive_int, default=128, help="longest prompt in tokens (default 128)")
        p.add_argument("--max-output", type=_positive_int, default=64, help="reference response tokens kept (default 64)")
        p.add_argument("--seed", type=int, default=0)

    def sched_args(p) -> None:
        p.add_argument("--policy", choices=SCHED_POLICIES, default="expert-aware", help="batching policy (default expert-aware)")
        p.add_argument("--token-budget", type=_positive_int, default=64, help="tokens per step (default 64)")
        p.add_argument("--max-running", type=_positive_int, default=16, help="requests running at once (default 16)")

    p = _group(sub, "bench", "measure serving systems").add_parser(
        "cache", help="expert-cache hit ratios per policy and k, and latency with prefetching on/off")
    p.add_argument("model", help="a MoE checkpoint directory")
    p.add_argument("--json", help="write the results here (plots and traces go beside it)")
    p.add_argument("--k", type=_positive_int, nargs="+", default=[2, 3, 4, 5], help="capacities in whole experts (default 2 3 4 5)")
    p.add_argument("--bandwidth", type=float, default=1e9, help="bytes/s cap of the emulated slow tier (default 1e9)")
    p.add_argument("--depth", type=_positive_int, default=1, help="layers prefetched ahead (default 1)")
    p.add_argument("--router", help="directory of a trained router (default: the model's, else oracle routing)")
    p.add_argument("--no-measure", action="store_true", help="only the cache simulation, no model runs")
    workload_args(p)
    sched_args(p)
    p.set_defaults(func=cmd_bench_cache)

    p = _group(sub, "trace", "routed traces and reference strings").add_parser(
        "export", help="write the reference string the expert cache sees (step layer expert per line)")
    p.add_argument("model", help="a MoE checkpoint directory (layer and expert counts; routes ShareGPT if no --trace)")
    p.add_argument("--out", required=True, help="output text file")
    p.add_argument("--trace", help="a routed trace JSONL (e.g. routed_trace.jsonl from `bench cache`)")
    p.add_argument("--unit", choices=UNITS, default="expert", help="cache unit: whole expert or (layer, expert) slice")
    workload_args(p)
    sched_args(p)
    p.set_defaults(func=cmd_trace_export)

    p = _group(sub, "trace", "routed traces and reference strings").add_parser(
        "route", help="route ShareGPT prompts and reference answers token by token into a trace for `simulate`")
    p.add_argument("model", help="a MoE checkpoint directory (its trained router is used, else oracle routing)")
    p.add_argument("--out", required=True, help="output JSONL trace")
    p.add_argument("--router", help="directory of a trained router (default: the model's own)")
    workload_args(p)
    p.set_defaults(func=cmd_trace_route)

    p = sub.add_parser("simulate", help="replay a routed trace through the scheduler and expert cache with a cost model")
    p.add_argument("trace", help="a routed trace JSONL (prompt_experts and output_experts per request)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama2-7b-a100", help="documented cost model (default llama2-7b-a100)")
    p.add_argument("--cost", help="a cost model JSON, a `bench cache` JSON (its calibrated model) or a `bench serve` JSON "
                   "(fitted to its measured engine steps); overrides --preset")
    p.add_argument("--policies", nargs="+", choices=SCHED_POLICIES,
                   help="compare these batching policies instead (every expert resident, no offloading)")
    p.add_argument("--rate", type=float, help="with --policies: Poisson arrivals at this many requests/s (default: the trace's times)")
    p.add_argument("--requests", type=_positive_int, help="use only the first N requests of the trace")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    p.add_argument("--k", type=_positive_int, nargs="+", default=[2, 3, 4, 5], help="capacities in units (default 2 3 4 5)")
    p.add_argument("--unit", choices=UNITS, default="expert")
    p.add_argument("--cache-policy", choices=POLICY_NAMES, default="belady")
    p.add_argument("--depth", type=_positive_int, default=1, help="layers prefetched ahead (default 1)")
    p.add_argument("--json", help="write the results here")
    sched_args(p)
    p.set_defaults(func=cmd_simulate)


# ----------------------------------------------------------------------------------------- serving


def cmd_bench_serve(args) -> None:
    from pregate.bench import BenchConfig, bench_serve

    cfg = BenchConfig(policies=args.policies, requests=args.requests, rate=args.rate or None, seed=args.seed,
                      token_budget=args.token_budget, max_running=args.max_running, repeats=args.repeats,
                      max_prompt_tokens=args.max_prompt, max_output_tokens=args.max_output, dtype=args.dtype,
                      max_wait_steps=args.max_wait_steps, min_queue_tokens=args.min_queue_tokens,
                      dense=not args.no_dense, hf=not args.no_hf)
    bench_serve(args.model, args.json, cfg, args.trace)


def cmd_bench_step(args) -> None:
    from pregate.bench_step import StepBenchConfig, bench_step

    cfg = StepBenchConfig(
        batch_sizes=args.batch_sizes, expert_batch=args.expert_batch, experts=args.experts,
        batch_experts=args.batch_experts, prompt_len=args.prompt_len, warmup_steps=args.warmup,
        decode_steps=args.steps, repeats=args.repeats, dtype=args.dtype, dense=not args.no_dense,
        hf=not args.no_hf, llama_cpp=not args.no_llama_cpp, breakdown=not args.no_breakdown,
        layerwise=args.layerwise, gguf=args.gguf, floor_mb=args.floor_mb, seed=args.seed,
    )
    bench_step(args.model, args.json, cfg)


def cmd_bench_server(args) -> None:
    from pregate.loadtest import ServerBenchConfig, bench_server, format_result
    from pregate.scheduler import SchedulerConfig
    from pregate.server import load_engine

    cfg = ServerBenchConfig(clients=args.clients, requests_per_client=args.requests_per_client, max_tokens=args.max_tokens,
                            disconnect_share=args.disconnect_share, bad_share=args.bad_share, bursts=args.bursts,
                            long_prompts=args.long_prompts, long_prompt_tokens=args.long_prompt_tokens,
                            timeout_s=args.timeout, seed=args.seed)
    sched = SchedulerConfig(policy=args.policy, max_running=args.max_running)
    engine = load_engine(args.model, sched, dtype=args.dtype)
    print(format_result(bench_server(engine, cfg, args.json, model_name="bench")))


def cmd_serve(args) -> None:
    from pregate.scheduler import SchedulerConfig
    from pregate.server import ServerLimits, serve

    cfg = SchedulerConfig(policy=args.policy, token_budget=args.token_budget, max_running=args.max_running,
                          kv_capacity_tokens=args.kv_capacity, max_wait_steps=args.max_wait_steps,
                          min_queue_tokens=args.min_queue_tokens)
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_queued=args.max_queued, api_key=args.api_key,
                          cors_origins=tuple(args.cors_origin), docs=args.docs)
    serve(args.model, args.host, args.port, cfg, args.router, args.dtype, args.name, args.resident_experts, args.prefetch,
          limits, timeout_keep_alive=args.timeout_keep_alive, timeout_graceful=args.timeout_graceful)


def _add_expert_aware_args(p: argparse.ArgumentParser, max_wait: int, min_queue: int) -> None:
    p.add_argument("--max-wait-steps", type=int, default=max_wait,
                   help=f"expert-aware: most consecutive steps a decoding request is skipped (default {max_wait})")
    p.add_argument("--min-queue-tokens", type=_positive_int, default=min_queue,
                   help=f"expert-aware: expert queues below this many tokens wait once a step is half full (default {min_queue}; 1 = never)")


def _add_serve_commands(sub) -> None:
    from pregate.bench import BenchConfig
    from pregate.scheduler import POLICY_NAMES as SCHED_POLICIES
    from pregate.scheduler import SchedulerConfig

    d = BenchConfig()
    p = _group(sub, "bench", "measure serving systems").add_parser(
        "serve", help="every batching policy, the dense parent and HF generate on one ShareGPT trace, side by side")
    p.add_argument("model", help="a MoE checkpoint directory (its trained router is used; none: one is distilled)")
    p.add_argument("--json", required=True, help="write the results here (PNG plots go beside it)")
    p.add_argument("--policies", nargs="+", choices=SCHED_POLICIES, default=list(SCHED_POLICIES))
    p.add_argument("--requests", type=_positive_int, default=d.requests, help=f"ShareGPT requests (default {d.requests})")
    p.add_argument("--rate", type=float, default=d.rate, help=f"Poisson arrivals per second (default {d.rate}); 0 = all at t=0")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--trace", help="JSONL trace: replayed if it exists, else the generated trace is saved there")
    p.add_argument("--token-budget", type=_positive_int, default=d.token_budget, help=f"tokens per step, all policies (default {d.token_budget})")
    p.add_argument("--max-running", type=_positive_int, default=d.max_running, help=f"concurrent requests, all runs (default {d.max_running})")
    _add_expert_aware_args(p, d.max_wait_steps, d.min_queue_tokens)
    p.add_argument("--repeats", type=_positive_int, default=d.repeats, help=f"interleaved repeats; medians are reported (default {d.repeats})")
    p.add_argument("--max-prompt", type=_positive_int, default=d.max_prompt_tokens, help=f"longest prompt in tokens (default {d.max_prompt_tokens})")
    p.add_argument("--max-output", type=_positive_int, default=d.max_output_tokens, help=f"reference output tokens kept (default {d.max_output_tokens})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype)
    p.add_argument("--no-dense", action="store_true", help="skip the dense parent in the engine")
    p.add_argument("--no-hf", action="store_true", help="skip HF generate with static batches")
    p.set_defaults(func=cmd_bench_serve)

    from pregate.bench_step import StepBenchConfig

    d = StepBenchConfig()
    p = _group(sub, "bench", "measure serving systems").add_parser(
        "step", help="decode- and prefill-step time by batch size and distinct experts, against the floor"
    )
    p.add_argument("model", help="a MoE checkpoint directory (its dense parent is the baseline)")
    p.add_argument("--json", required=True, help="write the results here (the PNG plot goes beside it)")
    # plain int, not _positive_int: StepBenchConfig says what is wrong with a bad value
    p.add_argument("--batch-sizes", type=int, nargs="+", default=d.batch_sizes,
                   help=f"batch sizes of the batch sweep (default {' '.join(map(str, d.batch_sizes))})")
    p.add_argument("--expert-batch", type=int, default=d.expert_batch,
                   help=f"batch of the distinct-experts sweep (default {d.expert_batch})")
    p.add_argument("--experts", type=int, nargs="+", help="distinct experts of that sweep (default 1..E)")
    p.add_argument("--batch-experts", type=int, default=d.batch_experts,
                   help=f"distinct experts in the batch sweep (default {d.batch_experts})")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len,
                   help=f"prompt tokens per request (default {d.prompt_len})")
    p.add_argument("--warmup", type=int, default=d.warmup_steps,
                   help=f"untimed decode steps per measurement (default {d.warmup_steps})")
    p.add_argument("--steps", type=int, default=d.decode_steps,
                   help=f"timed decode steps per measurement (default {d.decode_steps})")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help=f"interleaved repeats, odd, >= 3 (default {d.repeats})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype)
    p.add_argument("--layerwise", metavar="DIR",
                   help="a `pregate train --layerwise` output: also break down a step with its gate")
    p.add_argument("--gguf", help="GGUF of the dense parent for llama.cpp (default: the base's packaged one)")
    p.add_argument("--floor-mb", type=int, default=d.floor_mb,
                   help=f"buffer of the bandwidth measurements in MB (default {d.floor_mb})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random prompts")
    p.add_argument("--no-dense", action="store_true", help="skip the dense parent in the engine")
    p.add_argument("--no-hf", action="store_true", help="skip HF generate")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even if it is installed")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-component breakdown")
    p.set_defaults(func=cmd_bench_step)

    s = SchedulerConfig()

    from pregate.server import GRACEFUL_S, ServerLimits

    from pregate.loadtest import ServerBenchConfig

    lt, s = ServerBenchConfig(), SchedulerConfig()
    p = _group(sub, "bench", "measure serving systems").add_parser(
        "server", help="bounded load and fault benchmark of the HTTP server on loopback (streams, disconnects, "
                       "bursts of long prompts, bad requests)")
    p.add_argument("model", help="a `pregate train` output directory (MoE + pre-gating router)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--clients", type=_positive_int, default=lt.clients, help=f"concurrent clients (default {lt.clients})")
    p.add_argument("--requests-per-client", type=_positive_int, default=lt.requests_per_client,
                   help=f"requests each client sends, one after another (default {lt.requests_per_client})")
    p.add_argument("--max-tokens", type=_positive_int, default=lt.max_tokens, help=f"new tokens per request (default {lt.max_tokens})")
    p.add_argument("--disconnect-share", type=float, default=lt.disconnect_share,
                   help=f"share of requests whose client leaves after the first chunk (default {lt.disconnect_share})")
    p.add_argument("--bad-share", type=float, default=lt.bad_share,
                   help=f"share of requests that are malformed and must get a 4xx (default {lt.bad_share})")
    p.add_argument("--bursts", type=int, default=lt.bursts, help=f"bursts of long prompts, each with a short request behind (default {lt.bursts})")
    p.add_argument("--long-prompts", type=int, default=lt.long_prompts, help=f"long prompts per burst (default {lt.long_prompts})")
    p.add_argument("--long-prompt-tokens", type=_positive_int, default=lt.long_prompt_tokens,
                   help=f"tokens per long prompt (default {lt.long_prompt_tokens})")
    p.add_argument("--timeout", type=float, default=lt.timeout_s, help=f"seconds before a request counts as lost (default {lt.timeout_s:.0f})")
    p.add_argument("--seed", type=int, default=lt.seed)
    p.add_argument("--policy", choices=SCHED_POLICIES, default=s.policy, help=f"batching policy (default {s.policy})")
    p.add_argument("--max-running", type=_positive_int, default=s.max_running, help=f"requests running at once (default {s.max_running})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.set_defaults(func=cmd_bench_server)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming) over a trained MoE")
    p.add_argument("model", help="a `pregate train` output directory (MoE + pre-gating router)")
    p.add_argument("--router", help="directory holding the router, if not the model's own")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", help="model name the API reports (default: the directory's name)")
    p.add_argument("--policy", choices=SCHED_POLICIES, default=s.policy, help=f"batching policy (default {s.policy})")
    p.add_argument("--token-budget", type=_positive_int, default=s.token_budget, help=f"tokens per step (default {s.token_budget})")
    p.add_argument("--max-running", type=_positive_int, default=s.max_running, help=f"requests running at once (default {s.max_running})")
    p.add_argument("--kv-capacity", type=_positive_int, default=s.kv_capacity_tokens,
                   help=f"KV-cache budget in tokens over running requests (default {s.kv_capacity_tokens})")
    _add_expert_aware_args(p, s.max_wait_steps, s.min_queue_tokens)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="weight dtype (default bfloat16; attention is float32 on CPU)")
    p.add_argument("--resident-experts", type=_positive_int,
                   help="keep only this many whole routed experts in memory (Belady eviction; the rest are read "
                        "from the checkpoint when a step needs them; docs/offloading.md)")
    p.add_argument("--prefetch", action="store_true", help="with --resident-experts: load the next layers' experts while a layer computes")
    lim = ServerLimits()
    p.add_argument("--max-body-bytes", type=_positive_int, default=lim.max_body_bytes,
                   help=f"larger request bodies get 413 before they are parsed (default {lim.max_body_bytes})")
    p.add_argument("--max-queued", type=int, default=lim.max_queued,
                   help=f"sequences that may wait beyond --max-running; more get 429 with Retry-After (default {lim.max_queued})")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route but /health (401 otherwise)")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="allow browser calls from this origin (repeatable; default: none)")
    p.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (off by default)")
    p.add_argument("--timeout-keep-alive", type=float, default=5,
                   help="seconds an idle keep-alive connection stays open (default 5)")
    p.add_argument("--timeout-graceful", type=float, default=GRACEFUL_S,
                   help=f"seconds open requests get to finish on SIGTERM/Ctrl-C (default {GRACEFUL_S})")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pregate",
        description="Refactor a dense LLM into a router-decoupled Mixture of Experts (Read-ME) and serve it with pre-gating.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="list the domain corpora, their sources and sizes, and which are stand-ins")
    _add_domains(p)
    p.add_argument("--json", help="also write the listing as JSON to this file")
    p.set_defaults(func=cmd_data)

    from pregate.refactor import REFACTOR_PRESETS

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
    _add_domains(p)
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
    p.add_argument("--variants", nargs="+", help="subset of: dense moe_domain moe_oracle moe_random control moe_router control_trained")
    p.add_argument("--seed", type=int, default=0, help="seed of the random routing")
    _add_domains(p)
    _add_cache(p)
    p.set_defaults(func=cmd_eval_ppl)

    from pregate.tasks import DEFAULT_LIMIT, DEFAULT_LIMITS, DEFAULT_TASKS

    p = ev.add_parser("tasks", help="downstream tasks (MMLU 5-shot, ARC, HellaSwag, WinoGrande, PIQA, "
                      "LAMBADA, CoQA) through lm-evaluation-harness on the packaged data")
    p.add_argument("model", help="a MoE checkpoint (`pregate refactor`/`train` output) or a base model "
                   "(dense only)")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS),
                   help=f"tasks (default: {' '.join(DEFAULT_TASKS)}); mmlu_<subject> for one MMLU subject")
    p.add_argument("--variants", nargs="+",
                   help="subset of: dense moe_router control_trained control moe_random "
                        "(default: those of dense moe_router control_trained the checkpoint has)")
    p.add_argument("--limit", type=int, help=f"first N documents of every task (MMLU: per subject); default "
                   f"{DEFAULT_LIMITS['mmlu']} per MMLU subject, {DEFAULT_LIMITS['coqa']} for coqa, "
                   f"{DEFAULT_LIMIT} otherwise (a 2-core CPU budget, docs/evaluation.md)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per forward (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random routing")
    p.add_argument("--check-hf", action="store_true",
                   help="instead: compare the dense variant with lm-eval's own `hf` backend on the parent "
                        "checkpoint (per-item log-likelihoods and accuracies; --limit default 20)")
    _add_cache(p)
    p.set_defaults(func=cmd_eval_tasks)

    from pregate.train import TRAIN_PRESETS

    p = sub.add_parser("train", help="train the router and experts (alternating rounds) and the same-size dense control")
    p.add_argument("model", help="a MoE checkpoint directory written by `pregate refactor`")
    p.add_argument("--out", required=True, help="output directory (checkpointed after every stage)")
    p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), help="starting values for the options below (default: cpu)")
    p.add_argument("--rounds", type=_positive_int, help="router+expert rounds")
    p.add_argument("--router-steps", type=_positive_int, help="router steps per round")
    p.add_argument("--expert-steps", type=_positive_int, help="expert steps per round")
    p.add_argument("--batch-size", type=_positive_int, help="global batch (rows of --seq-len tokens)")
    p.add_argument("--seq-len", type=_positive_int)
    p.add_argument("--router-lr", type=float, help="peak router lr of round 1 (default 5e-4)")
    p.add_argument("--expert-lr", type=float, help="peak backbone lr of round 1 (default 5e-5)")
    p.add_argument("--head", choices=["softmax", "dselect"], help="router head (dselect: DSelect-k, use with --top-k)")
    p.add_argument("--top-k", type=_positive_int, help="experts per token")
    p.add_argument("--loss", choices=["graded", "kl"], help="router distillation loss (default graded)")
    p.add_argument("--tokens-per-domain", type=_positive_int, help="train-split tokens per domain in the batch pool")
    p.add_argument("--seed", type=int)
    p.add_argument("--layerwise", action="store_true", help="train per-layer gates (baseline) instead of the pre-gating router")
    p.add_argument("--distill", action="store_true", help="expert stages also distil the dense parent's logits")
    p.add_argument("--no-control", action="store_true", help="do not train the same-size dense control")
    p.add_argument("--control-budget", choices=["tokens", "updates"],
                   help="tokens (default): the control trains on the router- and expert-stage batches; updates: on the "
                        "expert-stage batches only (as many backbone updates as the MoE)")
    p.add_argument("--resume", action="store_true", help="continue --out after its last completed stage")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    _add_cache(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a Hugging Face checkpoint (MoE + pre-gating router in forward) "
                       "that AutoModelForCausalLM loads with trust_remote_code=True")
    p.add_argument("model", help="a `pregate train` output directory (MoE + pre-gating router + tokenizer)")
    p.add_argument("--out", required=True,
                   help="output directory (refused if it exists and is not empty, unless --force)")
    p.add_argument("--router", help="directory holding the router, if not the model's own")
    p.add_argument("--force", action="store_true",
                   help="replace --out (only once the new export is complete)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("analyze", help="the paper's routing analyses: layer redundancy (transition matrices, "
                       "mutual information), temporal locality, reuse distance, domain x expert usage")
    p.add_argument("model", help="a `pregate train` output directory (MoE + pre-gating router)")
    p.add_argument("--out", required=True, help="directory for analysis.json and the PNG figures")
    p.add_argument("--layerwise", metavar="DIR",
                   help="a `pregate train --layerwise` output trained from the same refactored model "
                        "(without it the layer-wise gate analyses are skipped)")
    p.add_argument("--domains", nargs="+",
                   help="domains whose test split to route (default: the experts' domains)")
    p.add_argument("--tokens-per-domain", type=_positive_int, default=4096,
                   help="test-split tokens per domain (default 4096, the paper's sample size)")
    p.add_argument("--block-len", type=_positive_int, default=512, help="tokens per block (default 512)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="blocks per forward pass (default 4)")
    _add_domains(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="the main job end to end on the packaged SmolLM2-135M: refactor, train, evaluate, plot")
    p.add_argument("--out", default="runs/demo", help="where checkpoints, JSON and plots go (default runs/demo)")
    p.add_argument("--force", action="store_true", help="redo every stage even if its output exists")
    _add_cache(p)
    p.set_defaults(func=cmd_demo)
    _add_offload_commands(sub)
    _add_serve_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PregateError as err:
        print(f"pregate: error: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print("pregate: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
