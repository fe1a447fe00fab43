"""The serving half of `make demo`: what pre-gating buys at serving time, in about two minutes.

Four measurements on the demo's trained checkpoint, each a small run of a command a user can rerun
at full size (the footer of the table names them):
- the batch-1 decode step (`pregate bench step --quantize int8`): the MoE in bfloat16 and with int8
  weights, the dense parent in the same engine and HF `generate`; medians of 3 interleaved repeats;
- decode under load (`pregate bench serve`): the MoE under expert-aware and decode-first batching, the
  dense parent in the same engine and HF `generate`, on one ShareGPT trace; medians of 3 interleaved
  repeats, with the slowest and fastest repeat;
- the decode step under that load: MoE against dense parent, from the engine's own step records
  (median over the decode-only steps of the median repeat);
- expert cache hit ratio (`pregate bench cache`): Belady against LRU with 1-3 of the experts resident,
  on the trace's routed expert references as the expert-aware scheduler orders them.

A script's library half: imports `pregate.bench`, `pregate.bench_step`, `pregate.quantize`, `pregate.sim`
and `pregate.cache_bench`; nothing in the package imports it but `pregate.demo`.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

from pregate.bench import DENSE, HF, BenchConfig, load_dense_parent, load_parts, run_bench

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
STEP_SYSTEMS = ("MoE bf16", "MoE int8", "dense parent bf16", "HF generate bf16")


def batch1_decode(train_dir: Path, cfg: BenchConfig = SERVE, repeats: int = 3) -> dict[str, dict]:
    """Median batch-1 decode step (ms, with min and max over interleaved repeats) of each STEP_SYSTEMS
    entry, measured as `pregate bench step` does (fresh engine, one expert, median of the timed steps)."""
    from pregate.bench_step import StepBenchConfig, time_engine, time_hf
    from pregate.quantize import quantize_model

    moe, tokenizer, router, _ = load_parts(train_dir, cfg, progress=lambda msg: None)
    hf, dense = load_dense_parent(moe)
    step = StepBenchConfig(batch_sizes=[1], warmup_steps=4, decode_steps=16, repeats=repeats)
    int8 = quantize_model(copy.deepcopy(moe))
    runs = {
        STEP_SYSTEMS[0]: lambda: time_engine(moe, tokenizer, router, 1, 1, step)["decode"],
        STEP_SYSTEMS[1]: lambda: time_engine(int8, tokenizer, router, 1, 1, step)["decode"],
        STEP_SYSTEMS[2]: lambda: time_engine(dense, tokenizer, None, 1, 0, step)["decode"],
        STEP_SYSTEMS[3]: lambda: time_hf(hf, 1, step)["decode"],
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up, unrecorded
    for rep in range(repeats):
        order = list(runs)[rep:] + list(runs)[:rep]  # rotate: no system is always first
        for name in order:
            times[name].append(1e3 * runs[name]())
    return {
        n: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t)} for n, t in times.items()
    }


def _decode_step_ms(run) -> float:
    """Median decode-only step time of one engine run (ms)."""
    times = [s.end - s.start for s in run.steps if s.num_prefill_tokens == 0 and s.num_decode_tokens > 0]
    return 1e3 * statistics.median(times) if times else float("nan")


def serving_summary(train_dir: Path, progress=print, cfg: BenchConfig = SERVE) -> dict:
    """Run the three measurements; returns a JSON-able dict (what `format_serving` prints)."""
    from pregate import sim
    from pregate.cache_bench import route_sharegpt

    progress("  batch-1 decode step: MoE bf16 and int8, dense parent, HF generate")
    batch1 = batch1_decode(train_dir, cfg)
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
    config = {"requests": cfg.requests, "max_output_tokens": cfg.max_output_tokens, "repeats": cfg.repeats}
    return {
        "batch1": batch1,
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
        lines.append(f"{name:20s}{m['median_ms']:8.1f} ms{m['min_ms']:10.1f} - {m['max_ms']:5.1f}")
    moe_int8, parent = b1[STEP_SYSTEMS[1]]["median_ms"], b1[STEP_SYSTEMS[2]]["median_ms"]
    lines += [
        f"MoE int8: {moe_int8 / parent:.2f}x the dense parent's step, "
        f"{moe_int8 / b1[STEP_SYSTEMS[3]]['median_ms']:.2f}x HF generate's; "
        f"MoE bf16: {b1[STEP_SYSTEMS[0]]['median_ms'] / parent:.2f}x the parent's",
        "",
    ]
    lines += [
        f"serving: {cfg['requests']} ShareGPT requests at once, "
        f"<= {cfg['max_output_tokens']} new tokens each "
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
    lines.append(
        "full size: `pregate bench step MODEL --quantize int8 --json F`, "
        "`pregate bench serve MODEL --json F`, `pregate bench cache MODEL --json F`"
    )
    return "\n".join(lines)
