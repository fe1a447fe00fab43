"""Trace-driven simulator of expert offloading over the *same* Scheduler and ExpertCache objects.

Owns the cost model (`CostModel`, the documented `PRESETS`, `calibrate` to measured step timings,
`fit_check` of how well that predicts held-out runs, `cost_from_json`), the discrete-event simulator
(`simulate`: the Scheduler, a `Residency` and a `CostModel` on a virtual clock; `scheduled_steps`,
`step_result` for teacher-forced replays; `compare_policies` for batching policies), pure cache runs over
scheduled steps (`hit_ratio_table`) and their reports (`format_policy_table`, `save_json`). The real
store (`pregate.store.ExpertStore`, which moves bytes) drives the same `Residency`, so both take
identical decisions; the store never imports this module.

Imports `pregate.eviction`, `pregate.scheduler`, `pregate.metrics`, `pregate.workload` and
`pregate.errors`; no torch: policy work needs no model and runs in seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pregate.errors import PregateError, check_int
from pregate.eviction import (
    EVICTION_POLICIES,
    Residency,
    ResidencyStats,
    max_streams,
    simulate_cache,
    unit_references,
)
from pregate.metrics import MetricsRecorder, percentile
from pregate.scheduler import Request, Scheduler, SchedulerConfig, SchedulerOutput, StepResult, run_steps
from pregate.workload import WorkloadRequest, poisson_arrivals


class SimError(PregateError):
    """Bad simulator input (cost model, unrouted trace, too few measured steps)."""


# ------------------------------------------------------------------------------------ cost model


@dataclass
class CostModel:
    """Time of a step = overhead + per layer (token work + per-expert work) + waits for loads.

    token_layer_s: per token per layer (attention, shared expert, routed-expert FLOPs of that token);
    expert_layer_s: per distinct expert per layer (reading its weights once, kernel launches);
    row_s: per output row of the LM head (an item that produces a token); step_s: per step (scheduling,
    embedding, norms, Python);
    bandwidth: bytes/s from the slow tier; slice_bytes: bytes of one (layer, expert) slice;
    copy_s: the compute's time one prefetched load takes (0 for a DMA engine such as a GPU's copy
    stream; on the CPU tier the loader thread's copy shares the cores: `bench cache` measures it).
    """

    num_layers: int
    slice_bytes: int
    bandwidth: float
    token_layer_s: float
    expert_layer_s: float
    row_s: float = 0.0
    step_s: float = 0.0
    copy_s: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "slice_bytes"):
            v = getattr(self, name)
            check_int(f"CostModel.{name}", v, error=SimError)
        bw = self.bandwidth
        if not (isinstance(bw, (int, float)) and bw > 0 and math.isfinite(bw)):
            raise SimError(f"CostModel.bandwidth={bw!r} must be a finite number of bytes/s > 0")
        for name in ("token_layer_s", "expert_layer_s", "row_s", "step_s", "copy_s"):
            if not getattr(self, name) >= 0:
                raise SimError(f"CostModel.{name}={getattr(self, name)!r} must be >= 0 seconds")

    @property
    def load_s(self) -> float:
        return self.slice_bytes / self.bandwidth

    def to_dict(self) -> dict:
        return asdict(self)


def llama2_7b_a100(num_experts: int = 7) -> CostModel:
    """Read-ME Llama-2-7B (7 routed experts) on one A100-80GB SXM, experts offloaded to pinned host RAM.

    Shapes (Llama-2-7B: 32 layers, hidden 4096, MLP 11008; Read-ME: 4.7B activated / 17B total): the
    routed parameters are (17.0 - 4.7) / (E - 1) = 2.05B per expert, i.e. 64M per (layer, expert) slice
    = 128 MB in fp16. Bandwidth: PCIe 4.0 x16, 32 GB/s nominal, ~25 GB/s measured host->device for
    pinned memory (NVIDIA bandwidthTest figures commonly reported for A100 SXM). Compute: decoding is
    HBM-bound; 2039 GB/s HBM2e (A100-80GB datasheet) at ~80 % efficiency reads one expert slice in
    128 MB / 1.6 TB/s = 80 us (expert_layer_s); the activated non-expert weights per layer (attention
    4 x 4096^2 + shared MLP, ~0.1B params, 0.2 GB fp16) take ~125 us, charged to step_s per layer;
    per-token FLOPs per layer 2 x 0.147 GFLOP / 312 TFLOP/s (dense fp16 peak) at ~50 % = ~1.9 us.
    A projection from datasheet numbers, not a measurement.
    """
    slice_bytes = int((17.0e9 - 4.7e9) / (num_experts - 1) / 32 * 2)
    return CostModel(
        num_layers=32,
        slice_bytes=slice_bytes,
        bandwidth=25e9,
        token_layer_s=1.9e-6,
        expert_layer_s=80e-6,
        row_s=4096 * 32000 * 2 / 1.6e12,
        step_s=32 * 125e-6,
        source="datasheet projection: A100-80GB SXM (HBM 2039 GB/s, 312 TFLOP/s fp16), PCIe 4.0 x16 ~25 GB/s",
    )


PRESETS = {"llama2-7b-a100": llama2_7b_a100}


def calibrate(
    records: Sequence[dict], num_layers: int, slice_bytes: int, bandwidth: float, copy_s: float = 0.0
) -> CostModel:
    """Least-squares fit of the compute terms to measured steps without loads.

    records: dicts with `duration` (s), `tokens`, `experts` (distinct), `rows` (LM-head rows) and
    `stall` (s waiting for loads; subtracted). Non-negative least squares: a term the data would make
    negative is 0 and the others refitted without it (clipping it at 0 afterwards would leave the rest
    fitted for the negative value: every prediction biased).
    """
    import numpy as np
    from scipy.optimize import nnls

    if len(records) < 4:
        raise SimError(f"calibrate needs at least 4 measured steps, got {len(records)}")
    a = np.array([[num_layers * r["tokens"], num_layers * r["experts"], r["rows"], 1.0] for r in records])
    b = np.array([r["duration"] - r.get("stall", 0.0) for r in records])
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0  # columns of comparable size (nnls's tolerance is absolute); a zero one stays 0
    coef = nnls(a / scale, b)[0] / scale
    return CostModel(
        num_layers,
        slice_bytes,
        bandwidth,
        float(coef[0]),
        float(coef[1]),
        float(coef[2]),
        float(coef[3]),
        copy_s,
        source=f"non-negative least squares on {len(records)} measured steps",
    )


def step_time(cost: CostModel, record: dict) -> float:
    """The compute time `cost` predicts for one measured step (a `calibrate` record; no loads)."""
    layers = cost.num_layers
    return (
        cost.step_s
        + layers * (record["tokens"] * cost.token_layer_s + record["experts"] * cost.expert_layer_s)
        + record["rows"] * cost.row_s
    )


def fit_check(runs: Sequence[Sequence[dict]], num_layers: int) -> dict:
    """How well the least-squares cost model predicts measured steps it was not fitted to: for each run,
    fit on every other run's steps and predict its own (leave one run out).

    runs: the step records of each measured run (`calibrate` records). Returns the median and 90th
    percentile of |predicted - measured| / measured per step, and per run the error of its total step
    time (what latency sums), signed, in the order of `runs`.
    """
    if len(runs) < 2:
        raise SimError(f"fit_check needs at least 2 measured runs, got {len(runs)}")
    step_errors: list[float] = []
    totals: list[float] = []
    for i, held_out in enumerate(runs):
        rest = [r for j, run in enumerate(runs) if j != i for r in run]
        cost = calibrate(rest, num_layers, slice_bytes=1, bandwidth=1e18)
        predicted = [step_time(cost, r) for r in held_out]
        measured = [r["duration"] for r in held_out]
        step_errors += [abs(p - m) / m for p, m in zip(predicted, measured) if m > 0]
        totals.append(sum(predicted) / sum(measured) - 1.0)
    return {
        "runs": len(runs),
        "steps": len(step_errors),
        "step_error_median": percentile(step_errors, 50),
        "step_error_p90": percentile(step_errors, 90),
        "total_error_by_run": totals,
    }


def cost_from_json(data: dict) -> CostModel:
    """A cost model from JSON: a bare CostModel, a `bench cache` result (its calibrated model), or a
    `bench serve` result (least squares on its measured engine steps; no offloading terms)."""
    what = "not a cost model, a `bench cache` or a `bench serve` JSON"
    if not isinstance(data, dict):
        raise SimError(f"{what} (a {type(data).__name__}, not an object)")
    if "engine_steps" in data:
        layers = data["workload"]["num_layers"]
        return calibrate(data["engine_steps"], layers, slice_bytes=1, bandwidth=1e18)
    data = data.get("measured", {}).get("cost_model", data)
    try:
        return CostModel(**data)
    except TypeError as err:
        raise SimError(f"{what} ({err})") from None


# ------------------------------------------------------------------------------------ simulation


@dataclass
class SimConfig:
    """One simulated configuration: the cache side (unit, capacity, policy...) and the scheduler."""

    capacity: int
    unit: str = "expert"
    policy: str = "belady"
    window: int | None = None
    prefetch: bool = False
    depth: int = 1
    seed: int = 0
    plan_ahead: bool = True  # give the cache the full step sequence (dry run) as its known future
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class SimResult:
    summary: dict
    cache: ResidencyStats
    steps: list[tuple[int, ...]]  # expert set of every step, in order
    step_times: list[float]
    stall_s: float
    loads: int  # slices moved into the fast tier (bypass included)
    prefetched: int = 0  # of those, the ones the link loaded ahead (each charged cost.copy_s of compute)

    def to_dict(self) -> dict:
        return {
            "summary": self.summary,
            "cache": {**asdict(self.cache), "hit_ratio": self.cache.hit_ratio},
            "stall_s": self.stall_s,
            "slice_loads": self.loads,
            "prefetched_loads": self.prefetched,
            "num_steps": len(self.steps),
        }


def _requests(trace: Sequence[WorkloadRequest]) -> list[WorkloadRequest]:
    for r in trace:
        if not r.prompt_experts or r.output_experts is None or len(r.output_experts) < r.output_len:
            raise SimError(
                f"request {r.request_id!r} is not routed: it needs prompt_experts and "
                f"output_len={r.output_len} output_experts; route the trace first"
            )
    return sorted(trace, key=lambda r: r.arrival_time)


def step_result(out: SchedulerOutput, sched: Scheduler, by_id: dict[str, WorkloadRequest]) -> StepResult:
    """The StepResult a teacher-forced replay produces: each producing item's next trace expert."""
    sampled = {}
    running = {r.request_id: r for r in sched.running}
    for it in out.items:
        r = running[it.request_id]
        if it.produces_token:
            sampled[it.request_id] = by_id[it.request_id].output_experts[r.num_generated]
    return StepResult(sampled)


def _arrivals(reqs: Sequence[WorkloadRequest]) -> list[tuple[float, Request]]:
    return [(r.arrival_time, Request(r.request_id, list(r.prompt_experts), r.output_len)) for r in reqs]


def scheduled_steps(trace: Sequence[WorkloadRequest], config: SchedulerConfig) -> list[tuple[int, ...]]:
    """Dry run (every request queued at once): the expert set of each step the scheduler would run."""
    reqs = _requests(trace)
    by_id = {r.request_id: r for r in reqs}
    sched = Scheduler(config)
    at_once = [(0.0, request) for _, request in _arrivals(reqs)]
    steps = run_steps(sched, lambda out: step_result(out, sched, by_id), arrivals=at_once)
    return [tuple(sorted(out.experts)) for out, _ in steps]


@dataclass
class _VirtualTime:
    """The simulator's clock and its one load link."""

    load_s: float  # seconds one slice takes on the link
    now: float = 0.0
    link: float = 0.0  # when the link is free again
    stall: float = 0.0  # compute time spent waiting for expert slices
    loads: int = 0
    prefetched: int = 0
    ready: dict[int, float] = field(default_factory=dict)  # slot -> time its load completes

    def load(self, slot: int | None = None) -> float:
        """Put one slice on the link as soon as it is free; returns when it has arrived."""
        self.link = max(self.link, self.now) + self.load_s
        self.loads += 1
        if slot is not None:
            self.ready[slot] = self.link
        return self.link


def simulate(trace: Sequence[WorkloadRequest], cost: CostModel, config: SimConfig) -> SimResult:
    """Replay a routed trace on a virtual clock through the real Scheduler and a Residency.

    Arrivals follow the trace's arrival_time. Per step: overhead + per layer the token work, then each
    expert's work after its slice is ready. Loads use one link at `cost.bandwidth`: without
    prefetching a slice loads when its layer asks for it; with prefetching the link works ahead in
    need order as far as the Residency's horizon allows (the store's loader thread does the same), the
    slices of streamed experts included, and each such load costs the compute `cost.copy_s`.
    """
    reqs = _requests(trace)
    by_id = {r.request_id: r for r in reqs}
    L = cost.num_layers
    seen = max((e for r in reqs for e in (*r.prompt_experts, *r.output_experts[: r.output_len])), default=-1)
    res = Residency(
        L,
        config.unit,
        config.capacity,
        config.policy,
        config.window,
        config.prefetch,
        config.depth,
        config.seed,
        streams=max_streams(seen + 1),  # the experts the trace uses: as many rings as the store needs
    )
    if config.plan_ahead and all(r.arrival_time == 0 for r in reqs):
        res.plan(scheduled_steps(reqs, config.scheduler))
    sched = Scheduler(config.scheduler)
    t = _VirtualTime(cost.load_s)
    rec = MetricsRecorder(clock=lambda: t.now)
    steps: list[tuple[int, ...]] = []
    times: list[float] = []

    def run(out: SchedulerOutput) -> StepResult:
        start = t.now
        experts = sorted(out.experts)
        steps.append(tuple(experts))
        for layer in range(L):
            plan = res.begin_layer(layer, experts)
            if config.prefetch:  # the link runs ahead within the horizon
                while (job := res.next_load()) is not None:
                    res.start_load(job[0], job[1], job[2])
                    t.load(job[0])
                    res.finish_load(job[0])
                    t.prefetched += 1
                    t.now += cost.copy_s  # the loader's copy takes the cores from the compute
            t.now += cost.token_layer_s * out.num_tokens
            for e in experts:
                p = plan[e]
                t0 = t.now
                if p is not None and res.content[p] == (layer, e):
                    t.now = max(t.now, t.ready.get(p, 0.0))  # resident, or its prefetch is on the link
                elif p is not None and res.want.get(p, (None, None, 0))[:2] == (layer, e):
                    res.start_load(p, layer, e)  # on demand
                    t.now = t.load(p)
                    res.finish_load(p)
                else:  # not resident: streamed through a staging buffer
                    t.now = t.load()
                t.stall += t.now - t0
                t.now += cost.expert_layer_s
        t.now += cost.step_s + cost.row_s * out.num_token_rows
        times.append(t.now - start)
        return step_result(out, sched, by_id)

    def wait_until(at: float) -> None:
        t.now = at

    for r in reqs:
        rec.on_arrival(r.request_id, at=r.arrival_time)
    for out, finished in run_steps(
        sched, run, arrivals=_arrivals(reqs), clock=lambda: t.now, wait_until=wait_until
    ):
        for it in out.items:
            if it.produces_token:
                rec.on_token(it.request_id, at=t.now)
        for r in finished:
            rec.on_finish(r.request_id, at=t.now)
    return SimResult(rec.summary(), res.stats, steps, times, t.stall, t.loads, t.prefetched)


def compare_policies(
    trace: Sequence[WorkloadRequest],
    cost: CostModel,
    policies: Sequence[str],
    scheduler: SchedulerConfig,
    rate: float | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """Every batching policy on the same routed trace with every expert resident (no offloading):
    {policy: metrics} on the simulator's clock. rate: Poisson arrivals at this many requests/s (seed)
    instead of the trace's own arrival times."""
    if rate is not None:
        arrivals = poisson_arrivals(len(trace), rate, seed)
        trace = [replace(r, arrival_time=a) for r, a in zip(trace, arrivals)]
    reqs = _requests(trace)
    experts = 1 + max(e for r in reqs for e in [*r.prompt_experts, *r.output_experts])
    resident = replace(cost, bandwidth=1e18)  # loads never happen after the first touch
    out = {}
    for policy in policies:
        config = SimConfig(capacity=experts, scheduler=replace(scheduler, policy=policy), plan_ahead=False)
        r = simulate(reqs, resident, config)
        s = r.summary
        out[policy] = {
            "norm_mean": s["normalized_latency"]["mean"],
            "norm_p95": s["normalized_latency"]["p95"],
            "norm_max": s["normalized_latency"]["max"],
            "ttft_mean": s["ttft"]["mean"],
            "throughput": s["throughput"],
            "experts_per_step": sum(map(len, r.steps)) / len(r.steps),
        }
    return out


def hit_ratio_table(
    steps: Sequence[Iterable[int]],
    num_layers: int,
    unit: str,
    capacities: Sequence[int],
    policies: Sequence[str] = EVICTION_POLICIES,
    window: int | None = None,
    seed: int = 0,
) -> dict:
    """{policy: {k: hit ratio}} of a pure cache run (no prefetch) on the steps' reference string."""
    refs = unit_references(steps, num_layers, unit)
    table = {}
    for p in policies:
        w = window if p == "belady" else None
        table[p] = {k: simulate_cache(refs, k, p, w, seed).hit_ratio for k in capacities}
    return table


# ------------------------------------------------------------------------------------ reports


def format_policy_table(result: dict[str, dict], baseline: str = "decode-first") -> str:
    """compare_policies as text: normalized latency in ms/token, changes against `baseline`."""
    lines = [
        f"{'policy':14s}{'norm mean':>11s}{'p95':>9s}{'max':>9s}{'TTFT (s)':>10s}{'tok/s':>8s}"
        f"{'experts/step':>14s}   vs {baseline}: mean / p95 / max"
    ]
    base = result.get(baseline)
    for p, m in result.items():
        line = (
            f"{p:14s}{1e3 * m['norm_mean']:11.1f}{1e3 * m['norm_p95']:9.1f}{1e3 * m['norm_max']:9.1f}"
            f"{m['ttft_mean']:10.2f}{m['throughput']:8.1f}{m['experts_per_step']:14.2f}"
        )
        if base and p != baseline:
            changes = [f"{100 * (m[k] / base[k] - 1):+.1f}%" for k in ("norm_mean", "norm_p95", "norm_max")]
            line += "   " + " / ".join(changes)
        lines.append(line)
    return "\n".join(lines)


def save_json(path: str | Path, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1, default=str))
