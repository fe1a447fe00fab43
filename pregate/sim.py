"""Trace-driven simulator of expert offloading over the *same* Scheduler and ExpertCache objects.

No torch here: policy work needs no model and runs in seconds. Three pieces live here because the real
store (`pregate.store.ExpertStore`, which moves bytes) and the simulator (which charges time) must take
identical decisions:

- Reference strings. A scheduled step uses a set of routed experts S (pre-gating: the same S in every
  layer). The cache sees, per step, in ascending expert order:
    unit "expert" (a whole expert, all layers, is one unit): one reference per (step, expert);
    unit "slice" (one (layer, expert) slice is one unit): one reference per (step, layer, expert).
  `write_references` stores them in a plain text format an independent simulator can replay.
- `Residency`: the cache decisions (hits, misses, evictions, prefetches through `ExpertCache`) and the
  slot bookkeeping of the fast tier (which slice each physical slot holds, which loads are wanted and
  when they are needed). The store and the simulator both drive it through `begin_layer`.
- `simulate`: the Scheduler, a Residency and a `CostModel` on a virtual clock; `calibrate` fits the cost
  model to measured step timings; `PRESETS` holds documented parameter sets (Llama-2-7B on one A100).

Belady's future. `Residency.plan(steps)` appends steps whose experts are already known (routed and
queued work) to the cache's FutureView; a lookahead `window` (in references) limits how far the policy
may look. Beyond the window (or beyond what has been planned) a unit counts as "never used again":
such units are evicted first, the least recently used of them first; with window 0 Belady is LRU.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pregate.errors import PregateError
from pregate.eviction import EVICTION_POLICIES, ExpertCache, FutureView
from pregate.metrics import MetricsRecorder
from pregate.scheduler import Request, Scheduler, SchedulerConfig, SchedulerOutput, StepResult
from pregate.workload import WorkloadRequest, poisson_arrivals

UNITS = ("expert", "slice")
TRACE_HEADER = "# pregate reference string v1"


class SimError(PregateError):
    """Bad simulator input (unit, cost model, trace file) or a plan that the run contradicts."""


def check_unit(unit: object) -> str:
    if unit not in UNITS:
        raise SimError(f"unit={unit!r} is unknown; use 'expert' (whole expert, all layers) or 'slice' (one layer)")
    return unit  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ reference strings


def step_references(experts: Iterable[int], num_layers: int, unit: str) -> list[tuple[int, int]]:
    """(layer, expert) references of one step in the order the cache sees them; layer -1 = whole expert."""
    s = sorted(set(experts))
    if check_unit(unit) == "expert":
        return [(-1, e) for e in s]
    return [(layer, e) for layer in range(num_layers) for e in s]


def unit_of(layer: int, expert: int, unit: str) -> object:
    """The cache unit of a reference: the expert id, or the (layer, expert) pair."""
    return expert if unit == "expert" else (layer, expert)


def unit_references(steps: Iterable[Iterable[int]], num_layers: int, unit: str) -> list[object]:
    """The reference string (cache units) of a sequence of steps' expert sets."""
    return [unit_of(l, e, unit) for s in steps for l, e in step_references(s, num_layers, unit)]


def write_references(path: str | Path, steps: Sequence[Iterable[int]], num_layers: int, num_experts: int, unit: str) -> Path:
    """Write the reference string the cache sees, one access per line: `step layer expert`.

    Format (plain text, UTF-8): lines starting with '#' are comments; the first is TRACE_HEADER, the
    second `# unit=<expert|slice> num_layers=<L> num_experts=<E>`. Each other line is three integers
    separated by one space: the step index (0-based, in execution order), the layer (0..L-1; -1 when
    the unit is a whole expert, which is loaded for all layers at once) and the expert id (0..E-1).
    Accesses appear in the order the cache performs them. To replay in another cache simulator use
    object id = expert (unit expert) or layer * E + expert (unit slice), object size 1.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.write(f"{TRACE_HEADER}\n# unit={check_unit(unit)} num_layers={num_layers} num_experts={num_experts}\n")
        for i, s in enumerate(steps):
            for layer, e in step_references(s, num_layers, unit):
                f.write(f"{i} {layer} {e}\n")
    return path


@dataclass
class ReferenceTrace:
    unit: str
    num_layers: int
    num_experts: int
    accesses: list[tuple[int, int, int]]  # (step, layer, expert)

    def object_ids(self) -> list[int]:
        """Integer object ids for an independent simulator (see `write_references`)."""
        if self.unit == "expert":
            return [e for _, _, e in self.accesses]
        return [layer * self.num_experts + e for _, layer, e in self.accesses]


def read_references(path: str | Path) -> ReferenceTrace:
    """Parse a file written by `write_references`; a broken line names the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise SimError(f"reference trace {path} does not exist; write one with `pregate trace export`")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip() != TRACE_HEADER:
        raise SimError(f"{path}: first line must be {TRACE_HEADER!r}; not a pregate reference string")
    try:
        meta = dict(kv.split("=", 1) for kv in lines[1].lstrip("# ").split())
        unit, num_layers, num_experts = meta["unit"], int(meta["num_layers"]), int(meta["num_experts"])
    except (IndexError, KeyError, ValueError):
        raise SimError(f"{path}:2: expected '# unit=... num_layers=... num_experts=...'") from None
    check_unit(unit)
    out = []
    for n, line in enumerate(lines[2:], 3):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        try:
            step, layer, e = (int(p) for p in parts)
        except ValueError:
            raise SimError(f"{path}:{n}: expected three integers 'step layer expert', got {line!r}") from None
        if not (0 <= e < num_experts and -1 <= layer < num_layers):
            raise SimError(f"{path}:{n}: layer {layer} or expert {e} out of range")
        out.append((step, layer, e))
    return ReferenceTrace(unit, num_layers, num_experts, out)


# ------------------------------------------------------------------------------------ residency


@dataclass
class ResidencyStats:
    """Cache counters plus slot traffic. `bypass` = slices used without a slot (the unit was not
    resident when the layer ran: a step needing more units than the capacity streams the rest)."""

    hits: int = 0
    misses: int = 0
    prefetches: int = 0
    evictions: int = 0
    bypass: int = 0

    @property
    def hit_ratio(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class Residency:
    """Which units are in the fast tier, which slot holds which slice, and which loads are wanted.

    Physical slots: unit "expert" -> capacity * L slots (slot j*L + l holds layer l of the expert in
    unit slot j); unit "slice" -> capacity slots. `content[p]` = (layer, expert) whose bytes slot p holds
    (None: nothing valid). `want[p]` = (layer, expert, need): a load the owner should perform, `need`
    = step * L + layer orders urgency. A load may start when need <= `horizon` (current layer plus the
    prefetch depth; without prefetching only the current layer) and slot p is not `pinned` to other
    content (pinned: the running layer, or for whole experts the rest of the step, still reads it).
    The owner calls `start_load` / `finish_load` around each transfer.
    """

    def __init__(self, num_layers: int, unit: str, capacity: int, policy: str = "lru", window: int | None = None,
                 prefetch: bool = False, depth: int = 1, seed: int = 0) -> None:
        self.L, self.unit = num_layers, check_unit(unit)
        if policy not in EVICTION_POLICIES:
            raise SimError(f"unknown eviction policy {policy!r}; choose one of {', '.join(EVICTION_POLICIES)}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise SimError(f"prefetch depth={depth!r} must be an int >= 1 (layers loaded ahead)")
        self.future = FutureView(window)
        self.cache = ExpertCache(capacity, policy, self.future, seed)
        self.capacity, self.prefetch, self.depth = capacity, prefetch, depth
        self.per_unit = num_layers if unit == "expert" else 1
        self.num_slots = capacity * self.per_unit
        self.content: list[tuple[int, int] | None] = [None] * self.num_slots
        self.want: dict[int, tuple[int, int, int]] = {}
        self.inflight: dict[int, tuple[int, int]] = {}
        self.pinned: dict[int, tuple[int, int]] = {}
        self.horizon = -1
        self.bypass = 0
        self.step = -1
        self._slot_of: dict[object, int] = {}  # resident unit -> unit slot
        self._free = list(range(capacity - 1, -1, -1))
        self._refs: list[object] = []  # references from index _refs_base on (planned or observed)
        self._refs_base = 0  # earlier references are past and forgotten (a long-running server)
        self._planned: deque[tuple[int, ...]] = deque()  # planned steps not yet started
        self._t = 0  # index of the next access
        self._step_slot: dict[int, int] = {}  # expert -> unit slot, frozen for the step (unit expert)
        self._accessed: set[int] = set()
        self._layer = -1
        self._cross_done = False

    # -- the known future
    def plan(self, steps: Iterable[Iterable[int]]) -> None:
        """Append steps whose expert sets are known ahead (routed, queued work), in execution order."""
        for s in steps:
            s = tuple(sorted(set(s)))
            self._planned.append(s)
            refs = [unit_of(l, e, self.unit) for l, e in step_references(s, self.L, self.unit)]
            self._refs.extend(refs)
            self.future.extend(refs)

    @property
    def stats(self) -> ResidencyStats:
        c = self.cache.stats
        return ResidencyStats(c.hits, c.misses, c.prefetches, c.evictions, self.bypass)

    # -- decisions
    def _assign(self, unit: object) -> int:
        """Give the just-loaded `unit` the slot its victim freed (or a free one); drop stale wants."""
        victim = self.cache.last_evicted
        j = self._slot_of.pop(victim) if victim is not None else self._free.pop()
        self._slot_of[unit] = j
        for p in range(j * self.per_unit, (j + 1) * self.per_unit):
            self.want.pop(p, None)
        return j

    def _want(self, p: int, layer: int, e: int, need: int) -> None:
        if self.content[p] != (layer, e) or p in self.inflight:
            self.want[p] = (layer, e, need)

    def _access(self, layer: int, e: int) -> None:
        unit = unit_of(layer, e, self.unit)
        t = self._t
        known = self._refs[t - self._refs_base] if t < self._refs_base + len(self._refs) else None
        if known is None:  # not planned: the step becomes known now
            self._refs.append(unit)
            self.future.extend([unit])
        elif known != unit:
            raise SimError(
                f"step {self.step} uses {unit!r} at reference {t} but the plan says {known!r}; "
                "plan() must list the experts of the steps in the order they run"
            )
        self._t += 1
        if not self.cache.access(unit, t):
            victim = self.cache.last_evicted
            if self.unit == "expert" and victim in self._step_slot:
                del self._step_slot[victim]  # evicted by its own step (more experts than slots): streams
            self._assign(unit)

    def begin_layer(self, layer: int, experts: Sequence[int]) -> dict[int, int | None]:
        """Layer `layer` is about to run with `experts` (layer 0 starts a step). Returns expert ->
        physical slot holding (or about to hold) its slice, or None (not resident: stream it)."""
        experts = sorted(set(experts))
        if layer == 0:
            self._start_step(experts)
        elif not 0 < layer < self.L or self.step < 0:
            raise SimError(f"layer={layer} out of range [0, {self.L}) or called before layer 0 of a step")
        self.pinned = {}
        self._layer = layer
        need = self.step * self.L + layer
        plan: dict[int, int | None] = {}
        if self.unit == "slice":
            for e in experts:
                self._access(layer, e)
            for e in experts:
                j = self._slot_of.get((layer, e))
                plan[e] = j
                if j is not None:
                    self.pinned[j] = (layer, e)
                    self._want(j, layer, e, need)
        else:
            for e in experts:
                if e not in self._step_slot and e not in self._accessed:
                    self._accessed.add(e)
                    self._access(-1, e)
                    if e in self._slot_of:
                        self._step_slot[e] = self._slot_of[e]
            for e, j in self._step_slot.items():  # pin and want the rest of the step
                for l2 in range(layer, self.L):
                    p = j * self.L + l2
                    self.pinned[p] = (l2, e)
                    if self._slot_of.get(e) == j:
                        self._want(p, l2, e, self.step * self.L + l2)
            for e in experts:
                j = self._step_slot.get(e)
                plan[e] = None if j is None else j * self.L + layer
        self.horizon = need + (self.depth if self.prefetch else 0)
        if self.prefetch:
            self._prefetch(layer, experts)
        self.bypass += sum(1 for p in plan.values() if p is None)
        return plan

    def _forget_past(self) -> None:
        """References before the running step are past: let the future view and our list drop them, so
        bookkeeping stays bounded however long the store serves (amortised O(1) per reference)."""
        self.future.advance(self._t)
        drop = self._t - self._refs_base
        if drop > max(1024, len(self._refs) - drop):
            del self._refs[:drop]
            self._refs_base = self._t

    def _start_step(self, experts: list[int]) -> None:
        self._forget_past()
        self.step += 1
        self._step_slot, self._accessed, self._cross_done = {}, set(), False
        if self._planned:  # _access also checks every reference against the plan
            planned = self._planned.popleft()
            if tuple(experts) != planned:
                raise SimError(f"step {self.step} uses experts {experts}, the plan says {list(planned)}; "
                               "plan() must list the experts of the steps in the order they run")

    def _prefetch_unit(self, layer: int, e: int, need: int) -> None:
        unit = unit_of(layer, e, self.unit)
        if unit in self.cache:
            return
        if len(self.cache) >= self.capacity:
            # never evict what the running layer (or, for whole experts, the running step) still reads
            victim = self.cache.policy.victim(self.cache.resident, self._t - 1, self.future)
            if (victim in self._step_slot) if self.unit == "expert" else victim[0] == self._layer:
                return
        if not self.cache.prefetch(unit, self._t):
            return  # everything resident is needed sooner
        j = self._assign(unit)
        if self.unit == "slice":
            self._want(j, layer, e, need)
        else:
            for l2 in range(self.L):
                self._want(j * self.L + l2, l2, e, (self.step + 1) * self.L + l2)

    def _prefetch(self, layer: int, experts: list[int]) -> None:
        base = self.step * self.L
        if self.unit == "slice":  # next layers of this step use the same experts (pre-gating)
            for l2 in range(layer + 1, min(self.L, layer + 1 + self.depth)):
                for e in experts:
                    self._prefetch_unit(l2, e, base + l2)
        if layer + self.depth >= self.L and self._planned and not self._cross_done:
            self._cross_done = True  # the next step's first layers, once per step
            nxt = self._planned[0]
            if self.unit == "expert":
                for e in nxt:
                    self._prefetch_unit(-1, e, base + self.L)
            else:
                for l2 in range(0, layer + self.depth - self.L + 1):
                    for e in nxt:
                        self._prefetch_unit(l2, e, base + self.L + l2)

    # -- the owner's side of a transfer
    def next_load(self, any_need: bool = False) -> tuple[int, int, int, int] | None:
        """The most urgent startable load (slot, layer, expert, need), or None. `any_need` ignores the horizon."""
        best = None
        for p, (layer, e, need) in self.want.items():
            if (need > self.horizon and not any_need) or p in self.inflight:
                continue
            pin = self.pinned.get(p)
            if pin is not None and pin != (layer, e):
                continue
            if best is None or need < best[3]:
                best = (p, layer, e, need)
        return best

    def start_load(self, p: int, layer: int, e: int) -> None:
        self.want.pop(p, None)
        self.inflight[p] = (layer, e)
        self.content[p] = None

    def finish_load(self, p: int) -> None:
        self.content[p] = self.inflight.pop(p)


# ------------------------------------------------------------------------------------ cost model


@dataclass
class CostModel:
    """Time of a step = overhead + per layer (token work + per-expert work) + waits for loads.

    token_layer_s: per token per layer (attention, shared expert, routed-expert FLOPs of that token);
    expert_layer_s: per distinct expert per layer (reading its weights once, kernel launches);
    row_s: per output row of the LM head; step_s: per step (scheduling, embedding, norms, Python);
    bandwidth: bytes/s from the slow tier; slice_bytes: bytes of one (layer, expert) slice.
    """

    num_layers: int
    slice_bytes: int
    bandwidth: float
    token_layer_s: float
    expert_layer_s: float
    row_s: float = 0.0
    step_s: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "slice_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SimError(f"CostModel.{name}={v!r} must be an int >= 1")
        if not (isinstance(self.bandwidth, (int, float)) and self.bandwidth > 0 and math.isfinite(self.bandwidth)):
            raise SimError(f"CostModel.bandwidth={self.bandwidth!r} must be a finite number of bytes/s > 0")
        for name in ("token_layer_s", "expert_layer_s", "row_s", "step_s"):
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
        num_layers=32, slice_bytes=slice_bytes, bandwidth=25e9, token_layer_s=1.9e-6,
        expert_layer_s=80e-6, row_s=4096 * 32000 * 2 / 1.6e12, step_s=32 * 125e-6,
        source="datasheet projection: A100-80GB SXM (HBM 2039 GB/s, 312 TFLOP/s fp16), PCIe 4.0 x16 ~25 GB/s",
    )


PRESETS = {"llama2-7b-a100": llama2_7b_a100}


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

    def to_dict(self) -> dict:
        return {"summary": self.summary, "cache": {**asdict(self.cache), "hit_ratio": self.cache.hit_ratio},
                "stall_s": self.stall_s, "slice_loads": self.loads, "num_steps": len(self.steps)}


def _requests(trace: Sequence[WorkloadRequest]) -> list[WorkloadRequest]:
    for r in trace:
        if not r.prompt_experts or r.output_experts is None or len(r.output_experts) < r.output_len:
            raise SimError(f"request {r.request_id!r} is not routed: it needs prompt_experts and "
                           f"output_len={r.output_len} output_experts; route the trace first")
    return sorted(trace, key=lambda r: r.arrival_time)


def step_result(out: SchedulerOutput, sched: Scheduler, by_id: dict[str, WorkloadRequest]) -> StepResult:
    """The StepResult a teacher-forced replay produces: each producing item's next trace expert."""
    sampled = {}
    running = {r.request_id: r for r in sched.running}
    for it in out.items:
        r = running[it.request_id]
        if it.kind == "decode" or it.start + it.num_tokens == r.prompt_len:
            sampled[it.request_id] = by_id[it.request_id].output_experts[r.num_generated]
    return StepResult(sampled)


def scheduled_steps(trace: Sequence[WorkloadRequest], config: SchedulerConfig) -> list[tuple[int, ...]]:
    """Dry run (every request queued at once): the expert set of each step the scheduler would run."""
    reqs = _requests(trace)
    by_id = {r.request_id: r for r in reqs}
    sched = Scheduler(config)
    for r in reqs:
        sched.add_request(Request(r.request_id, list(r.prompt_experts), r.output_len))
    steps = []
    while sched.has_work():
        out = sched.schedule()
        steps.append(tuple(sorted(out.experts)))
        sched.update(out, step_result(out, sched, by_id))
    return steps


def simulate(trace: Sequence[WorkloadRequest], cost: CostModel, config: SimConfig) -> SimResult:
    """Replay a routed trace on a virtual clock through the real Scheduler and a Residency.

    Arrivals follow the trace's arrival_time. Per step: overhead + per layer the token work, then each
    expert's work after its slice is ready. Loads use one link at `cost.bandwidth`: without
    prefetching a slice loads when its layer asks for it; with prefetching the link works ahead in
    need order as far as the Residency's horizon allows (the store's loader thread does the same).
    """
    reqs = _requests(trace)
    by_id = {r.request_id: r for r in reqs}
    L = cost.num_layers
    res = Residency(L, config.unit, config.capacity, config.policy, config.window, config.prefetch, config.depth, config.seed)
    if config.plan_ahead and all(r.arrival_time == 0 for r in reqs):
        res.plan(scheduled_steps(reqs, config.scheduler))
    sched = Scheduler(config.scheduler)
    now = 0.0
    rec = MetricsRecorder(clock=lambda: now)
    pending = deque(reqs)
    steps, times, stall, loads = [], [], 0.0, 0
    ready: dict[int, float] = {}  # slot -> time its load completes
    link = 0.0
    while pending or sched.has_work():
        while pending and pending[0].arrival_time <= now:
            r = pending.popleft()
            sched.add_request(Request(r.request_id, list(r.prompt_experts), r.output_len), now=r.arrival_time)
            rec.on_arrival(r.request_id, at=r.arrival_time)
        if not sched.has_work():
            now = pending[0].arrival_time
            continue
        out = sched.schedule()
        start = now
        experts = sorted(out.experts)
        steps.append(tuple(experts))
        for layer in range(L):
            plan = res.begin_layer(layer, experts)
            if config.prefetch:  # the link runs ahead within the horizon
                while (job := res.next_load()) is not None:
                    p = job[0]
                    res.start_load(p, job[1], job[2])
                    link = max(link, now) + cost.load_s
                    ready[p] = link
                    res.finish_load(p)
                    loads += 1
            now += cost.token_layer_s * out.num_tokens
            for e in experts:
                p = plan[e]
                t0 = now
                if p is not None and res.content[p] == (layer, e):
                    now = max(now, ready.get(p, 0.0))  # resident, or its prefetch is on the link
                elif p is not None and res.want.get(p, (None, None, 0))[:2] == (layer, e):
                    res.start_load(p, layer, e)  # on demand
                    link = max(link, now) + cost.load_s
                    ready[p] = link
                    res.finish_load(p)
                    now, loads = link, loads + 1
                else:  # not resident: streamed through a staging buffer
                    link = max(link, now) + cost.load_s
                    now, loads = link, loads + 1
                stall += now - t0
                now += cost.expert_layer_s
        now += cost.step_s + cost.row_s * len(out.items)  # one LM-head row per item (its last token)
        times.append(now - start)
        result = step_result(out, sched, by_id)
        for rid in result.sampled:
            rec.on_token(rid, at=now)
        for r in sched.update(out, result):
            rec.on_finish(r.request_id, at=now)
    return SimResult(rec.summary(), res.stats, steps, times, stall, loads)


def compare_policies(trace: Sequence[WorkloadRequest], cost: CostModel, policies: Sequence[str],
                     scheduler: SchedulerConfig, rate: float | None = None, seed: int = 0) -> dict[str, dict]:
    """Every batching policy on the same routed trace with every expert resident (no offloading):
    {policy: metrics} on the simulator's clock. rate: Poisson arrivals at this many requests/s (seed)
    instead of the trace's own arrival times."""
    if rate is not None:
        trace = [replace(r, arrival_time=a) for r, a in zip(trace, poisson_arrivals(len(trace), rate, seed))]
    reqs = _requests(trace)
    experts = 1 + max(e for r in reqs for e in [*r.prompt_experts, *r.output_experts])
    resident = replace(cost, bandwidth=1e18)  # loads never happen after the first touch
    out = {}
    for policy in policies:
        r = simulate(reqs, resident, SimConfig(capacity=experts, scheduler=replace(scheduler, policy=policy), plan_ahead=False))
        s = r.summary
        out[policy] = {"norm_mean": s["normalized_latency"]["mean"], "norm_p95": s["normalized_latency"]["p95"],
                       "norm_max": s["normalized_latency"]["max"], "ttft_mean": s["ttft"]["mean"],
                       "throughput": s["throughput"], "experts_per_step": sum(map(len, r.steps)) / len(r.steps)}
    return out


def format_policy_table(result: dict[str, dict], baseline: str = "decode-first") -> str:
    """compare_policies as text: normalized latency in ms/token, changes against `baseline`."""
    lines = [f"{'policy':14s}{'norm mean':>11s}{'p95':>9s}{'max':>9s}{'TTFT (s)':>10s}{'tok/s':>8s}{'experts/step':>14s}"
             f"   vs {baseline}: mean / p95 / max"]
    base = result.get(baseline)
    for p, m in result.items():
        line = (f"{p:14s}{1e3 * m['norm_mean']:11.1f}{1e3 * m['norm_p95']:9.1f}{1e3 * m['norm_max']:9.1f}"
                f"{m['ttft_mean']:10.2f}{m['throughput']:8.1f}{m['experts_per_step']:14.2f}")
        if base and p != baseline:
            line += "   " + " / ".join(f"{100 * (m[k] / base[k] - 1):+.1f}%" for k in ("norm_mean", "norm_p95", "norm_max"))
        lines.append(line)
    return "\n".join(lines)


def cost_from_json(data: dict) -> CostModel:
    """A cost model from JSON: a bare CostModel, a `bench cache` result (its calibrated model), or a
    `bench serve` result (least squares on its measured engine steps; no offloading terms)."""
    if not isinstance(data, dict):
        raise SimError(f"not a cost model, a `bench cache` or a `bench serve` JSON (a {type(data).__name__}, not an object)")
    if "engine_steps" in data:
        layers = data["workload"]["num_layers"]
        return calibrate(data["engine_steps"], layers, slice_bytes=1, bandwidth=1e18)
    data = data.get("measured", {}).get("cost_model", data)
    try:
        return CostModel(**data)
    except TypeError as err:
        raise SimError(f"not a cost model, a `bench cache` or a `bench serve` JSON ({err})") from None


# ------------------------------------------------------------------------------------ calibration


def calibrate(records: Sequence[dict], num_layers: int, slice_bytes: int, bandwidth: float) -> CostModel:
    """Least-squares fit of the compute terms to measured steps without loads.

    records: dicts with `duration` (s), `tokens`, `experts` (distinct), `rows` (LM-head rows) and
    `stall` (s waiting for loads; subtracted). Coefficients are clipped at 0.
    """
    import numpy as np

    if len(records) < 4:
        raise SimError(f"calibrate needs at least 4 measured steps, got {len(records)}")
    a = np.array([[num_layers * r["tokens"], num_layers * r["experts"], r["rows"], 1.0] for r in records])
    b = np.array([r["duration"] - r.get("stall", 0.0) for r in records])
    coef, *_ = np.linalg.lstsq(a, b, rcond=None)
    coef = np.clip(coef, 0.0, None)
    return CostModel(num_layers, slice_bytes, bandwidth, float(coef[0]), float(coef[1]), float(coef[2]),
                     float(coef[3]), source=f"least squares on {len(records)} measured steps")


def hit_ratio_table(steps: Sequence[Iterable[int]], num_layers: int, unit: str, capacities: Sequence[int],
                    policies: Sequence[str] = EVICTION_POLICIES, window: int | None = None, seed: int = 0) -> dict:
    """{policy: {k: hit ratio}} of a pure cache run (no prefetch) on the steps' reference string."""
    from pregate.eviction import simulate_cache

    refs = unit_references(steps, num_layers, unit)
    return {p: {k: simulate_cache(refs, k, p, window if p == "belady" else None, seed).hit_ratio for k in capacities}
            for p in policies}


def save_json(path: str | Path, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


# ------------------------------------------------------------------------------------ reports


def format_cache_table(result: dict) -> str:
    """The `pregate bench cache` result as plain-text tables."""
    ks = sorted({int(k) for row in result["hit_ratio"].values() for k in row})
    paper = result.get("paper_hit_ratio", {})
    lines = [f"hit ratio, whole experts of {result['num_experts']} ({result['num_steps']} steps, "
             f"{result['unique_experts_per_step']:.2f} experts/step; paper Table 4 in brackets)",
             "policy        " + "".join(f"k={k:<12d}" for k in ks)]
    for p, row in result["hit_ratio"].items():
        cells = []
        for k in ks:
            ref = paper.get(p, {}).get(k)
            cells.append(f"{100 * row[k]:5.1f}%" + (f" [{100 * ref:.0f}]" if ref is not None else "").ljust(7))
        lines.append(f"{p:<14s}" + "".join(c.ljust(14) for c in cells))
    for title, key in (("measured on this machine", "measured"), ("PROJECTION Llama-2-7B, A100-80GB", "projection_llama2_7b_a100")):
        block = result.get(key)
        if not block:
            continue
        lines.append(f"\nnormalized latency (s/token), Belady, {title}")
        lines.append("k   on-demand    prefetch     change   stall off/on (s)" + ("   sim error off/on" if key == "measured" else ""))
        for k in ks:
            off = next(r for r in block["runs"] if r["k"] == k and not r["prefetch"])
            on = next(r for r in block["runs"] if r["k"] == k and r["prefetch"])
            line = (f"{k:<3d} {off['normalized_latency']:<12.4g} {on['normalized_latency']:<12.4g} "
                    f"{100 * (on['normalized_latency'] / off['normalized_latency'] - 1):+6.1f}%   "
                    f"{off['stall_s']:.3g} / {on['stall_s']:.3g}")
            if key == "measured":
                line += f"   {100 * off['sim_error']:+.1f}% / {100 * on['sim_error']:+.1f}%"
            lines.append(line)
    return "\n".join(lines)


def plot_cache_bench(result: dict, out_dir: str | Path) -> list[Path]:
    """hit_ratio.png (policies vs k, paper dashed) and latency.png (on-demand vs prefetch per k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (p, row) in enumerate(result["hit_ratio"].items()):
        ks = sorted(int(k) for k in row)
        line, = ax.plot(ks, [100 * row[k] for k in ks], marker="o", label=f"{p} (ours)")
        if p in result.get("paper_hit_ratio", {}):
            ref = result["paper_hit_ratio"][p]
            ax.plot(ks, [100 * ref.get(k, float("nan")) for k in ks], ls="--", color=line.get_color(), label=f"{p} (paper)")
    ax.set_xlabel(f"cache capacity k (whole experts of {result['num_experts']})")
    ax.set_ylabel("hit ratio (%)")
    ax.set_title("expert cache hit ratio on the routed ShareGPT trace")
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    paths.append(out_dir / "hit_ratio.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    blocks = [(t, result[k]) for t, k in (("measured (this machine)", "measured"),
                                          ("projection: Llama-2-7B, A100", "projection_llama2_7b_a100")) if result.get(k)]
    if blocks:
        fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 4), squeeze=False)
        for ax, (title, block) in zip(axes[0], blocks):
            ks = sorted({r["k"] for r in block["runs"]})
            base = max(r["normalized_latency"] for r in block["runs"])
            for prefetch, label in ((False, "on-demand"), (True, "prefetch")):
                ys = [next(r["normalized_latency"] for r in block["runs"] if r["k"] == k and r["prefetch"] == prefetch) / base for k in ks]
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
