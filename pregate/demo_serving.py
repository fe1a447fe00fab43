"""The serving half of `make demo`: what pre-gating buys at serving time, in about two minutes.

Three measurements on the demo's trained checkpoint, each a small run of a command a user can rerun
at full size (the footer of the table names them):
- decode under load (`pregate bench serve`): the MoE under expert-aware and decode-first batching, the
  dense parent in the same engine and HF `generate`, on one ShareGPT trace; medians of 3 interleaved
  repeats, with the slowest and fastest repeat;
- the decode step under that load: MoE against dense parent, from the engine's own step records
  (median over the decode-only steps of the median repeat);
- expert cache hit ratio (`pregate bench cache`): Belady against LRU with 1-3 of the experts resident,
  on the trace's routed expert references as the expert-aware scheduler orders them.

A script's library half: imports `pregate.bench`, `pregate.sim` and `pregate.cache_bench`; nothing in
the package imports it but `pregate.demo`.
"""

from __future__ import annotations

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


def _decode_step_ms(run) -> float:
    """Median decode-only step time of one engine run (ms)."""
    times = [s.end - s.start for s in run.steps if s.num_prefill_tokens == 0 and s.num_decode_tokens > 0]
    return 1e3 * statistics.median(times) if times else float("nan")


def serving_summary(train_dir: Path, progress=print, cfg: BenchConfig = SERVE) -> dict:
    """Run the three measurements; returns a JSON-able dict (what `format_serving` prints)."""
    from pregate import sim
    from pregate.cache_bench import route_sharegpt

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
    return {"load": load, "hit_ratio": hits, "routing": how, "workload": result["workload"], "config": config}


def format_serving(summary: dict) -> str:
    load = summary["load"]
    moe = load["expert-aware"]
    cfg = summary["config"]
    lines = [
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
    lines.append("full size: `pregate bench serve MODEL --json F`, `pregate bench cache MODEL --json F`")
    return "\n".join(lines)
