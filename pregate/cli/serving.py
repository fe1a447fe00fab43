"""The serving commands: `serve` and the benchmarks of the engine and server (`bench serve`,
`bench step`, `bench server`). Each `add_*` fills its parser; each `cmd_*` calls the library."""

from __future__ import annotations

import argparse

from pregate.cli.options import (
    add_dtype,
    add_json,
    add_native,
    add_option,
    add_quantize,
    add_resident_experts,
    add_scheduler_options,
    add_workload_options,
    config_from_args,
    positive_float,
    positive_int,
    scheduler_budgets,
    scheduler_config,
)

# ----------------------------------------------------------------------------------------- serve


def add_serve(p) -> None:
    from pregate.http_timeouts import READ_TIMEOUT_S
    from pregate.launch import GRACEFUL_S, KEEP_ALIVE_S
    from pregate.server import ServerLimits

    p.add_argument("model", help="a `pregate train` output directory (MoE + pre-gating router)")
    p.add_argument("--router", help="directory holding the router, if not the model's own")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", help="model name the API reports (default: the directory's name)")
    add_dtype(p, "bfloat16", "weight dtype; attention is float32 on CPU")
    add_quantize(p)
    add_native(p)
    p.add_argument(
        "--native-tiles",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --native, bfloat16: the weights tiled in place, so each native call streams one run "
        "of memory (pregate.native_layout): faster steps of one to four tokens, even ones of more "
        "(docs/serving.md; default: on where oneDNN cannot pack bfloat16, so every step runs "
        "natively, off elsewhere)",
    )
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
    add_option(
        g,
        "--max-body-bytes",
        lim.max_body_bytes,
        "larger request bodies get 413 before they are parsed",
        type=positive_int,
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
    add_option(
        g,
        "--timeout-keep-alive",
        KEEP_ALIVE_S,
        "seconds an idle keep-alive connection stays open",
        type=positive_float,
    )
    add_option(
        g,
        "--timeout-read",
        READ_TIMEOUT_S,
        "seconds a client gets to send a whole request, headers and body (then the connection closes)",
        type=positive_float,
    )
    add_option(
        g,
        "--timeout-graceful",
        GRACEFUL_S,
        "seconds open requests get to finish on SIGTERM/Ctrl-C",
        type=positive_float,
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    from pregate.launch import serve
    from pregate.server import ServerLimits

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
        quantize=args.quantize,
        native=args.native,
        tiles=args.native_tiles,
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful=args.timeout_graceful,
        timeout_read=args.timeout_read,
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
        "--trace",
        help="JSONL trace: replayed as it is if it exists (its own requests and arrival times, so the "
        "workload options are refused with it), else the generated trace is saved there",
    )
    add_option(p, "--repeats", d.repeats, "interleaved repeats; medians are reported", type=positive_int)
    add_dtype(p, d.dtype)
    add_quantize(p, "the MoE and the dense parent in the engine (HF generate keeps --dtype)")
    add_native(p, "the MoE and the dense parent in the engine")
    p.add_argument("--no-dense", action="store_true", help="skip the dense parent in the engine")
    p.add_argument("--no-hf", action="store_true", help="skip HF generate with static batches")
    add_workload_options(p, d.requests, d.max_prompt_tokens, d.max_output_tokens, d.seed)
    add_scheduler_options(p, d.scheduler(d.policies[0]), policy=False)
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args) -> None:
    from pregate.bench import BenchConfig, bench_serve

    cfg = config_from_args(
        BenchConfig,
        args,
        rate=args.rate or None,
        max_prompt_tokens=args.max_prompt,
        max_output_tokens=args.max_output,
        dense=not args.no_dense,
        hf=not args.no_hf,
        **scheduler_budgets(args),
    )
    bench_serve(args.model, args.json, cfg, args.trace)  # a replayed trace refuses workload flags there


# ----------------------------------------------------------------------------------------- bench step


def add_bench_step(p) -> None:
    from pregate.bench_step import StepBenchConfig
    from pregate.llama_reference import GGUF_TYPES

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
    add_option(p, "--expert-batch", d.expert_batch, "batch of the distinct-experts sweep", type=int)
    p.add_argument("--experts", type=int, nargs="+", help="distinct experts of that sweep (default 1..E)")
    add_option(p, "--batch-experts", d.batch_experts, "distinct experts in the batch sweep", type=int)
    add_option(p, "--prompt-len", d.prompt_len, "prompt tokens per request", type=int)
    add_option(p, "--warmup", d.warmup_steps, "untimed decode steps per measurement", type=int)
    add_option(p, "--steps", d.decode_steps, "timed decode steps per measurement", type=int)
    add_option(p, "--repeats", d.repeats, "interleaved repeats, odd, >= 3", type=int)
    add_dtype(p, d.dtype)
    add_quantize(
        p, "copies of the MoE and the dense parent, measured beside the float ones (moe-int8, dense-int8)"
    )
    p.add_argument(
        "--unpacked",
        action="store_true",
        help="also the bfloat16 MoE and dense parent with plain weights (moe-unpacked, dense-unpacked), "
        "beside the prepacked ones the engine serves (pregate.packed)",
    )
    p.add_argument(
        "--native",
        action="store_true",
        help="also the MoE and dense parent through the native decode layers (moe-native, dense-native; "
        "with --quantize also moe-int8-native, dense-int8-native; pregate.native, built on first use "
        "with the C compiler)",
    )
    p.add_argument(
        "--avx2-products",
        action="store_true",
        help="with --native on a CPU with AVX512-BF16: also the native MoE and dense parent on AVX2's "
        "products (moe-native-avx2, dense-native-avx2; with --quantize also moe-int8-native-avx2, "
        "dense-int8-native-avx2), beside the pair dot products they run by default",
    )
    p.add_argument(
        "--native-layouts",
        action="store_true",
        help="with --native: also the bfloat16 native MoE and dense parent in the weight layout the "
        "native path does not pick here: rows where it tiles them (moe-native-rows, dense-native-rows), "
        "tiles where it keeps rows (moe-native-tiles, dense-native-tiles; "
        "pregate.native_layout)",
    )
    p.add_argument(
        "--layerwise",
        metavar="DIR",
        help="a `pregate train --layerwise` output: also break down a step with its gate",
    )
    p.add_argument("--gguf", help="GGUF of the dense parent for llama.cpp (default: the base's packaged one)")
    p.add_argument(
        "--gguf-types",
        nargs="*",
        default=list(d.gguf_types),
        metavar="TYPE",
        help="llama.cpp also runs copies of that GGUF requantized to these weight types, made once in the "
        f"cache ({' '.join(GGUF_TYPES)}; default: {' '.join(d.gguf_types)}; none: the GGUF alone)",
    )
    add_option(p, "--floor-mb", d.floor_mb, "buffer of the bandwidth measurements in MB", type=int)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random prompts")
    p.add_argument("--no-dense", action="store_true", help="skip the dense parent in the engine")
    p.add_argument("--no-hf", action="store_true", help="skip HF generate")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even if it is installed")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-component breakdown")
    p.set_defaults(func=cmd_bench_step)


def cmd_bench_step(args) -> None:
    from pregate.bench_step import StepBenchConfig, bench_step

    cfg = config_from_args(
        StepBenchConfig,
        args,
        warmup_steps=args.warmup,
        decode_steps=args.steps,
        dense=not args.no_dense,
        hf=not args.no_hf,
        llama_cpp=not args.no_llama_cpp,
        gguf_types=tuple(args.gguf_types),
        breakdown=not args.no_breakdown,
    )
    bench_step(args.model, args.json, cfg)


# ----------------------------------------------------------------------------------------- bench server


def add_bench_server(p) -> None:
    from pregate.loadtest import ServerBenchConfig

    lt = ServerBenchConfig()
    p.add_argument("model", help="a `pregate train` output directory (MoE + pre-gating router)")
    add_json(p)
    add_option(p, "--clients", lt.clients, "concurrent clients", type=positive_int)
    add_option(
        p,
        "--requests-per-client",
        lt.requests_per_client,
        "requests each client sends, one after another",
        type=positive_int,
    )
    add_option(p, "--max-tokens", lt.max_tokens, "new tokens per request", type=positive_int)
    add_option(
        p,
        "--disconnect-share",
        lt.disconnect_share,
        "share of requests whose client leaves after the first chunk",
        type=float,
    )
    add_option(
        p, "--bad-share", lt.bad_share, "share of requests that are malformed and must get a 4xx", type=float
    )
    add_option(p, "--bursts", lt.bursts, "bursts of long prompts, each with a short request behind", type=int)
    add_option(p, "--long-prompts", lt.long_prompts, "long prompts per burst", type=int)
    add_option(p, "--long-prompt-tokens", lt.long_prompt_tokens, "tokens per long prompt", type=positive_int)
    p.add_argument(
        "--timeout",
        type=float,
        default=lt.timeout_s,
        help=f"seconds before a request counts as lost (default {lt.timeout_s:.0f})",
    )
    p.add_argument("--seed", type=int, default=lt.seed)
    add_dtype(p, "bfloat16")
    add_quantize(p)
    add_native(p)
    add_scheduler_options(p)
    p.set_defaults(func=cmd_bench_server)


def cmd_bench_server(args) -> None:
    from pregate.launch import load_engine
    from pregate.loadtest import ServerBenchConfig, bench_server, format_result

    cfg = config_from_args(ServerBenchConfig, args, timeout_s=args.timeout)
    engine = load_engine(
        args.model, scheduler_config(args), dtype=args.dtype, quantize=args.quantize, native=args.native
    )
    print(format_result(bench_server(engine, cfg, args.json, model_name="bench")))
