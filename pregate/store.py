"""Tiered expert store: at most k units of routed-expert weights in a fast tier, the rest in a slow tier.

Implements `pregate.moe.ExpertSource`: `forward_packed(..., expert_source=store)` calls
`begin_layer(layer, experts)` then `fetch(layer, e) -> (gate|up [2R, H], down transposed [R, H])`, the layout
MoEMLP computes with (the file keeps the checkpoint layout; a load packs it).

Tiers. CPU (what tests run): slow tier = the checkpoint's safetensors file, each slice read with real
I/O (`safe_open(...).get_slice(...)[e]`) into preallocated fast-tier buffers; an optional bandwidth cap
(bytes/s) sleeps after each read so a transfer lasts at least bytes / cap (emulates PCIe or NVMe, makes
runs repeatable). GPU (`device="cuda"`): slow tier = pinned host copies of every expert, fast tier =
GPU buffers, copies on their own CUDA stream, waited for with events (no host blocking; stall not timed).

Decisions (hits, evictions, prefetches, slot contents) come from `pregate.sim.Residency`, the same
object the simulator drives, over `pregate.eviction.ExpertCache` and its policies. Unit "expert": one
cache reference per (step, expert); a missed expert's slices are loaded layer by layer. Unit "slice":
one reference per (step, layer, expert). Prefetching (config.prefetch): a loader thread loads, while
layer i computes, what layers i+1..i+depth need (known from pre-gating: a step uses the same experts in
every layer) and, at the end of a step, the next planned step's first layers; prefetches never evict a
unit needed sooner than the one they bring (`ExpertCache.prefetch`) nor one the running layer reads.
Without prefetching every load happens when `fetch` asks for it. A step needing more units than fit
streams the excess through a staging buffer (counted as bypass). Results are bit-identical to the
model's own weights: the buffers hold exact copies of the same padded [R, H] rows.

Every wait has a timeout (config.timeout_s): a failure raises StoreError instead of hanging.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pregate.checkpoint import ROUTER_WEIGHTS, WEIGHTS_FILE
from pregate.errors import PregateError
from pregate.eviction import POLICY_NAMES
from pregate.moe import ExpertWeights
from pregate.sim import UNITS, Residency, SimError

if TYPE_CHECKING:
    from pregate.scheduler import SchedulerConfig
    from pregate.workload import WorkloadRequest

_KEYS = ("w_gate", "w_up", "w_down")


class StoreError(PregateError):
    """Bad store configuration, a missing or damaged checkpoint, or a failed / timed-out transfer."""


@dataclass
class StoreConfig:
    """Capacity (exactly one of `capacity` units or `capacity_bytes`), unit, policy and transfers."""

    capacity: int | None = None
    capacity_bytes: int | None = None
    unit: str = "expert"  # "expert": a whole expert (all layers) is one unit; "slice": one (layer, expert)
    policy: str = "belady"
    window: int | None = None  # Belady lookahead in references; None = everything planned
    prefetch: bool = False
    depth: int = 1  # layers loaded ahead when prefetching
    bandwidth: float | None = None  # bytes/s cap on the slow tier (CPU); None = as fast as the disk
    device: str = "cpu"
    timeout_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.capacity is None) == (self.capacity_bytes is None):
            raise StoreError("give exactly one of StoreConfig.capacity (units) or capacity_bytes")
        if self.capacity is not None and (isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 1):
            raise StoreError(f"StoreConfig.capacity={self.capacity!r} must be an int >= 1 (units resident at once)")
        if self.capacity_bytes is not None and (not isinstance(self.capacity_bytes, int) or self.capacity_bytes < 1):
            raise StoreError(f"StoreConfig.capacity_bytes={self.capacity_bytes!r} must be an int >= 1")
        if self.unit not in UNITS:
            raise StoreError(f"StoreConfig.unit={self.unit!r} is unknown; use one of {', '.join(UNITS)}")
        if self.policy not in POLICY_NAMES:
            raise StoreError(f"StoreConfig.policy={self.policy!r} is unknown; choose one of {', '.join(POLICY_NAMES)}")
        if self.bandwidth is not None and not (isinstance(self.bandwidth, (int, float)) and 0 < self.bandwidth < float("inf")):
            raise StoreError(f"StoreConfig.bandwidth={self.bandwidth!r} must be a finite number of bytes/s > 0, or None (no cap)")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise StoreError(f"StoreConfig.depth={self.depth!r} must be an int >= 1 (layers loaded ahead)")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise StoreError(f"StoreConfig.timeout_s={self.timeout_s!r} must be > 0 seconds")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 0):
            raise StoreError(f"StoreConfig.window={self.window!r} must be None or an int >= 0")


@dataclass
class StoreStats:
    """Counters of a store's life. stall_s: time `fetch` spent waiting for or doing loads."""

    hits: int
    misses: int
    prefetches: int
    evictions: int
    bypass: int
    slice_loads: int
    bytes_loaded: int
    stall_s: float
    load_s: float

    @property
    def hit_ratio(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "hit_ratio": self.hit_ratio}


def checkpoint_file(path: str | Path) -> Path:
    """The safetensors file of a checkpoint directory (or the file itself); clear error if missing."""
    path = Path(path)
    f = path / WEIGHTS_FILE if path.is_dir() else path
    if not f.is_file():
        raise StoreError(f"{f} does not exist: the store needs the MoE checkpoint's {WEIGHTS_FILE}")
    return f


class ExpertStore:
    """The tiered store over one checkpoint. Use as a context manager (or call close())."""

    def __init__(self, checkpoint: str | Path, config: StoreConfig) -> None:
        from safetensors import SafetensorError, safe_open

        self.config = config
        self.path = checkpoint_file(checkpoint)
        try:
            self._file = safe_open(str(self.path), framework="pt")
            keys = set(self._file.keys())
        except (SafetensorError, OSError, ValueError) as err:
            raise StoreError(f"{self.path} cannot be read ({err}): truncated or damaged checkpoint") from err
        self.num_layers = sum(1 for k in keys if k.endswith(".mlp.w_gate"))
        if self.num_layers == 0 or any(f"layers.{l}.mlp.{n}" not in keys for l in range(self.num_layers) for n in _KEYS):
            raise StoreError(f"{self.path} holds no stacked routed experts (layers.N.mlp.w_gate/w_up/w_down)")
        e, r, h = self._file.get_slice("layers.0.mlp.w_gate").get_shape()
        self.num_experts, self.width, self.hidden = e, r, h
        self.dtype = dtype = self._file.get_slice("layers.0.mlp.w_gate")[0:1].dtype
        self.slice_bytes = 3 * r * h * torch.empty(0, dtype=dtype).element_size()
        unit_bytes = self.slice_bytes * (self.num_layers if config.unit == "expert" else 1)
        units = e if config.unit == "expert" else e * self.num_layers
        k = config.capacity if config.capacity is not None else config.capacity_bytes // unit_bytes
        if k < 1:
            raise StoreError(f"capacity_bytes={config.capacity_bytes} holds no {config.unit} ({unit_bytes} bytes each); raise it")
        if k > units:
            raise StoreError(f"capacity={k} exceeds the {units} {config.unit} units of this model; use 1..{units}")
        self.capacity = k
        self._fd = os.open(self.path, os.O_RDONLY)
        self._offsets = self._expert_offsets(dtype)
        try:
            self.res = Residency(self.num_layers, config.unit, k, config.policy, config.window, config.prefetch, config.depth, config.seed)
        except SimError as err:
            raise StoreError(str(err)) from err
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise StoreError("StoreConfig.device='cuda' but no CUDA device is available; use device='cpu'")
        n = self.res.num_slots
        # true width of every expert: what the fused layout packs (see MoEMLP), from the checkpoint itself
        self.widths = [(self._file.get_tensor(f"layers.{l}.mlp.expert_index") >= 0).sum(1).tolist()
                       for l in range(self.num_layers)]
        # the fast tier holds experts as the model computes them: gate|up [2R, H] and down transposed [R, H]
        self._gate_up = torch.zeros(n, 2 * r, h, dtype=dtype, device=self.device)
        self._down_t = torch.zeros(n, r, h, dtype=dtype, device=self.device)
        self._stage = (torch.zeros(2 * r, h, dtype=dtype, device=self.device),
                       torch.zeros(r, h, dtype=dtype, device=self.device))  # a slice that is not resident
        self._raw = (torch.zeros(r, h, dtype=dtype, device=self.device), torch.zeros(r, h, dtype=dtype, device=self.device),
                     torch.zeros(h, r, dtype=dtype, device=self.device))  # one slice as the file holds it
        self._cv = threading.Condition()
        self._io = threading.Lock()  # one link: transfers never overlap each other
        self._plan: dict[int, int | None] = {}
        self._layer = -1
        self._error: BaseException | None = None
        self._stop = False
        self._loads = self._bytes = 0
        self._stall = self._load_s = 0.0
        self._host: list[tuple[torch.Tensor, ...]] | None = None
        self._thread: threading.Thread | None = None
        if self.device.type == "cuda":
            self._init_cuda()
        elif config.prefetch:
            self._thread = threading.Thread(target=self._loader, name="pregate-expert-loader", daemon=True)
            self._thread.start()

    def _expert_offsets(self, dtype: torch.dtype) -> dict[tuple[int, str], tuple[int, int]]:
        """(layer, key) -> (file offset of expert 0's rows, bytes per expert), from the safetensors header."""
        with open(self.path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        size = os.path.getsize(self.path)
        out = {}
        for l in range(self.num_layers):
            for name in _KEYS:
                start, end = header[f"layers.{l}.mlp.{name}"]["data_offsets"]
                if 8 + n + end > size:
                    raise StoreError(f"{self.path} is truncated ({size} bytes, layer {l} needs {8 + n + end}); rewrite the checkpoint")
                out[(l, name)] = (8 + n + start, (end - start) // self.num_experts)
        return out

    # -- protocol
    def plan(self, steps: Iterable[Iterable[int]]) -> None:
        """Tell the store the expert sets of steps known ahead (Belady's future, next-step prefetch)."""
        with self._cv:
            self.res.plan(steps)
            self._cv.notify_all()

    def begin_layer(self, layer: int, experts: list[int]) -> None:
        self._check_error()
        with self._cv:
            try:
                self._plan = self.res.begin_layer(layer, experts)
            except SimError as err:
                raise StoreError(str(err)) from err
            self._layer = layer
            self._cv.notify_all()
        if self._host is not None:
            self._cuda_begin()

    def fetch(self, layer: int, expert: int) -> ExpertWeights:
        if layer != self._layer or expert not in self._plan:
            raise StoreError(f"fetch({layer}, {expert}) was not announced: call begin_layer({layer}, [...{expert}...]) first")
        key = (layer, expert)
        p = self._plan[expert]
        t0 = time.perf_counter()
        deadline = t0 + self.config.timeout_s
        try:
            while p is not None:
                with self._cv:
                    self._check_error()
                    res = self.res
                    if res.content[p] == key and p not in res.inflight:
                        if self._host is not None:
                            torch.cuda.current_stream(self.device).wait_event(self._events[p])
                        return self._gate_up[p], self._down_t[p]
                    want = res.want.get(p)
                    if p not in res.inflight and want is not None and want[:2] == key:
                        res.start_load(p, *key)  # on demand (or ahead of the loader)
                    elif p in res.inflight:
                        if not self._cv.wait(timeout=max(0.0, deadline - time.perf_counter())):
                            raise StoreError(f"timed out after {self.config.timeout_s}s waiting for expert {expert} layer {layer}")
                        continue
                    else:
                        break  # the slot went to another unit: stream this slice
                self._transfer_into(p, key)
            self._copy(key, self._stage)  # not resident: staging buffer
            return self._stage
        finally:
            self._stall += time.perf_counter() - t0

    # -- transfers
    def _copy(self, key: tuple[int, int], dst: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Read one slice from the slow tier into dst (gate|up, down transposed), honouring the bandwidth cap."""
        layer, e = key
        with self._io:
            t0 = time.perf_counter()
            if self._host is not None:
                for d, s in zip(self._raw, self._host[layer]):
                    d.copy_(s[e], non_blocking=True)
            else:  # real I/O straight into the buffer (get_slice + copy_ was 100x slower here)
                for d, name in zip(self._raw, _KEYS):
                    base, per = self._offsets[(layer, name)]
                    got = os.preadv(self._fd, [d.view(-1).view(torch.uint8).numpy()], base + e * per)
                    if got != per:
                        raise StoreError(f"short read from {self.path} (layer {layer}, expert {e}): truncated checkpoint?")
            gate, up, down = self._raw
            w = self.widths[layer][e]
            dst[0][:w].copy_(gate[:w])
            dst[0][w : 2 * w].copy_(up[:w])
            dst[1].copy_(down.T)
            if self.config.bandwidth and self._host is None:
                time.sleep(max(0.0, self.slice_bytes / self.config.bandwidth - (time.perf_counter() - t0)))
            self._load_s += time.perf_counter() - t0
            self._loads += 1
            self._bytes += self.slice_bytes

    def _transfer_into(self, p: int, key: tuple[int, int]) -> None:
        """Load `key` into slot p (already marked in flight); always clears the in-flight mark."""
        try:
            if self._host is not None:
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(self._released)
                    self._copy(key, (self._gate_up[p], self._down_t[p]))
                    self._events[p].record(self._stream)
            else:
                self._copy(key, (self._gate_up[p], self._down_t[p]))
        except BaseException as err:
            with self._cv:
                self.res.inflight.pop(p, None)
                self._error = err
                self._cv.notify_all()
            raise StoreError(f"loading expert {key[1]} layer {key[0]} from {self.path} failed: {err}") from err
        with self._cv:
            self.res.finish_load(p)
            self._cv.notify_all()

    def _loader(self) -> None:
        """Background thread (CPU prefetch): runs the most urgent startable load, one at a time."""
        while True:
            with self._cv:
                job = None
                while not self._stop and (job := self.res.next_load()) is None:
                    self._cv.wait(0.05)
                if self._stop:
                    return
                p, layer, e, _ = job
                self.res.start_load(p, layer, e)
            try:
                self._transfer_into(p, (layer, e))
            except StoreError:
                return  # recorded in self._error; fetch raises it

    # -- GPU path (guarded; exercised by the `gpu` test only)
    def _init_cuda(self) -> None:
        self._stream = torch.cuda.Stream(self.device)
        self._events = [torch.cuda.Event() for _ in range(self.res.num_slots)]
        self._released = torch.cuda.Event()
        self._host = [tuple(self._file.get_tensor(f"layers.{l}.mlp.{n}").pin_memory() for n in _KEYS)
                      for l in range(self.num_layers)]

    def _cuda_begin(self) -> None:
        # copies issued from now on wait for the compute queued so far (earlier layers read those slots)
        self._released.record(torch.cuda.current_stream(self.device))
        while True:
            with self._cv:
                job = self.res.next_load()
                if job is None:
                    return
                self.res.start_load(job[0], job[1], job[2])
            self._transfer_into(job[0], (job[1], job[2]))

    # -- life
    def _check_error(self) -> None:
        if self._error is not None:
            raise StoreError(f"the expert loader failed: {self._error}") from self._error

    @property
    def stats(self) -> StoreStats:
        r = self.res.stats
        return StoreStats(r.hits, r.misses, r.prefetches, r.evictions, r.bypass, self._loads, self._bytes, self._stall, self._load_s)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.config.timeout_s)
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ExpertStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------- measured replay


@dataclass
class ReplayRequest:
    """A routed request with its token ids: the prompt and the reference response (teacher forcing)."""

    trace: "WorkloadRequest"
    prompt_ids: list[int]
    output_ids: list[int]


def replay(model, requests: list[ReplayRequest], scheduler: "SchedulerConfig", store: ExpertStore | None = None) -> dict:
    """Serve `requests` (all queued at t=0) with the real Scheduler and the MoE on this machine.

    Each step runs `forward_packed` on its items (prefill chunks and decode tokens, each request with its
    own KV cache); the token fed after a prefill is the reference response (teacher forcing), so the
    step sequence is the one `pregate.sim.scheduled_steps` predicts. Returns the metrics summary, one
    record per step (duration, tokens, distinct experts, LM-head rows, stall) and `tokens`: the
    argmax token at every item's last position (what greedy decoding would emit).
    """
    from pregate.metrics import MetricsRecorder
    from pregate.moe import Routing, Segment
    from pregate.scheduler import Request, Scheduler
    from pregate.sim import step_result

    by_id = {r.trace.request_id: r for r in requests}
    traces = {rid: r.trace for rid, r in by_id.items()}
    sched = Scheduler(scheduler)
    rec = MetricsRecorder()
    start = time.perf_counter()
    for r in requests:
        sched.add_request(Request(r.trace.request_id, list(r.trace.prompt_experts), r.trace.output_len))
        rec.on_arrival(r.trace.request_id, at=start)
    caches: dict = {}
    steps, tokens = [], []
    while sched.has_work():
        out = sched.schedule()
        ids, experts, segs, rows = [], [], [], []
        for it in out.items:
            r = by_id[it.request_id]
            if it.request_id not in caches:
                caches[it.request_id] = model.new_cache(len(r.prompt_ids) + len(r.output_ids))
            if it.kind == "prefill":
                ids += r.prompt_ids[it.start: it.start + it.num_tokens]
            else:
                ids.append(r.output_ids[it.start - len(r.prompt_ids)])
            experts += it.experts
            segs.append(Segment(it.num_tokens, caches[it.request_id]))
            rows.append(len(ids) - 1)
        stall0 = store.stats.stall_s if store is not None else 0.0
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model.forward_packed(torch.tensor(ids), segs, Routing.top1(torch.tensor(experts)),
                                          logits_at=torch.tensor(rows), expert_source=store)
        t1 = time.perf_counter()
        tokens.append(logits.argmax(-1).tolist())
        steps.append({"duration": t1 - t0, "tokens": out.num_tokens, "experts": out.unique_experts,
                      "rows": len(rows), "stall": (store.stats.stall_s if store is not None else 0.0) - stall0})
        result = step_result(out, sched, traces)
        for rid in result.sampled:
            rec.on_token(rid, at=t1)
        for r in sched.update(out, result):
            rec.on_finish(r.request_id, at=t1)
            caches.pop(r.request_id, None)
    return {"summary": rec.summary(), "steps": steps, "tokens": tokens}


def route_sharegpt(model_dir: str | Path, n: int, max_prompt: int, max_output: int, seed: int = 0,
                   router_dir: str | Path | None = None, model=None) -> tuple[list[ReplayRequest], str]:
    """n ShareGPT first turns (prompt + reference response), routed token by token.

    Routing: the trained pre-gating router of `router_dir` (or of `model_dir` when it holds one) via
    `pregate.router.load_router`; otherwise the oracle routing the router is trained to imitate (each
    token to the expert whose channels carry most of its activation mass, summed over layers; causal
    like the router). Returns the requests and a sentence saying which routing was used.
    """
    import random

    from transformers import AutoTokenizer

    from pregate.moe import load_moe
    from pregate.workload import WorkloadRequest, sharegpt_conversations

    model_dir = Path(model_dir)
    model = model if model is not None else load_moe(model_dir)  # first: it refuses a wrong directory clearly
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    router, how = None, "oracle routing (no trained router found: argmax over experts of the activation mass summed over layers)"
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
                    raise StoreError("a layer-wise router has no pre-gated experts; use a pre-gating router")
                experts = routing.expert_ids[:, 0].tolist()
            else:
                experts = model.expert_scores(ids).sum(0).argmax(-1).tolist()
        rid = f"sharegpt-{len(out)}"
        trace = WorkloadRequest(rid, prompt, len(o_ids), 0.0, len(p_ids), experts[: len(p_ids)], experts[len(p_ids):])
        out.append(ReplayRequest(trace, p_ids, o_ids))
        if len(out) == n:
            return out, how
    raise StoreError(f"only {len(out)} ShareGPT prompts have <= {max_prompt} tokens; lower n or raise max_prompt")


# ----------------------------------------------------------------------------------------- bench cache

PAPER_TABLE4 = {"random": {2: 0.34, 3: 0.50, 4: 0.68, 5: 0.83}, "lru": {2: 0.34, 3: 0.52, 4: 0.67, 5: 0.83},
                "belady": {2: 0.44, 3: 0.62, 4: 0.77, 5: 0.88}}


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
    token_budget: int = 64
    max_running: int = 16
    policy: str = "expert-aware"
    router: str | None = None
    measure: bool = True  # run the model (otherwise only the cache simulation)

    def __post_init__(self) -> None:
        for name in ("requests", "max_prompt", "max_output", "token_budget", "max_running", "depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise StoreError(f"CacheBenchConfig.{name}={v!r} must be an int >= 1")
        if not self.capacities or any(not isinstance(k, int) or k < 1 for k in self.capacities):
            raise StoreError(f"CacheBenchConfig.capacities={self.capacities!r} must be ints >= 1")
        if not self.bandwidth > 0:
            raise StoreError(f"CacheBenchConfig.bandwidth={self.bandwidth!r} must be > 0 bytes/s")


def bench_cache(model_dir: str | Path, cfg: CacheBenchConfig, out_dir: str | Path) -> dict:
    """Hit ratios of every policy at each k (whole experts) on one routed ShareGPT trace, then measured
    normalized latency with the store (Belady) with prefetching off and on (tokens checked against an
    all-resident run), the simulator calibrated on the first on-demand run and its error on the others,
    and the Llama-2-7B / A100 projection. Writes the routed trace,
    the reference string and PNG plots into out_dir; returns the JSON-able result."""
    from pregate import sim
    from pregate.moe import load_moe
    from pregate.scheduler import SchedulerConfig
    from pregate.workload import save_trace

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_moe(model_dir)
    L, E = model.config.num_layers, model.num_experts
    if max(cfg.capacities) > E:
        raise StoreError(f"capacities {cfg.capacities} exceed the model's {E} experts")
    reqs, how = route_sharegpt(model_dir, cfg.requests, cfg.max_prompt, cfg.max_output, cfg.seed, cfg.router, model)
    traces = [r.trace for r in reqs]
    save_trace(out_dir / "routed_trace.jsonl", traces)
    scfg = SchedulerConfig(policy=cfg.policy, token_budget=cfg.token_budget, max_running=cfg.max_running)
    steps = sim.scheduled_steps(traces, scfg)
    sim.write_references(out_dir / "references.txt", steps, L, E, "expert")
    ks = list(cfg.capacities)
    table = sim.hit_ratio_table(steps, L, "expert", ks)
    refs_per_step = sum(len(s) for s in steps) / len(steps)
    window = max(1, round(refs_per_step))
    table[f"belady-w{window}"] = sim.hit_ratio_table(steps, L, "expert", ks, ("belady",), window)["belady"]
    with ExpertStore(model_dir, StoreConfig(capacity=1)) as probe:
        slice_bytes = probe.slice_bytes
    result: dict = {
        "model": str(model_dir), "routing": how, "config": asdict(cfg), "num_layers": L, "num_experts": E,
        "slice_bytes": slice_bytes, "expert_bytes": slice_bytes * L, "num_steps": len(steps),
        "unique_experts_per_step": refs_per_step, "belady_window_refs": window,
        "hit_ratio": table, "paper_hit_ratio": PAPER_TABLE4,
        "demand_bytes": {p: {k: round((1 - h) * len(sim.unit_references(steps, L, "expert"))) * slice_bytes * L
                             for k, h in row.items()} for p, row in table.items()},
    }
    if cfg.measure:
        # calibration: the first on-demand run (compute terms by least squares on its steps with their
        # stall removed; link speed = bytes / transfer time); every other run is a prediction
        base = replay(model, reqs, scfg)
        runs, link, calib = [], None, None
        for k in ks:
            for prefetch in (False, True):
                scfg_store = StoreConfig(capacity=k, policy="belady", prefetch=prefetch, depth=cfg.depth, bandwidth=cfg.bandwidth)
                with ExpertStore(model_dir, scfg_store) as store:
                    store.plan(steps)
                    got = replay(model, reqs, scfg, store)
                    st = store.stats
                if link is None and st.load_s > 0:
                    link, calib = st.bytes_loaded / st.load_s, got["steps"]
                nl = got["summary"]["normalized_latency"]
                runs.append({"k": k, "prefetch": prefetch, "normalized_latency": nl["mean"], "normalized_latency_p95": nl["p95"],
                             "stall_s": st.stall_s, "bytes_loaded": st.bytes_loaded, "hit_ratio": st.hit_ratio,
                             "load_s": st.load_s, "tokens_identical": got["tokens"] == base["tokens"]})
        cost = sim.calibrate(calib or base["steps"], L, slice_bytes, link or cfg.bandwidth)
        pred_base = sim.simulate(traces, cost, sim.SimConfig(capacity=E, scheduler=scfg)).summary["normalized_latency"]["mean"]
        for r in runs:
            pred = sim.simulate(traces, cost, sim.SimConfig(capacity=r["k"], prefetch=r["prefetch"], depth=cfg.depth, scheduler=scfg))
            pnl = pred.summary["normalized_latency"]["mean"]
            r.update(sim_normalized_latency=pnl, sim_error=(pnl - r["normalized_latency"]) / r["normalized_latency"], sim_stall_s=pred.stall_s)
        result["measured"] = {"all_resident_normalized_latency": base["summary"]["normalized_latency"]["mean"],
                              "sim_all_resident": pred_base, "cost_model": cost.to_dict(), "runs": runs,
                              "calibration": "first on-demand run: compute terms by least squares on its steps "
                                             "(stall removed), bandwidth = bytes / transfer time; other runs are predictions"}
    proj_cost = sim.llama2_7b_a100(E)
    proj = []
    for k in ks:
        for prefetch in (False, True):
            r = sim.simulate(traces, proj_cost, sim.SimConfig(capacity=k, prefetch=prefetch, depth=cfg.depth, scheduler=scfg))
            proj.append({"k": k, "prefetch": prefetch, "normalized_latency": r.summary["normalized_latency"]["mean"],
                         "hit_ratio": r.cache.hit_ratio, "stall_s": r.stall_s})
    result["projection_llama2_7b_a100"] = {"cost_model": proj_cost.to_dict(), "runs": proj}
    sim.plot_cache_bench(result, out_dir)
    return result
