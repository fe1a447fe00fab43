"""The serving commands: `serve` and the benchmarks of the engine and server (`bench serve`,
`bench step`, `bench server`). Each `add_*` fills its parser; each `cmd_*` calls the library."""

from __future__ import annotations

from pregate.cli.options import (
    add_dtype,
    add_json,
    add_resident_experts,
    add_scheduler_options,
    add_workload_options,
    positive_int,
    scheduler_budgets,
    scheduler_config,
)

# ----------------------------------------------------------------------------------------- serve


def add_serve(p) -> None:
    from pregate.server import GRACEFUL_S, ServerLimits

    p.add_argument("model", help="a `pregate train` output directory (MoE + pre-gating router)")
    p.add_argument("--router", help="directory holding the router, if not the model's own")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", help="model name the API reports (default: the directory's name)")
    add_dtype(p, "bfloat16", "weight dtype; attention is float32 on CPU")
    add_resident_experts(
        p,
        help="keep only this many whole routed experts in memory (Belady eviction; the rest are read "
        "from the checkpoint when a step needs them; docs/offloading.md)",
    )
    p.add_argument(
        "--prefetch",
        action="store_true",
        help="with --resident-experts: load the next layers' experts while a layer computes",
    )
    add_scheduler_options(p)
    lim = ServerLimits()
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=lim.max_body_bytes,
        help=f"larger request bodies get 413 before they are parsed (default {lim.max_body_bytes})",
    )
    g.add_argument(
        "--max-queued",
        type=int,
        default=lim.max_queued,
        help=f"sequences that may wait beyond --max-running; more get 429 with Retry-After "
        f"(default {lim.max_queued})",
    )
    g.add_argument(
        "--api-key", help="require `Authorization: Bearer KEY` on every route but /health (401 otherwise)"
    )
    g.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="allow browser calls from this origin (repeatable; default: none)",
    )
    g.add_argument(
        "--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (off by default)"
    )
    g.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=5,
        help="seconds an idle keep-alive connection stays open (default 5)",
    )
    g.add_argument(
        "--timeout-graceful",
        type=float,
        default=GRACEFUL_S,
        help=f"seconds open requests get to finish on SIGTERM/Ctrl-C (default {GRACEFUL_S})",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    from pregate.server import ServerLimits, serve

    limits = ServerLimits(
        max_body_bytes=args.max_body_bytes,
        max_queued=args.max_queued,
        api_key=args.api_key,
        cors_origins=tuple(args.cors_origin),
        docs=args.docs,
    )
    serve(
        args.model,
        args.host,
        args.port,
        scheduler_config(args),
        args.router,
        args.dtype,
        args.name,
        args.resident_experts,
        args.prefetch,
        limits,
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful=args.timeout_graceful,
    )


# ----------------------------------------------------------------------------------------- bench serve


def add_bench_serve(p) -> None:
    from pregate.bench import BenchConfig
    from pregate.scheduler import SCHEDULING_POLICIES

    d = BenchConfig()
    p.add_argument(
        "model", help="a MoE checkpoint directory (its trained router is used; none: one is distilled)"
    )
    add_json(p)
    p.add_argument(
        "--policies",
        nargs="+",
        choices=SCHEDULING_POLICIES,
        default=list(d.policies),
        help=f"batching policies to compare (default: {' '.join(d.policies)})",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=d.rate,
        help=f"Poisson arrivals per second (default {d.rate}); 0 = all at t=0",
    )
    p.add_argument(
        "--trace", help="JSONL trace: replayed if it exists, else the generated trace is saved there"
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=d.repeats,
        help=f"interleaved repeats; medians are reported (default {d.repeats})",
    )
    add_dtype(p, d.dtype)
    p.add_argument("--no-dense", action="store_true", help="skip the dense parent in the engine")
    p.add_argument("--no-hf", action="store_true", help="skip HF generate with static batches")
    add_workload_options(p, d.requests, d.max_prompt_tokens, d.max_output_tokens, d.seed)
    add_scheduler_options(p, d.scheduler(d.policies[0]), policy=False)
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args) -> None:
    from pregate.bench import BenchConfig, bench_serve

    cfg = BenchConfig(
        policies=args.policies,
        requests=args.requests,
        rate=args.rate or None,
        seed=args.seed,
        repeats=args.repeats,
        max_prompt_tokens=args.max_prompt,
        max_output_tokens=args.max_output,
        dtype=args.dtype,
        dense=not args.no_dense,
        hf=not args.no_hf,
        **scheduler_budgets(args),
    )
    bench_serve(args.model, args.json, cfg, args.trace)


# ----------------------------------------------------------------------------------------- bench step


def add_bench_step(p) -> None:
    from pregate.bench_step import StepBenchConfig

    d = StepBenchConfig()
    p.add_argument("model", help="a MoE checkpoint directory (its dense parent is the baseline)")
    add_json(p)
    # plain int, not positive_int: StepBenchConfig says what is wrong with a bad value
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=d.batch_sizes,
        help=f"batch sizes of the batch sweep (default {' '.join(map(str, d.batch_sizes))})",
    )
    p.add_argument(
        "--expert-batch",
        type=int,
        default=d.expert_batch,
        help=f"batch of the distinct-experts sweep (default {d.expert_batch})",
    )
    p.add_argument("--experts", type=int, nargs="+", help="distinct experts of that sweep (default 1..E)")
    p.add_argument(
        "--batch-experts",
        type=int,
        default=d.batch_experts,
        help=f"distinct experts in the batch sweep (default {d.batch_experts})",
    )
    p.add_argument(
        "--prompt-len",
        type=int,
        default=d.prompt_len,
        help=f"prompt tokens per request (default {d.prompt_len})",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=d.warmup_steps,
        help=f"untimed decode steps per measurement (default {d.warmup_steps})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=d.decode_steps,
        help=f"timed decode steps per measurement (default {d.decode_steps})",
    )
    p.add_argument(
        "--repeats", type=int, default=d.repeats, help=f"interleaved repeats, odd, >= 3 (default {d.repeats})"
    )
    add_dtype(p, d.dtype)
    p.add_argument(
        "--layerwise",
        metavar="DIR",
        help="a `pregate train --layerwise` output: also break down a step with its gate",
    )
    p.add_argument("--gguf", help="GGUF of the dense parent for llama.cpp (default: the base's packaged one)")
    p.add_argument(
        "--floor-mb",
        type=int,
        default=d.floor_mb,
        help=f"buffer of the bandwidth measurements in MB (default {d.floor_mb})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random prompts")
    p.add_argument("--no-dense", action="store_true", help="skip the dense parent in the engine")
    p.add_argument("--no-hf", action="store_true", help="skip HF generate")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even if it is installed")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-component breakdown")
    p.set_defaults(func=cmd_bench_step)


def cmd_bench_step(args) -> None:
    from pregate.bench_step import StepBenchConfig, bench_step

    cfg = StepBenchConfig(
        batch_sizes=args.batch_sizes,
        expert_batch=args.expert_batch,
        experts=args.experts,
        batch_experts=args.batch_experts,
        prompt_len=args.prompt_len,
        warmup_steps=args.warmup,
        decode_steps=args.steps,
        repeats=args.repeats,
        dtype=args.dtype,
        dense=not args.no_dense,
        hf=not args.no_hf,
        llama_cpp=not args.no_llama_cpp,
        breakdown=not args.no_breakdown,
        layerwise=args.layerwise,
        gguf=args.gguf,
        floor_mb=args.floor_mb,
        seed=args.seed,
    )
    bench_step(args.model, args.json, cfg)


# ----------------------------------------------------------------------------------------- bench server


def add_bench_server(p) -> None:
    from pregate.loadtest import ServerBenchConfig

    lt = ServerBenchConfig()
    p.add_argument("model", help="a `pregate train` output directory (MoE + pre-gating router)")
    add_json(p)
    p.add_argument(
        "--clients", type=positive_int, default=lt.clients, help=f"concurrent clients (default {lt.clients})"
    )
    p.add_argument(
        "--requests-per-client",
        type=positive_int,
        default=lt.requests_per_client,
        help=f"requests each client sends, one after another (default {lt.requests_per_client})",
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=lt.max_tokens,
        help=f"new tokens per request (default {lt.max_tokens})",
    )
    p.add_argument(
        "--disconnect-share",
        type=float,
        default=lt.disconnect_share,
        help=f"share of requests whose client leaves after the first chunk (default {lt.disconnect_share})",
    )
    p.add_argument(
        "--bad-share",
        type=float,
        default=lt.bad_share,
        help=f"share of requests that are malformed and must get a 4xx (default {lt.bad_share})",
    )
    p.add_argument(
        "--bursts",
        type=int,
        default=lt.bursts,
        help=f"bursts of long prompts, each with a short request behind (default {lt.bursts})",
    )
    p.add_argument(
        "--long-prompts",
        type=int,
        default=lt.long_prompts,
        help=f"long prompts per burst (default {lt.long_prompts})",
    )
    p.add_argument(
        "--long-prompt-tokens",
        type=positive_int,
        default=lt.long_prompt_tokens,
        help=f"tokens per long prompt (default {lt.long_prompt_tokens})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=lt.timeout_s,
        help=f"seconds before a request counts as lost (default {lt.timeout_s:.0f})",
    )
    p.add_argument("--seed", type=int, default=lt.seed)
    add_dtype(p, "bfloat16")
    add_scheduler_options(p)
    p.set_defaults(func=cmd_bench_server)


def cmd_bench_server(args) -> None:
    from pregate.loadtest import ServerBenchConfig, bench_server, format_result
    from pregate.server import load_engine

    cfg = ServerBenchConfig(
        clients=args.clients,
        requests_per_client=args.requests_per_client,
        max_tokens=args.max_tokens,
        disconnect_share=args.disconnect_share,
        bad_share=args.bad_share,
        bursts=args.bursts,
        long_prompts=args.long_prompts,
        long_prompt_tokens=args.long_prompt_tokens,
        timeout_s=args.timeout,
        seed=args.seed,
    )
    engine = load_engine(args.model, scheduler_config(args), dtype=args.dtype)
    print(format_result(bench_server(engine, cfg, args.json, model_name="bench")))
