"""The serving half of `make demo`: what pre-gating buys at serving time, in about two minutes.

Four measurements on the demo's trained checkpoint, each a small run of a command a user can rerun
at full size (the footer of the table names them):
- the batch-1 decode step (`pregate bench step --quantize int8 --native`, run at batch 1 only): the MoE
  and the dense parent in the engine in bfloat16 (packed where the CPU can pack bfloat16, plain weights
  elsewhere, and with native decode layers where they can run) and with int8 weights, and HF
  `generate`; medians of 3 interleaved repeats;
- decode under load (`pregate bench serve`): the MoE under expert-aware and decode-first batching, the
  dense parent in the same engine and HF `generate`, on one ShareGPT trace; medians of 3 interleaved
  repeats, with the slowest and fastest repeat;
- the decode step under that load: MoE against dense parent, from the engine's own step records
  (median over the decode-only steps of the median repeat);
- expert cache hit ratio (`pregate bench cache`): Belady against LRU with 1-3 of the experts resident,
  on the trace's routed expert references as the expert-aware scheduler orders them.

A script's library half: imports `pregate.bench`, `pregate.bench_step`, `pregate.sim` and
`pregate.cache_bench`; nothing in the package imports it but `pregate.demo`.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from pregate.bench import DENSE, HF, BenchConfig, run_bench

SERVE = BenchConfig(
    policies=["expert-aware", "decode-first"],
    requests=12,
    rate=None,  # all at once: the load under which batching policies differ
    max_prompt_tokens=128,
    max_output_tokens=24,
    max_running=12,
    repeats=3,
)
CACHE_CAPACITIES = (1, 2, 3)
STEP_SYSTEMS = {  # bench step's systems at batch 1 -> the demo's labels
    "moe": "MoE bf16",
    "moe-int8": "MoE int8",
    "dense": "dense parent bf16",
    "dense-int8": "dense parent int8",
    "hf-generate": "HF generate bf16",
}
NATIVE_SYSTEMS = {  # with --native, where pregate.native can run
    "moe-native": "MoE bf16 native",
    "moe-int8-native": "MoE int8 native",
    "dense-native": "dense parent bf16 native",
    "dense-int8-native": "dense parent int8 native",
}


def batch1_decode(train_dir: Path, cfg: BenchConfig = SERVE) -> tuple[dict[str, dict], dict[str, dict]]:
    """The batch-1 decode step of every STEP_SYSTEMS entry, and of NATIVE_SYSTEMS where pregate.native can
    run (bfloat16, a C compiler, AVX2), by `pregate bench step` itself (one expert, int8 and native copies
    beside the float models, interleaved repeats): {label: median_ms, min_ms, max_ms}, and each MoE's
    step over its dense parent's in the same layout, paired within each repeat (`bench_step.moe_vs_dense`):
    {MoE label: median, min, max}."""
    from pregate.bench_step import StepBenchConfig, run_bench_step
    from pregate.native import unavailable_reason

    step = StepBenchConfig(
        batch_sizes=[1],
        expert_batch=1,
        experts=[1],
        repeats=cfg.repeats,
        dtype=cfg.dtype,
        quantize="int8",
        llama_cpp=False,
        breakdown=False,
        floor_mb=64,
        native=cfg.dtype == "bfloat16" and unavailable_reason() is None,
    )
    result = run_bench_step(train_dir, step, progress=lambda msg: None)
    labels = {**STEP_SYSTEMS, **NATIVE_SYSTEMS}
    times = {
        labels[r["system"]]: {
            k: r["decode_ms"][k.removesuffix("_ms")] for k in ("median_ms", "min_ms", "max_ms")
        }
        for r in result["batch_sizes"]
    }
    ratios = {
        labels[r["system"]]: {k: r["decode_ratio"][k] for k in ("median", "min", "max")}
        for r in result["moe_vs_dense"]
    }
    return times, ratios


def _decode_step_ms(run) -> float:
    """Median decode-only step time of one engine run (ms)."""
    times = [s.end - s.start for s in run.steps if s.num_prefill_tokens == 0 and s.num_decode_tokens > 0]
    return 1e3 * statistics.median(times) if times else float("nan")


def native_load(cfg: BenchConfig) -> BenchConfig:
    """The load run on the fastest layout this machine has: where pregate.native can run (bfloat16, a C
    compiler, AVX2), the engine's MoE and dense parent natively at a token budget of NATIVE_ROWS: every
    step is then one native call, the setting README's load table and docs/serving.md's *Measured on the
    native path* were measured in (any budget up to native.WHOLE_ROWS is native too, in more calls). It
    also keeps the policies apart: with the demo's 12 requests at once, a budget of 16 would fit every
    decode row in every step, and expert-aware batching would have nothing left to choose."""
    from pregate.native import NATIVE_ROWS, unavailable_reason

    if cfg.dtype != "bfloat16" or cfg.quantize or unavailable_reason() is not None:
        return cfg
    return dataclasses.replace(cfg, native=True, token_budget=min(cfg.token_budget, NATIVE_ROWS))


def serving_summary(train_dir: Path, progress=print, cfg: BenchConfig = SERVE) -> dict:
    """Run the three measurements; returns a JSON-able dict (what `format_serving` prints)."""
    from pregate import sim
    from pregate.cache_bench import route_sharegpt
    from pregate.packed import cpu_packs_bfloat16

    progress("  batch-1 decode step: MoE and dense parent in bf16 and int8 (default and native), HF generate")
    batch1, batch1_vs_dense = batch1_decode(train_dir, cfg)
    cfg = native_load(cfg)
    progress(f"  {cfg.repeats} interleaved repeats of {len(cfg.policies) + cfg.dense + cfg.hf} systems")
    result = run_bench(train_dir, cfg, progress=lambda msg: None)
    runs = result.pop("runs")
    load = {
        name: {
            "norm_mean_ms": 1e3 * m["norm_mean"],
            "norm_p95_ms": 1e3 * m["norm_p95"],
            "throughput": m["throughput"],
            "experts_per_step": m["experts_per_step"],
            "range_ms": [1e3 * v for v in m.get("norm_mean_spread", [m["norm_mean"]] * 2)],
            "decode_step_ms": _decode_step_ms(runs[name][len(runs[name]) // 2]) if name != HF else None,
        }
        for name, m in result["policies"].items()
    }
    progress("  routing the trace for the cache table")
    reqs, how = route_sharegpt(train_dir, cfg.requests * 2, cfg.max_prompt_tokens, cfg.max_output_tokens)
    traces = [r.trace for r in reqs]
    layers = result["workload"]["num_layers"]
    steps = sim.scheduled_steps(traces, cfg.scheduler("expert-aware"))
    hits = sim.hit_ratio_table(steps, layers, "expert", CACHE_CAPACITIES, ("belady", "lru"))
    config = {
        "requests": cfg.requests,
        "max_output_tokens": cfg.max_output_tokens,
        "repeats": cfg.repeats,
        "native": cfg.native,
        "token_budget": cfg.token_budget,
        "packed": cpu_packs_bfloat16(),  # the default bfloat16 layout here: packed, or plain weights
    }
    return {
        "batch1": batch1,
        "batch1_vs_dense": batch1_vs_dense,
        "load": load,
        "hit_ratio": hits,
        "routing": how,
        "workload": result["workload"],
        "config": config,
    }


def format_serving(summary: dict) -> str:
    load = summary["load"]
    moe = load["expert-aware"]
    cfg = summary["config"]
    b1 = summary["batch1"]
    lines = [f"batch-1 decode step (medians of {cfg['repeats']} interleaved repeats, with the range)"]
    for name, m in b1.items():
        lines.append(f"{name:26s}{m['median_ms']:8.1f} ms{m['min_ms']:10.1f} - {m['max_ms']:5.1f}")
    ms = {name: b1[label]["median_ms"] for name, label in STEP_SYSTEMS.items()}
    lines += [
        f"MoE int8: {ms['moe-int8'] / ms['dense']:.2f}x the dense parent's bf16 step, "
        f"{ms['moe-int8'] / ms['hf-generate']:.2f}x HF generate's",
    ]
    if all(label in b1 for label in NATIVE_SYSTEMS.values()):
        native = {name: b1[label]["median_ms"] for name, label in NATIVE_SYSTEMS.items()}
        layout = "packed" if cfg["packed"] else "plain"
        lines.append(
            f"native: MoE bf16 {native['moe-native'] / ms['moe']:.2f}x the MoE {layout}, "
            f"MoE int8 {native['moe-int8-native'] / ms['moe-int8']:.2f}x the MoE's torch int8 step"
        )
    lines.append("MoE / its dense parent in the same layout, paired within each repeat (median, min - max):")
    for name, q in summary["batch1_vs_dense"].items():
        lines.append(f"  {name:24s}{q['median']:6.2f}x {q['min']:9.2f} - {q['max']:4.2f}")
    lines += [
        "",
        f"serving: {cfg['requests']} ShareGPT requests at once, "
        f"<= {cfg['max_output_tokens']} new tokens each, {cfg['token_budget']} tokens a step"
        f"{', MoE and dense parent native' if cfg['native'] else ''} "
        f"({summary['workload']['threads']} threads; medians of {cfg['repeats']} interleaved repeats)",
        f"{'system':16s}{'norm. latency':>15s}{'p95':>9s}{'tok/s':>9s}"
        f"{'decode step':>13s}{'experts/step':>14s}{'repeats range':>18s}",
    ]
    for name, m in load.items():
        step = f"{m['decode_step_ms']:10.1f} ms" if m["decode_step_ms"] is not None else f"{'-':>13s}"
        experts = f"{m['experts_per_step']:14.2f}" if m["experts_per_step"] else f"{'-':>14s}"
        lo, hi = m["range_ms"]
        lines.append(
            f"{name:16s}{m['norm_mean_ms']:12.1f} ms{m['norm_p95_ms']:9.1f}{m['throughput']:9.1f}"
            f"{step}{experts}{lo:10.1f} - {hi:5.1f}"
        )
    if DENSE in load and HF in load:
        lines.append(
            f"MoE (expert-aware) throughput: {moe['throughput'] / load[DENSE]['throughput']:.2f}x the dense "
            f"parent in the same engine, {moe['throughput'] / load[HF]['throughput']:.2f}x HF generate"
        )
    lines.append("")
    ks = CACHE_CAPACITIES
    lines.append(
        f"expert cache hit ratio with k whole experts resident ({summary['routing'].split(' (')[0]})"
    )
    lines.append(f"{'policy':16s}" + "".join(f"{'k=' + str(k):>9s}" for k in ks))
    for policy, row in summary["hit_ratio"].items():
        lines.append(f"{policy:16s}" + "".join(f"{row[k]:9.2f}" for k in ks))
    serve = f" --native --token-budget {cfg['token_budget']}" if cfg["native"] else ""
    lines.append(
        "full size: `pregate bench step MODEL --quantize int8 --native --json F`, "
        f"`pregate bench serve MODEL{serve} --json F`, `pregate bench cache MODEL --json F`"
    )
    return "\n".join(lines)
