"""`pregate bench cache`: expert-cache hit ratios and offloaded latency on a routed ShareGPT trace.

Owns the measured, teacher-forced replay of routed requests through the real Scheduler and the MoE
(`ReplayRequest`, `replay_teacher_forced`), ShareGPT routing (`route_sharegpt`), the benchmark itself
(`CacheBenchConfig`, `bench_cache`: hit ratios of every eviction policy, measured latency with the
tiered store, the simulator calibrated on it, the Llama-2-7B / A100 projection) and its reports
(`format_cache_table`, `plot_cache_bench`). A benchmark, not runtime: it may import the serving core
(`scheduler`, `metrics`, `workload`, `eviction`), the store, the simulator, the reference files, the
model and the router's loader; no runtime module imports it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pregate import sim
from pregate.checkpoint import ROUTER_WEIGHTS
from pregate.errors import PregateError, check_int
from pregate.eviction import unit_references
from pregate.metrics import MetricsRecorder, repeat_spread
from pregate.references import write_references
from pregate.scheduler import Request, Scheduler, SchedulerConfig, SchedulerOutput, StepResult, run_steps
from pregate.store import ExpertStore, StoreConfig
from pregate.workload import WorkloadRequest

PAPER_TABLE4 = {
    "random": {2: 0.34, 3: 0.50, 4: 0.68, 5: 0.83},
    "lru": {2: 0.34, 3: 0.52, 4: 0.67, 5: 0.83},
    "belady": {2: 0.44, 3: 0.62, 4: 0.77, 5: 0.88},
}


class CacheBenchError(PregateError):
    """Bad cache-benchmark settings, or a model / router / data set the benchmark cannot use."""


# ----------------------------------------------------------------------------------------- measured replay


@dataclass
class ReplayRequest:
    """A routed request with its token ids: the prompt and the reference response (teacher forcing)."""

    trace: WorkloadRequest
    prompt_ids: list[int]
    output_ids: list[int]


def replay_teacher_forced(
    model, requests: list[ReplayRequest], scheduler: SchedulerConfig, store: ExpertStore | None = None
) -> dict:
    """Serve `requests` (all queued at t=0) with the real Scheduler and the MoE on this machine.

    Each step runs `forward_packed` on its items (prefill chunks and decode tokens, each request with its
    own KV cache); the token fed after a prefill is the reference response (teacher forcing), so the
    step sequence is the one `pregate.sim.scheduled_steps` predicts. Returns the metrics summary, one
    record per step (duration, tokens, distinct experts, LM-head rows, stall) and `tokens`: the
    argmax token at every item's last position (what greedy decoding would emit).
    """
    from pregate.moe import Routing, Segment

    by_id = {r.trace.request_id: r for r in requests}
    traces = {rid: r.trace for rid, r in by_id.items()}
    sched = Scheduler(scheduler)
    rec = MetricsRecorder()
    start = time.perf_counter()
    caches: dict = {}
    steps = []
    tokens = []
    step_end = start

    def run(out: SchedulerOutput) -> StepResult:
        nonlocal step_end
        ids, experts, segs, rows = [], [], [], []
        for it in out.items:
            r = by_id[it.request_id]
            if it.request_id not in caches:
                caches[it.request_id] = model.new_cache(len(r.prompt_ids) + len(r.output_ids))
            if it.kind == "prefill":
                ids += r.prompt_ids[it.start : it.start + it.num_tokens]
            else:
                ids.append(r.output_ids[it.start - len(r.prompt_ids)])
            experts += it.experts
            segs.append(Segment(it.num_tokens, caches[it.request_id]))
            if it.produces_token:  # the LM head's rows, as the engine computes them
                rows.append(len(ids) - 1)
        stall0 = store.stats.stall_s if store is not None else 0.0
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model.forward_packed(
                torch.tensor(ids),
                segs,
                Routing.top1(torch.tensor(experts)),
                logits_at=torch.tensor(rows, dtype=torch.long),
                expert_source=store,
            )
        step_end = time.perf_counter()
        tokens.append(logits.argmax(-1).tolist())
        stall = (store.stats.stall_s if store is not None else 0.0) - stall0
        steps.append(
            {
                "duration": step_end - t0,
                "tokens": out.num_tokens,
                "experts": out.unique_experts,
                "rows": out.num_token_rows,
                "stall": stall,
            }
        )
        return sim.step_result(out, sched, traces)

    arrivals = []
    for r in requests:
        arrivals.append((0.0, Request(r.trace.request_id, list(r.trace.prompt_experts), r.trace.output_len)))
        rec.on_arrival(r.trace.request_id, at=start)
    for out, finished in run_steps(sched, run, arrivals=arrivals):
        for it in out.items:
            if it.produces_token:
                rec.on_token(it.request_id, at=step_end)
        for r in finished:
            rec.on_finish(r.request_id, at=step_end)
            caches.pop(r.request_id, None)
    return {"summary": rec.summary(), "steps": steps, "tokens": tokens}


def route_sharegpt(
    model_dir: str | Path,
    n: int,
    max_prompt: int,
    max_output: int,
    seed: int = 0,
    router_dir: str | Path | None = None,
    model=None,
) -> tuple[list[ReplayRequest], str]:
    """n ShareGPT first turns (prompt + reference response), routed token by token.

    Routing: the trained pre-gating router of `router_dir` (or of `model_dir` when it holds one) via
    `pregate.router.load_router`; otherwise the oracle routing the router is trained to imitate (each
    token to the expert whose channels carry most of its activation mass, summed over layers; causal
    like the router). Returns the requests and a sentence saying which routing was used.
    """
    import random

    from transformers import AutoTokenizer

    from pregate.distill import distill_targets
    from pregate.moe import load_moe
    from pregate.router import oracle_experts
    from pregate.workload import sharegpt_conversations

    model_dir = Path(model_dir)
    model = model if model is not None else load_moe(model_dir)  # first: it refuses a wrong directory clearly
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    router = None
    how = (
        "oracle routing (no trained router found: the expert the router is trained to imitate, "
        "pregate.router.oracle_experts)"
    )
    for cand in [router_dir, model_dir] if router_dir else [model_dir]:
        if cand is not None and (Path(cand) / ROUTER_WEIGHTS).is_file():
            from pregate.router import load_router

            router, how = load_router(cand), f"trained router from {cand}"
            break
    pairs = sharegpt_conversations(20 * n)
    order = list(range(len(pairs)))
    random.Random(f"sharegpt-{seed}").shuffle(order)
    out: list[ReplayRequest] = []
    for i in order:
        prompt, reference = pairs[i]
        p_ids = tok(prompt)["input_ids"]
        o_ids = tok(reference)["input_ids"][:max_output]
        if not 1 <= len(p_ids) <= max_prompt or not o_ids:
            continue
        ids = torch.tensor([p_ids + o_ids])
        with torch.no_grad():
            if router is not None:
                from pregate.router import routing_for

                routing, _ = routing_for(router, ids)
                if routing is None:
                    raise CacheBenchError(
                        "a layer-wise router has no pre-gated experts; use a pre-gating router"
                    )
                experts = routing.expert_ids[:, 0].tolist()
            else:
                experts = oracle_experts(distill_targets(model, ids)).tolist()
        rid = f"sharegpt-{len(out)}"
        p = len(p_ids)
        trace = WorkloadRequest(rid, prompt, len(o_ids), 0.0, p, experts[:p], experts[p:])
        out.append(ReplayRequest(trace, p_ids, o_ids))
        if len(out) == n:
            return out, how
    raise CacheBenchError(
        f"only {len(out)} ShareGPT prompts have <= {max_prompt} tokens; lower n or raise max_prompt"
    )


# ----------------------------------------------------------------------------------------- bench cache


@dataclass
class CacheBenchConfig:
    """`pregate bench cache`: the routed ShareGPT trace, the scheduler, the store's link and capacities."""

    requests: int = 24
    max_prompt: int = 128
    max_output: int = 64
    seed: int = 0
    capacities: tuple[int, ...] = (2, 3, 4, 5)
    bandwidth: float = 1e9  # bytes/s cap of the emulated slow tier
    depth: int = 1
    # a smaller step than serve's default: the trace is short, and k experts must matter within a step
    scheduler: SchedulerConfig = field(
        default_factory=lambda: SchedulerConfig(token_budget=64, max_running=16)
    )
    router: str | None = None
    measure: bool = True  # run the model (otherwise only the cache simulation)
    repeats: int = 3  # measured runs of every setting, interleaved; odd, so the median is one of them

    def __post_init__(self) -> None:
        for name in ("requests", "max_prompt", "max_output", "depth"):
            v = getattr(self, name)
            check_int(f"CacheBenchConfig.{name}", v, error=CacheBenchError)
        if not isinstance(self.repeats, int) or self.repeats < 1 or self.repeats % 2 == 0:
            raise CacheBenchError(
                f"repeats={self.repeats!r} must be an odd integer >= 1 (the median is then one of them)"
            )
        if not self.capacities or any(not isinstance(k, int) or k < 1 for k in self.capacities):
            raise CacheBenchError(f"CacheBenchConfig.capacities={self.capacities!r} must be ints >= 1")
        if not self.bandwidth > 0:
            raise CacheBenchError(f"CacheBenchConfig.bandwidth={self.bandwidth!r} must be > 0 bytes/s")


FLAG = 0.2  # a repeat further than this share from its setting's median is flagged


def _measure_once(model, model_dir, reqs, steps, scfg, cfg, k: int, prefetch: bool, base: dict) -> dict:
    store_cfg = StoreConfig(
        capacity=k, policy="belady", prefetch=prefetch, depth=cfg.depth, bandwidth=cfg.bandwidth
    )
    with ExpertStore(model_dir, store_cfg) as store:
        store.plan(steps)
        got = replay_teacher_forced(model, reqs, scfg, store)
        st = store.stats
    nl = got["summary"]["normalized_latency"]
    return {
        "normalized_latency": nl["mean"],
        "makespan_s": got["summary"]["makespan"],
        "normalized_latency_p95": nl["p95"],
        "stall_s": st.stall_s,
        "bytes_loaded": st.bytes_loaded,
        "hit_ratio": st.hit_ratio,
        "load_s": st.load_s,
        "copy_s": st.copy_s,
        "tokens_identical": got["tokens"] == base["tokens"],
        "steps": got["steps"],
    }


def perfect_overlap(compute: float, load: float) -> float:
    """Loads perfectly overlapped with compute: the best any prefetcher could do is the longer of the two
    (issue 8's yardstick for prefetching; on demand a run is the two one after the other)."""
    return max(compute, load)


def overlap_share(on_demand: float, prefetch: float, perfect: float) -> float | None:
    """How much of the gain perfect overlap allows prefetching reached (1 = all of it); None where
    loading cost nothing to hide."""
    room = on_demand - perfect
    return (on_demand - prefetch) / room if room > 0 else None


def _measure(model, model_dir, reqs, traces, steps, scfg, cfg, slice_bytes) -> dict:
    """Measured normalized latency with the store (Belady), prefetching off and on at every k, and the
    simulator's prediction of each setting.

    Every setting runs `cfg.repeats` times, interleaved, the order rotating each repeat (so drift and
    noise spread over all of them); a setting reports the run with its median latency, the min and max,
    and the runs more than FLAG from the median; `change` is the median over repeats of prefetch / on
    demand - 1 within a repeat. Calibration: the first on-demand run (compute terms by least squares on
    its steps with their stall removed; link speed = bytes / transfer time; a load's cost to the
    compute = its own copy time, the link's cap left out); every other run is a prediction."""
    E = model.num_experts
    base = replay_teacher_forced(model, reqs, scfg)
    settings = [(k, prefetch) for k in cfg.capacities for prefetch in (False, True)]
    got: dict[tuple[int, bool], list[dict]] = {s: [] for s in settings}
    for rep in range(cfg.repeats):
        shift = rep % len(settings)
        for k, prefetch in settings[shift:] + settings[:shift]:
            got[(k, prefetch)].append(
                _measure_once(model, model_dir, reqs, steps, scfg, cfg, k, prefetch, base)
            )
    first = got[settings[0]][0]
    link = first["bytes_loaded"] / first["load_s"] if first["load_s"] > 0 else None
    copy = first["copy_s"] / first["bytes_loaded"] * slice_bytes if first["bytes_loaded"] else 0.0
    cost = sim.calibrate(
        first["steps"] if link else base["steps"],
        model.config.num_layers,
        slice_bytes,
        link or cfg.bandwidth,
        copy,
    )
    resident = sim.simulate(traces, cost, sim.SimConfig(capacity=E, scheduler=scfg))
    resident_nl = base["summary"]["normalized_latency"]["mean"]
    resident_s = base["summary"]["makespan"]
    runs = []
    for k, prefetch in settings:
        reps = got[(k, prefetch)]
        values = [r["normalized_latency"] for r in reps]
        sp = repeat_spread(values, FLAG)
        med = sp["median"]
        row = {
            key: v
            for key, v in next(r for r in reps if r["normalized_latency"] == med).items()
            if key != "steps"
        }
        row.update(
            k=k,
            prefetch=prefetch,
            normalized_latency_min=sp["min"],
            normalized_latency_max=sp["max"],
            repeats=values,
            flagged=sp["flagged"],
            tokens_identical=all(r["tokens_identical"] for r in reps),
        )
        if prefetch:
            changes = [
                on / off - 1 for on, off in zip(values, (r["normalized_latency"] for r in got[(k, False)]))
            ]
            row.update(change=statistics.median(changes), change_min=min(changes), change_max=max(changes))
            off = next(r for r in runs if r["k"] == k and not r["prefetch"])
            # On the run's whole time the load is the link's time, measured: the on-demand run's stall.
            # (Its time minus the all-resident run's would also count as load the compute that the loads'
            # copies slow down, and a prefetching run then came out ahead of "perfect".) Normalized latency,
            # a mean over requests of each one's time per token, has no such split: there the load is the
            # on-demand latency minus the all-resident one, and perfect is that formula on the means, not a
            # bound (one request's loads may hide behind another's compute).
            nl, s_off, s_on = off["normalized_latency"], off["makespan_s"], row["makespan_s"]
            perfect_nl = perfect_overlap(resident_nl, nl - resident_nl)
            perfect_s = perfect_overlap(resident_s, off["stall_s"])
            row.update(
                perfect_overlap=perfect_nl,
                overlap_share=overlap_share(nl, med, perfect_nl),
                perfect_makespan_s=perfect_s,
                makespan_share=overlap_share(s_off, s_on, perfect_s),
            )
        sim_cfg = sim.SimConfig(capacity=k, prefetch=prefetch, depth=cfg.depth, scheduler=scfg)
        pred = sim.simulate(traces, cost, sim_cfg)
        pnl = pred.summary["normalized_latency"]["mean"]
        row.update(sim_normalized_latency=pnl, sim_error=(pnl - med) / med, sim_stall_s=pred.stall_s)
        runs.append(row)
    return {
        "all_resident_normalized_latency": resident_nl,
        "all_resident_makespan_s": resident_s,
        "sim_all_resident": resident.summary["normalized_latency"]["mean"],
        "cost_model": cost.to_dict(),
        "repeats": cfg.repeats,
        "runs": runs,
        "calibration": "first on-demand run: compute terms by least squares on its steps "
        "(stall removed), bandwidth = bytes / transfer time; other runs are predictions",
    }


def bench_cache(model_dir: str | Path, cfg: CacheBenchConfig, out_dir: str | Path | None = None) -> dict:
    """Hit ratios of every policy at each k (whole experts) on one routed ShareGPT trace, then measured
    normalized latency with the store (Belady) with prefetching off and on (tokens checked against an
    all-resident run), the simulator calibrated on the first on-demand run and its error on the others,
    and the Llama-2-7B / A100 projection. Writes the routed trace,
    the reference string and PNG plots into out_dir, if given; returns the JSON-able result."""
    from pregate.moe import load_moe
    from pregate.workload import save_trace

    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    model = load_moe(model_dir)
    L = model.config.num_layers
    E = model.num_experts
    if max(cfg.capacities) > E:
        raise CacheBenchError(f"capacities {cfg.capacities} exceed the model's {E} experts")
    reqs, how = route_sharegpt(
        model_dir, cfg.requests, cfg.max_prompt, cfg.max_output, cfg.seed, cfg.router, model
    )
    traces = [r.trace for r in reqs]
    scfg = cfg.scheduler
    steps = sim.scheduled_steps(traces, scfg)
    if out_dir is not None:
        save_trace(out_dir / "routed_trace.jsonl", traces)
        write_references(out_dir / "references.txt", steps, L, E, "expert")
    ks = list(cfg.capacities)
    table = sim.hit_ratio_table(steps, L, "expert", ks)
    refs_per_step = sum(len(s) for s in steps) / len(steps)
    window = max(1, round(refs_per_step))
    table[f"belady-w{window}"] = sim.hit_ratio_table(steps, L, "expert", ks, ("belady",), window)["belady"]
    with ExpertStore(model_dir, StoreConfig(capacity=1)) as probe:
        slice_bytes = probe.slice_bytes
    num_refs = len(unit_references(steps, L, "expert"))
    result: dict = {
        "model": str(model_dir),
        "routing": how,
        "config": asdict(cfg),
        "num_layers": L,
        "num_experts": E,
        "slice_bytes": slice_bytes,
        "expert_bytes": slice_bytes * L,
        "num_steps": len(steps),
        "unique_experts_per_step": refs_per_step,
        "belady_window_refs": window,
        "hit_ratio": table,
        "paper_hit_ratio": PAPER_TABLE4,
        "demand_bytes": {
            p: {k: round((1 - h) * num_refs) * slice_bytes * L for k, h in row.items()}
            for p, row in table.items()
        },
    }
    if cfg.measure:
        result["measured"] = _measure(model, model_dir, reqs, traces, steps, scfg, cfg, slice_bytes)
    proj_cost = sim.llama2_7b_a100(E)
    proj = []
    for k in ks:
        for prefetch in (False, True):
            sim_cfg = sim.SimConfig(capacity=k, prefetch=prefetch, depth=cfg.depth, scheduler=scfg)
            r = sim.simulate(traces, proj_cost, sim_cfg)
            proj.append(
                {
                    "k": k,
                    "prefetch": prefetch,
                    "normalized_latency": r.summary["normalized_latency"]["mean"],
                    "hit_ratio": r.cache.hit_ratio,
                    "stall_s": r.stall_s,
                }
            )
    result["projection_llama2_7b_a100"] = {"cost_model": proj_cost.to_dict(), "runs": proj}
    if out_dir is not None:
        plot_cache_bench(result, out_dir)
    return result


# ----------------------------------------------------------------------------------------- reports


def format_cache_table(result: dict) -> str:
    """The `pregate bench cache` result as plain-text tables."""
    ks = sorted({int(k) for row in result["hit_ratio"].values() for k in row})
    paper = result.get("paper_hit_ratio", {})
    lines = [
        f"hit ratio, whole experts of {result['num_experts']} ({result['num_steps']} steps, "
        f"{result['unique_experts_per_step']:.2f} experts/step; paper Table 4 in brackets)",
        "policy        " + "".join(f"k={k:<12d}" for k in ks),
    ]
    for p, row in result["hit_ratio"].items():
        cells = []
        for k in ks:
            ref = paper.get(p, {}).get(k)
            bracket = f" [{100 * ref:.0f}]" if ref is not None else ""
            cells.append(f"{100 * row[k]:5.1f}%" + bracket.ljust(7))
        lines.append(f"{p:<14s}" + "".join(c.ljust(14) for c in cells))
    blocks = (
        ("measured on this machine", "measured"),
        ("PROJECTION Llama-2-7B, A100-80GB", "projection_llama2_7b_a100"),
    )
    for title, key in blocks:
        block = result.get(key)
        if not block:
            continue
        lines.append(f"\nnormalized latency (s/token), Belady, {title}")
        if key == "measured":
            lines.append(
                f"median of {block.get('repeats', 1)} interleaved repeats (ranges: min-max); change: median "
                "of the repeats' prefetch / on-demand - 1; ! = a repeat more than 20 % off its median"
            )
            lines.append(
                f"all resident {block['all_resident_normalized_latency']:.4g} s/token, "
                f"{block['all_resident_makespan_s']:.3g} s in all; perfect: loads hidden behind compute, "
                "max(all resident, load), load = on-demand - all resident on normalized latency, the "
                "on-demand run's stall on the run's whole time (there a true bound); share: of the gain "
                "perfect overlap allows, what prefetching reached; copy: a load's own time per slice, "
                "the link's cap left out (on 2 cores what a prefetched load takes from the compute)"
            )
        header = "k   on-demand    prefetch     change   stall off/on (s)"
        if key == "measured":
            header += (
                "   perfect   share   time off/on/perfect (s)  share   copy off/on (ms)   sim error off/on   "
                "on-demand range   prefetch range    change range"
            )
        lines.append(header)
        for k in ks:
            off = next(r for r in block["runs"] if r["k"] == k and not r["prefetch"])
            on = next(r for r in block["runs"] if r["k"] == k and r["prefetch"])
            # measured: the median of the repeats' own changes; projected: one run each
            change = on.get("change", on["normalized_latency"] / off["normalized_latency"] - 1)
            line = (
                f"{k:<3d} {off['normalized_latency']:<12.4g} {on['normalized_latency']:<12.4g} "
                f"{100 * change:+6.1f}%   {off['stall_s']:.3g} / {on['stall_s']:.3g}"
            )
            if key == "measured":
                share, time_share = on.get("overlap_share"), on.get("makespan_share")
                line += f"   {on['perfect_overlap']:<7.4g} " + (
                    f"{100 * share:4.0f} %" if share is not None else "    -"
                )
                times = (off["makespan_s"], on["makespan_s"], on["perfect_makespan_s"])
                line += "   " + " / ".join(f"{v:6.1f}" for v in times) + "  "
                line += f"{100 * time_share:4.0f} %" if time_share is not None else "    -"
                copies = [
                    r["copy_s"] / r["bytes_loaded"] * result["slice_bytes"] * 1e3
                    if r["bytes_loaded"]
                    else 0.0
                    for r in (off, on)
                ]
                line += "   " + " / ".join(f"{v:.2f}" for v in copies) + "       "
                line += f"   {100 * off['sim_error']:+.1f}% / {100 * on['sim_error']:+.1f}%"
                if "change" in on:
                    line += (
                        f"   {off['normalized_latency_min']:.3g}-{off['normalized_latency_max']:.3g}"
                        f"{'!' if off['flagged'] else ''}   "
                        f"{on['normalized_latency_min']:.3g}-{on['normalized_latency_max']:.3g}"
                        f"{'!' if on['flagged'] else ''}   "
                        f"{100 * on['change_min']:+.1f}..{100 * on['change_max']:+.1f}%"
                    )
            lines.append(line)
    return "\n".join(lines)


def plot_cache_bench(result: dict, out_dir: str | Path) -> list[Path]:
    """hit_ratio.png (policies vs k, paper dashed) and latency.png (on-demand vs prefetch per k)."""
    from pregate.plots import pyplot

    plt = pyplot()
    out_dir = Path(out_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for p, row in result["hit_ratio"].items():
        ks = sorted(int(k) for k in row)
        (line,) = ax.plot(ks, [100 * row[k] for k in ks], marker="o", label=f"{p} (ours)")
        if p in result.get("paper_hit_ratio", {}):
            ref = result["paper_hit_ratio"][p]
            ys = [100 * ref.get(k, float("nan")) for k in ks]
            ax.plot(ks, ys, ls="--", color=line.get_color(), label=f"{p} (paper)")
    ax.set_xlabel(f"cache capacity k (whole experts of {result['num_experts']})")
    ax.set_ylabel("hit ratio (%)")
    ax.set_title("expert cache hit ratio on the routed ShareGPT trace")
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    paths.append(out_dir / "hit_ratio.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    titles = (
        ("measured (this machine)", "measured"),
        ("projection: Llama-2-7B, A100", "projection_llama2_7b_a100"),
    )
    blocks = [(t, result[k]) for t, k in titles if result.get(k)]
    if blocks:
        fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 4), squeeze=False)
        for ax, (title, block) in zip(axes[0], blocks):
            ks = sorted({r["k"] for r in block["runs"]})
            base = max(r["normalized_latency"] for r in block["runs"])
            for prefetch, label in ((False, "on-demand"), (True, "prefetch")):
                ys = []
                for k in ks:
                    run = next(r for r in block["runs"] if r["k"] == k and r["prefetch"] == prefetch)
                    ys.append(run["normalized_latency"] / base)
                ax.plot(ks, ys, marker="o", label=label)
            ax.set_xlabel("cache capacity k (whole experts)")
            ax.set_ylabel("normalized latency (relative to the worst)")
            ax.set_title(title, fontsize=9)
            ax.legend()
        fig.tight_layout()
        paths.append(out_dir / "latency.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
