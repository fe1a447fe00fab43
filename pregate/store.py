"""Tiered expert store: at most k units of routed-expert weights in a fast tier, the rest in a slow tier.

Implements `pregate.moe.ExpertSource`: `forward_packed(..., expert_source=store)` calls
`begin_layer(layer, experts)` then `fetch(layer, e) -> (gate|up [2R, H], down transposed [R, H])`, the layout
MoEMLP computes with (the file keeps the checkpoint layout; a load packs it).

Tiers. CPU (what tests run): slow tier = the checkpoint's safetensors file, each slice read with real
I/O (`safe_open(...).get_slice(...)[e]`) into preallocated fast-tier buffers; an optional bandwidth cap
(bytes/s) sleeps after each read so a transfer lasts at least bytes / cap (emulates PCIe or NVMe, makes
runs repeatable). GPU (`device="cuda"`): slow tier = pinned host copies of every expert, fast tier =
GPU buffers, copies on their own CUDA stream, waited for with events (no host blocking; stall not timed).

Decisions (hits, evictions, prefetches, slot contents) come from `pregate.eviction.Residency`, the same
object the simulator drives, over `pregate.eviction.ExpertCache` and its policies. Unit "expert": one
cache reference per (step, expert); a missed expert's slices are loaded layer by layer. Unit "slice":
one reference per (step, layer, expert). Prefetching (config.prefetch): a loader thread loads, while
layer i computes, what layers i+1..i+depth need (known from pre-gating: a step uses the same experts in
every layer) and, at the end of a step, the next planned step's first layers; prefetches never evict a
unit needed sooner than the one they bring (`ExpertCache.prefetch`) nor one the running layer reads.
Without prefetching every load happens when `fetch` asks for it. A step needing more units than fit
streams the excess (counted as bypass): with prefetching and whole-expert units through per-expert rings
of depth + 1 slices that the loader fills ahead like any prefetch (`Residency`), else through one
staging buffer when `fetch` asks. Results are bit-identical to the
model's own weights: the buffers hold exact copies of the same padded [R, H] rows.

Every wait has a timeout (config.timeout_s): a failure raises StoreError instead of hanging.

Owns the store, its configuration and its counters (`ExpertStore`, `StoreConfig`, `StoreStats`).
Runtime code: imports `pregate.eviction`, `pregate.moe` and `pregate.errors`, never the simulator or
the benchmarks (the cache benchmark that drives it is `pregate.cache_bench`).
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

import torch

from pregate.checkpoint import WEIGHTS_FILE
from pregate.errors import PregateError, check_int
from pregate.eviction import EVICTION_POLICIES, UNITS, CacheError, Residency, ResidencyStats, max_streams
from pregate.moe import ExpertWeights

_KEYS = ("w_gate", "w_up", "w_down")


def _numpy(t: torch.Tensor):
    """A numpy view of a CPU tensor's bytes, as integers of its element width (numpy has no bfloat16)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.int8}[t.element_size()]
    return t.view(ints).numpy()


def _transposer():
    """(src [R, C], dst [C, R]) -> dst = src.T for numpy arrays, on the calling thread: for 2-byte ones
    (bfloat16, float16) the native library's tiled loop (`native/transpose.c`) where it can be built,
    else numpy's strided copy (the same bytes). Here numpy takes 0.35 ms for a bfloat16 [960, 720] and
    the loop 0.09; for 4-byte elements numpy's copy is as fast as the loop (0.09 ms for the demo's
    float32 [576, 600]), so it keeps them.

    Both run on the calling thread only, not torch's: a torch copy this size runs on torch's OpenMP pool,
    and issued from the loader thread while the compute thread's own OpenMP team runs it makes a second
    team on the same cores. On 2 cores (`bench cache`, 2026-12-01) prefetching went from
    +9/+26/+24/+45 % against on demand at k = 2..5 to +8/+10/+9/-4 % when numpy's copies replaced
    torch's. The loader's own time still takes a core from the compute, so it is kept short."""
    import numpy as np

    from pregate import native

    try:
        kernel = native.library().pg_transpose16
    except PregateError:
        kernel = None

    def transpose(src, dst) -> None:
        assert src.flags.c_contiguous and dst.flags.c_contiguous and dst.shape == src.shape[::-1]
        if kernel is not None and src.itemsize == 2:
            kernel(src.ctypes.data, dst.ctypes.data, *src.shape)
        else:
            np.copyto(dst, src.T)

    return transpose


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
        if self.capacity is not None:
            check_int("StoreConfig.capacity", self.capacity, error=StoreError, why="units resident at once")
        if self.capacity_bytes is not None and (
            not isinstance(self.capacity_bytes, int) or self.capacity_bytes < 1
        ):
            raise StoreError(f"StoreConfig.capacity_bytes={self.capacity_bytes!r} must be an int >= 1")
        if self.unit not in UNITS:
            raise StoreError(f"StoreConfig.unit={self.unit!r} is unknown; use one of {', '.join(UNITS)}")
        if self.policy not in EVICTION_POLICIES:
            raise StoreError(
                f"StoreConfig.policy={self.policy!r} is unknown; choose one of {', '.join(EVICTION_POLICIES)}"
            )
        if self.bandwidth is not None and not (
            isinstance(self.bandwidth, (int, float)) and 0 < self.bandwidth < float("inf")
        ):
            raise StoreError(
                f"StoreConfig.bandwidth={self.bandwidth!r} must be a finite number of bytes/s > 0, or None "
                "(no cap)"
            )
        check_int("StoreConfig.depth", self.depth, error=StoreError, why="layers loaded ahead")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise StoreError(f"StoreConfig.timeout_s={self.timeout_s!r} must be > 0 seconds")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 0):
            raise StoreError(f"StoreConfig.window={self.window!r} must be None or an int >= 0")


@dataclass
class StoreStats(ResidencyStats):
    """Counters of a store's life: the residency's (hits, misses, hit ratio...) plus its transfers.
    stall_s: time `fetch` spent waiting for or doing loads; load_s: time the link spent on them; copy_s:
    the part of load_s the loads themselves took, the emulated link's cap (its sleep) left out: on the CPU
    tier the cores' time that a load takes from the compute."""

    slice_loads: int = 0
    bytes_loaded: int = 0
    stall_s: float = 0.0
    load_s: float = 0.0
    copy_s: float = 0.0

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
        if self.num_layers == 0 or any(
            f"layers.{layer}.mlp.{n}" not in keys for layer in range(self.num_layers) for n in _KEYS
        ):
            raise StoreError(f"{self.path} holds no stacked routed experts (layers.N.mlp.w_gate/w_up/w_down)")
        e, r, h = self._file.get_slice("layers.0.mlp.w_gate").get_shape()
        self.num_experts, self.width, self.hidden = e, r, h
        self.dtype = dtype = self._file.get_slice("layers.0.mlp.w_gate")[0:1].dtype
        self.slice_bytes = 3 * r * h * torch.empty(0, dtype=dtype).element_size()
        unit_bytes = self.slice_bytes * (self.num_layers if config.unit == "expert" else 1)
        units = e if config.unit == "expert" else e * self.num_layers
        k = config.capacity if config.capacity is not None else config.capacity_bytes // unit_bytes
        if k < 1:
            raise StoreError(
                f"capacity_bytes={config.capacity_bytes} holds no {config.unit} ({unit_bytes} bytes each); "
                "raise it"
            )
        if k > units:
            raise StoreError(
                f"capacity={k} exceeds the {units} {config.unit} units of this model; use 1..{units}"
            )
        self.capacity = k
        self._fd = os.open(self.path, os.O_RDONLY)
        self._offsets = self._expert_offsets(dtype)
        try:
            self.res = Residency(
                self.num_layers,
                config.unit,
                k,
                config.policy,
                config.window,
                config.prefetch,
                config.depth,
                config.seed,
                streams=max_streams(e),
            )
        except CacheError as err:
            raise StoreError(str(err)) from err
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise StoreError("StoreConfig.device='cuda' but no CUDA device is available; use device='cpu'")
        n = self.res.num_slots
        # true width of every expert: what the fused layout packs (see MoEMLP), from the checkpoint itself
        self.widths = [
            (self._file.get_tensor(f"layers.{layer}.mlp.expert_index") >= 0).sum(1).tolist()
            for layer in range(self.num_layers)
        ]
        # the fast tier holds experts as the model computes them: gate|up [2R, H] and down transposed [R, H]
        self._gate_up = torch.zeros(n, 2 * r, h, dtype=dtype, device=self.device)
        self._down_t = torch.zeros(n, r, h, dtype=dtype, device=self.device)
        self._stage = (
            torch.zeros(2 * r, h, dtype=dtype, device=self.device),
            torch.zeros(r, h, dtype=dtype, device=self.device),
        )  # a slice that is not resident
        self._raw = (
            torch.zeros(r, h, dtype=dtype, device=self.device),
            torch.zeros(r, h, dtype=dtype, device=self.device),
            torch.zeros(h, r, dtype=dtype, device=self.device),
        )  # one slice as the file holds it
        self._transpose = _transposer()
        self._cv = threading.Condition()
        self._io = threading.Lock()  # one link: transfers never overlap each other
        self._plan: dict[int, int | None] = {}
        self._layer = -1
        self._error: BaseException | None = None
        self._stop = False
        self._loads = self._bytes = 0
        self._stall = self._load_s = self._copy_s = 0.0
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
        for i in range(self.num_layers):
            for name in _KEYS:
                start, end = header[f"layers.{i}.mlp.{name}"]["data_offsets"]
                if 8 + n + end > size:
                    raise StoreError(
                        f"{self.path} is truncated ({size} bytes, layer {i} needs {8 + n + end}); rewrite "
                        "the checkpoint"
                    )
                out[(i, name)] = (8 + n + start, (end - start) // self.num_experts)
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
            except CacheError as err:
                raise StoreError(str(err)) from err
            self._layer = layer
            self._cv.notify_all()
        if self._host is not None:
            self._cuda_begin()

    def fetch(self, layer: int, expert: int) -> ExpertWeights:
        if layer != self._layer or expert not in self._plan:
            raise StoreError(
                f"fetch({layer}, {expert}) was not announced: call begin_layer({layer}, [...{expert}...]) "
                "first"
            )
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
                            raise StoreError(
                                f"timed out after {self.config.timeout_s}s waiting for expert {expert} "
                                f"layer {layer}"
                            )
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
        """Read one slice from the slow tier into dst (gate|up, down transposed), honouring the bandwidth
        cap."""
        layer, e = key
        with self._io:
            t0 = time.perf_counter()
            if self._host is None:
                self._read_cpu(key, dst)
            else:
                for d, s in zip(self._raw, self._host[layer]):
                    d.copy_(s[e], non_blocking=True)
                gate, up, down = self._raw
                w = self.widths[layer][e]
                dst[0][:w].copy_(gate[:w])
                dst[0][w : 2 * w].copy_(up[:w])
                dst[1].copy_(down.T)
            self._copy_s += time.perf_counter() - t0
            if self.config.bandwidth and self._host is None:
                time.sleep(max(0.0, self.slice_bytes / self.config.bandwidth - (time.perf_counter() - t0)))
            self._load_s += time.perf_counter() - t0
            self._loads += 1
            self._bytes += self.slice_bytes

    def _read_cpu(self, key: tuple[int, int], dst: tuple[torch.Tensor, torch.Tensor]) -> None:
        """One slice from the file into dst's layout, often on the loader thread, so with no torch ops
        (see _transposer): gate's and up's true rows read straight into place (the rows past the width
        are never read), down read as the file holds it and transposed. Real I/O into the buffers
        (get_slice + copy_ was 100x slower here)."""
        layer, e = key
        w = self.widths[layer][e]
        gate_up, down_t, down = _numpy(dst[0]), _numpy(dst[1]), _numpy(self._raw[2])
        for buf, name in ((gate_up[:w], "w_gate"), (gate_up[w : 2 * w], "w_up"), (down, "w_down")):
            base, per = self._offsets[(layer, name)]
            if os.preadv(self._fd, [buf], base + e * per) != buf.nbytes:
                raise StoreError(
                    f"short read from {self.path} (layer {layer}, expert {e}): truncated checkpoint?"
                )
        self._transpose(down, down_t)

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
            raise StoreError(
                f"loading expert {key[1]} layer {key[0]} from {self.path} failed: {err}"
            ) from err
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
        self._host = [
            tuple(self._file.get_tensor(f"layers.{layer}.mlp.{n}").pin_memory() for n in _KEYS)
            for layer in range(self.num_layers)
        ]

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
    def buffer_bytes(self) -> int:
        """Bytes of routed-expert weights held in memory: the k resident slots, the stream rings (when
        prefetching) and the staging and raw one-slice buffers (the GPU tier's pinned host copies
        excluded)."""
        return sum(t.nbytes for t in (self._gate_up, self._down_t, *self._stage, *self._raw))

    @property
    def stats(self) -> StoreStats:
        return StoreStats(
            **vars(self.res.stats),
            slice_loads=self._loads,
            bytes_loaded=self._bytes,
            stall_s=self._stall,
            load_s=self._load_s,
            copy_s=self._copy_s,
        )

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.config.timeout_s)
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
