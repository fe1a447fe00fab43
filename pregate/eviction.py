"""Expert-cache state: a capacity-bounded fast tier, the policies that choose what leaves it, and the
slot bookkeeping (`Residency`) an owner of real or simulated slots drives.

Owns: the cache units and the references a step makes (`UNITS`, `step_references`), `FutureView`,
the eviction policies (`EVICTION_POLICIES`, `make_eviction_policy`), `ExpertCache` and its counters,
`Residency` (which slot holds which slice, which loads are wanted), and pure cache runs over a
reference string (`simulate_cache`, `optimal_hits`). Imports only `pregate.errors`: torch-free on
purpose, so the tiered expert store (which moves real tensors, `pregate.store`) and the simulator
(which moves nothing, `pregate.sim`) drive the same objects and take identical decisions.

Vocabulary
- unit: any hashable id of what the fast tier holds (an int expert id, a (layer, expert) tuple...).
- reference string: the units accessed in order; reference t is the t-th access (t = 0, 1, ...).
- future: the references already known ahead of time. Pre-gating routes every token on arrival, so the
  expert references of all queued work are known before it runs; `FutureView` holds them.

Contract between the three pieces
- `ExpertCache.access(unit, t)` is called once per reference, in index order, with the same index t that
  reference has in the `FutureView` (so "next use after t" means the same thing to both).
- Policies are told about every change (`on_insert`, `on_access`, `on_evict`) and are asked only
  `victim(candidates, t, future)`, which is a query: it changes nothing a caller can observe, so a
  caller may ask and then decide not to evict (see `ExpertCache.prefetch`). `candidates` may be a subset
  of the resident units (an owner can leave out pinned units that are being computed with).
- One policy object serves one cache.

Units. A scheduled step uses a set of routed experts S (pre-gating: the same S in every layer). The
cache sees, per step, in ascending expert order:
  unit "expert" (a whole expert, all layers, is one unit): one reference per (step, expert);
  unit "slice" (one (layer, expert) slice is one unit): one reference per (step, layer, expert).

Belady's future in a Residency. `Residency.plan(steps)` appends steps whose experts are already known
(routed and queued work) to the cache's FutureView; a lookahead `window` (in references) limits how far
the policy may look. Beyond the window (or beyond what has been planned) a unit counts as "never used
again": such units are evicted first, the least recently used of them first; with window 0 Belady is
LRU. References before the running step are forgotten, so a long-running owner's bookkeeping stays
bounded.
"""

from __future__ import annotations

import heapq
import random
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pregate.errors import PregateError, check_int

Unit = Hashable

EVICTION_POLICIES = ("random", "lru", "lfu", "belady")
UNITS = ("expert", "slice")

_NEVER = 1 << 62  # next-use key of a unit with no known next use; larger than any reference index
_NOTHING = object()  # "no unit" where None could itself be a unit


class CacheError(PregateError):
    """Bad cache configuration or a cache driven against its contract; the message says what to fix."""


def _check_capacity(capacity: object) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise CacheError(
            f"capacity={capacity!r} is invalid: the fast tier must hold at least one unit; pass an int >= 1"
        )
    return capacity


def _check_window(window: object) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise CacheError(
            f"window={window!r} is invalid: pass None (the whole known future) or an int >= 0 "
            "(how many references ahead are visible)"
        )
    return window


# ---------------------------------------------------------------------------------------------------
# Units and the references of a step
# ---------------------------------------------------------------------------------------------------
def check_unit(unit: object) -> str:
    if unit not in UNITS:
        raise CacheError(
            f"unit={unit!r} is unknown; use 'expert' (whole expert, all layers) or 'slice' (one layer)"
        )
    return unit  # type: ignore[return-value]


def step_references(experts: Iterable[int], num_layers: int, unit: str) -> list[tuple[int, int]]:
    """(layer, expert) references of one step in the order the cache sees them; layer -1 = whole expert."""
    s = sorted(set(experts))
    if check_unit(unit) == "expert":
        return [(-1, e) for e in s]
    return [(layer, e) for layer in range(num_layers) for e in s]


def unit_of(layer: int, expert: int, unit: str) -> Unit:
    """The cache unit of a reference: the expert id, or the (layer, expert) pair."""
    return expert if unit == "expert" else (layer, expert)


def unit_references(steps: Iterable[Iterable[int]], num_layers: int, unit: str) -> list[Unit]:
    """The reference string (cache units) of a sequence of steps' expert sets."""
    return [unit_of(layer, e, unit) for s in steps for layer, e in step_references(s, num_layers, unit)]


# ---------------------------------------------------------------------------------------------------
# The known future
# ---------------------------------------------------------------------------------------------------
class FutureView:
    """The already-known future: references of work that is routed and queued.

    References get consecutive indices 0, 1, 2, ... in the order they are appended. `next_use(unit, t)`
    is the smallest index p > t with reference p == unit, or None when there is none among the known
    references or when p > t + window (the lookahead window; None = unbounded).

    Offline: `FutureView.from_references(refs)` knows the whole string. Online: start empty, `extend()`
    with newly routed references as work arrives, and `advance(t)` once references before t are past
    (this lets it forget them; later queries must use t' >= t - 1).
    """

    def __init__(self, window: int | None = None) -> None:
        self.window = _check_window(window)
        self._positions: dict[Unit, list[int]] = {}  # unit -> its reference indices, increasing
        self._length = 0  # number of references appended so far (next index to assign)
        self._floor = 0  # references < _floor are past; may have been forgotten
        self._kept_from = 0  # references < _kept_from have been dropped from _positions

    @classmethod
    def from_references(cls, refs: Iterable[Unit], window: int | None = None) -> FutureView:
        """The offline view: the whole reference string is known up front."""
        view = cls(window)
        view.extend(refs)
        return view

    def __len__(self) -> int:
        """Number of references known so far (past ones included)."""
        return self._length

    def extend(self, units: Iterable[Unit]) -> None:
        """Append newly known references; they get the next indices in order."""
        positions, i = self._positions, self._length
        for unit in units:
            bucket = positions.get(unit)
            if bucket is None:
                positions[unit] = [i]
            else:
                bucket.append(i)
            i += 1
        self._length = i

    def advance(self, t: int) -> None:
        """Declare references at indices < t past. Memory for them is reclaimed in amortised O(1)."""
        if t <= self._floor:
            return
        self._floor = t
        # Compact only when the dropped part is large, so the cost per reference stays O(1) amortised.
        if t - self._kept_from > max(1024, self._length - t):
            for unit in list(self._positions):
                bucket = self._positions[unit]
                cut = bisect_right(bucket, t - 1)
                if cut == len(bucket):
                    del self._positions[unit]
                elif cut:
                    del bucket[:cut]
            self._kept_from = t

    def next_use(self, unit: Unit, t: int) -> int | None:
        """Index of the next reference to `unit` after t within the window, else None."""
        if t < self._kept_from - 1:
            raise CacheError(
                f"next_use(t={t}) asks about references that were forgotten: advance() was called "
                f"with t={self._floor}; query with t >= {self._kept_from - 1}"
            )
        bucket = self._positions.get(unit)
        if bucket is None:
            return None
        i = bisect_right(bucket, t)
        if i == len(bucket):
            return None
        p = bucket[i]
        if self.window is not None and p - t > self.window:
            return None
        return p


# ---------------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------------
@runtime_checkable
class EvictionPolicy(Protocol):
    """What the cache asks a policy. Each implementation states its order in its docstring."""

    name: str

    def on_access(self, unit: Unit, t: int) -> None:
        """A reference at index t to a resident unit (every hit, and the access right after a demand load)."""

    def on_insert(self, unit: Unit, t: int) -> None:
        """`unit` became resident at time t (demand load or prefetch)."""

    def on_evict(self, unit: Unit) -> None:
        """`unit` left the fast tier."""

    def victim(self, resident: Collection[Unit], t: int, future: FutureView) -> Unit:
        """The unit among `resident` (non-empty) to evict now. A query: changes no observable state."""


class _KeyedHeap:
    """Lazy min-heap of tracked units keyed by a policy's key, for O(log n) victims.

    Touched units are only marked dirty; their keys are (re)computed when a victim is asked for, so the
    hot path (a hit) is O(1). Entries whose stamp is stale are skipped and the heap is rebuilt when dead
    entries dominate.
    """

    def __init__(self, key: Callable[[Unit, int, FutureView], tuple[int, int]], revalidate: bool) -> None:
        self._key = key
        # revalidate: a key may grow without an event (Belady: a unit's next use becomes known or
        # nearer as the future is extended or enters the window), so a popped entry is re-keyed before
        # it is trusted. Exact as long as stored keys are never above the current ones.
        self._revalidate = revalidate
        self._heap: list[tuple[int, int, int, Unit]] = []
        self._stamp: dict[Unit, int] = {}  # tracked unit -> seq of its live entry (-1: dirty, none live)
        self._dirty: set[Unit] = set()
        self._seq = 0

    def touch(self, unit: Unit) -> None:
        self._stamp[unit] = -1
        self._dirty.add(unit)

    def remove(self, unit: Unit) -> None:
        self._stamp.pop(unit, None)
        self._dirty.discard(unit)

    def _push(self, unit: Unit, t: int, future: FutureView) -> None:
        k0, k1 = self._key(unit, t, future)
        self._seq += 1
        self._stamp[unit] = self._seq
        heapq.heappush(self._heap, (k0, k1, self._seq, unit))

    def min(self, candidates: Collection[Unit], t: int, future: FutureView) -> Unit:
        for unit in self._dirty:
            self._push(unit, t, future)
        self._dirty.clear()
        if len(self._heap) > 2 * len(self._stamp) + 32:
            live = [e for e in self._heap if self._stamp.get(e[3]) == e[2]]
            heapq.heapify(live)
            self._heap = live
        heap, stamp = self._heap, self._stamp
        set_aside: list[tuple[int, int, int, Unit]] = []
        found = None
        while heap:
            entry = heapq.heappop(heap)
            unit = entry[3]
            if stamp.get(unit) != entry[2]:
                continue  # stale: the unit was touched or evicted since
            if self._revalidate:
                k0, k1 = self._key(unit, t, future)
                if (k0, k1) != entry[:2]:
                    self._push(unit, t, future)
                    continue
            if unit not in candidates:
                set_aside.append(entry)  # pinned by the owner: keep it, look further
                continue
            found = entry
            break
        for entry in set_aside:
            heapq.heappush(heap, entry)
        if found is None:
            raise CacheError(
                f"no evictable unit: none of the {len(candidates)} candidate(s) is tracked by the "
                "policy; unpin some units or raise the capacity"
            )
        heapq.heappush(heap, found)  # victim() is a query; on_evict removes it for real
        return found[3]


class LRU:
    """Least recently used: evicts the unit whose last access (or load) is oldest."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Unit, None] = OrderedDict()  # oldest first

    def on_access(self, unit: Unit, t: int) -> None:
        self._order.move_to_end(unit)

    def on_insert(self, unit: Unit, t: int) -> None:
        self._order[unit] = None
        self._order.move_to_end(unit)

    def on_evict(self, unit: Unit) -> None:
        self._order.pop(unit, None)

    def victim(self, resident: Collection[Unit], t: int, future: FutureView) -> Unit:
        for unit in self._order:
            if unit in resident:
                return unit
        raise CacheError(f"no evictable unit among {len(resident)} candidate(s); unpin some units")


class LFU:
    """Least frequently used: evicts the unit with the fewest accesses since it was loaded; ties go to
    the least recently used. Counts start at 0 on load (a prefetched, never-used unit goes first) and
    are forgotten on eviction (in-cache LFU, as libCacheSim's LFU)."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[Unit, int] = {}
        self._last: dict[Unit, int] = {}
        self._heap = _KeyedHeap(lambda u, t, f: (self._count[u], self._last[u]), revalidate=False)

    def on_access(self, unit: Unit, t: int) -> None:
        self._count[unit] += 1
        self._last[unit] = t
        self._heap.touch(unit)

    def on_insert(self, unit: Unit, t: int) -> None:
        self._count[unit] = 0
        self._last[unit] = t
        self._heap.touch(unit)

    def on_evict(self, unit: Unit) -> None:
        self._count.pop(unit, None)
        self._last.pop(unit, None)
        self._heap.remove(unit)

    def victim(self, resident: Collection[Unit], t: int, future: FutureView) -> Unit:
        return self._heap.min(resident, t, future)


class Belady:
    """Belady's MIN: evicts the unit whose next use is furthest in the future.

    Units with no known next use (none among the known references, or beyond the lookahead window)
    count as "never used again" and go first; ties among them go to the least recently used. With the
    whole future known (window=None, offline view) this is exactly optimal: no policy has fewer misses.
    With window=0 nothing is known and it is exactly LRU.

    Exactness assumes the cache is driven in the FutureView's order. If a known reference is skipped
    (work cancelled), its unit keeps that stale, too-near key until it is touched again, so it may stay
    longer than MIN would keep it: a valid but not optimal choice, never an error.
    """

    name = "belady"

    def __init__(self) -> None:
        self._last: dict[Unit, int] = {}
        self._heap = _KeyedHeap(self._key, revalidate=True)

    def _key(self, unit: Unit, t: int, future: FutureView) -> tuple[int, int]:
        nxt = future.next_use(unit, t)
        # min-heap: furthest next use first, then (among "never") the oldest last access
        return (-_NEVER if nxt is None else -nxt, self._last[unit])

    def on_access(self, unit: Unit, t: int) -> None:
        self._last[unit] = t
        self._heap.touch(unit)

    def on_insert(self, unit: Unit, t: int) -> None:
        self._last[unit] = t
        self._heap.touch(unit)

    def on_evict(self, unit: Unit) -> None:
        self._last.pop(unit, None)
        self._heap.remove(unit)

    def victim(self, resident: Collection[Unit], t: int, future: FutureView) -> Unit:
        return self._heap.min(resident, t, future)


class RandomPolicy:
    """Uniformly random victim among the candidates, from a seeded generator (reproducible). A draw is
    consumed only when its victim is really evicted, so victim() stays a query."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._draw = self._rng.random()  # the uniform [0, 1) number the next victim is chosen by
        self._units: list[Unit] = []  # tracked units, in a deterministic order (not set order)
        self._index: dict[Unit, int] = {}
        self._chosen: object = _NOTHING

    def on_access(self, unit: Unit, t: int) -> None:
        pass

    def on_insert(self, unit: Unit, t: int) -> None:
        self._chosen = _NOTHING
        self._index[unit] = len(self._units)
        self._units.append(unit)

    def on_evict(self, unit: Unit) -> None:
        if self._chosen is not _NOTHING and self._chosen == unit:
            self._draw = self._rng.random()  # that draw is spent
        self._chosen = _NOTHING
        i = self._index.pop(unit, None)
        if i is None:
            return
        last = self._units.pop()
        if last != unit:  # swap-remove keeps removal O(1)
            self._units[i] = last
            self._index[last] = i

    def victim(self, resident: Collection[Unit], t: int, future: FutureView) -> Unit:
        pool = self._units
        if len(resident) < len(pool):  # some units pinned: draw among the candidates only
            pool = [u for u in pool if u in resident]
        if not pool:
            raise CacheError(f"no evictable unit among {len(resident)} candidate(s); unpin some units")
        self._chosen = pool[int(self._draw * len(pool))]
        return self._chosen


def make_eviction_policy(name: str, seed: int = 0) -> EvictionPolicy:
    """A fresh policy by name (one of EVICTION_POLICIES); `seed` only matters for "random"."""
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFU()
    if name == "belady":
        return Belady()
    if name == "random":
        return RandomPolicy(seed)
    raise CacheError(f"unknown eviction policy {name!r}; choose one of {', '.join(EVICTION_POLICIES)}")


# ---------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------
@dataclass
class CacheStats:
    """Counters of one cache run. Loads (bytes moved into the fast tier) = misses + prefetches.

    The one definition of hits, misses and hit ratio: `ResidencyStats` and the store's `StoreStats`
    extend it with the counters of their own layer.
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetches: int = 0  # units loaded by prefetch() (not counted as accesses)

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def loads(self) -> int:
        return self.misses + self.prefetches

    @property
    def hit_ratio(self) -> float:
        """hits / accesses; 0.0 before any access."""
        return self.hits / self.accesses if self.accesses else 0.0


class ExpertCache:
    """Capacity-bounded set of resident units driven by an eviction policy.

    `access(unit, t)` -> hit?; on a miss the unit is loaded, evicting `policy.victim(...)` first when
    the cache is full. `prefetch(unit, t)` loads without counting an access, and never evicts a unit
    that is needed sooner than the prefetched one. `loads` keeps every load in order (unless
    `keep_loads` is False: a long-running owner, whose log would grow on every miss) and `last_evicted`
    names the unit the latest call evicted (None if it evicted nothing), so a tiered store can move the
    bytes and reuse the freed slot. Times t must not decrease from call to call; None is not a unit.
    """

    def __init__(
        self,
        capacity: int,
        policy: str | EvictionPolicy = "belady",
        future: FutureView | None = None,
        seed: int = 0,
        keep_loads: bool = True,
    ) -> None:
        self.capacity = _check_capacity(capacity)
        self.policy = make_eviction_policy(policy, seed) if isinstance(policy, str) else policy
        # No future given: nothing is known ahead, so Belady degenerates to LRU (documented there).
        self.future = future if future is not None else FutureView()
        self.stats = CacheStats()
        self.loads: list[Unit] = []
        self.keep_loads = keep_loads
        self.last_evicted: Unit | None = None
        self._resident: set[Unit] = set()
        self._t = -1

    def __contains__(self, unit: object) -> bool:
        return unit in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    @property
    def resident(self) -> frozenset[Unit]:
        """A snapshot of the units in the fast tier."""
        return frozenset(self._resident)

    def _check_time(self, t: int) -> None:
        if t < self._t:
            raise CacheError(
                f"t={t} goes back in time (last call used t={self._t}); pass reference indices in order"
            )
        self._t = t

    def _load(self, unit: Unit, t: int, victim: object = _NOTHING) -> None:
        if victim is not _NOTHING:
            self._resident.remove(victim)
            self.policy.on_evict(victim)
            self.stats.evictions += 1
            self.last_evicted = victim
        assert len(self._resident) < self.capacity, "a full cache must evict before it loads"
        self._resident.add(unit)
        self.policy.on_insert(unit, t)
        if self.keep_loads:
            self.loads.append(unit)

    def access(self, unit: Unit, t: int) -> bool:
        """Reference `unit` at index t. Returns True on a hit; on a miss loads it (evicting if full)."""
        self._check_time(t)
        self.last_evicted = None
        if unit in self._resident:
            self.stats.hits += 1
            self.policy.on_access(unit, t)
            return True
        self.stats.misses += 1
        victim: object = _NOTHING
        if len(self._resident) >= self.capacity:
            victim = self.policy.victim(self._resident, t, self.future)
        self._load(unit, t, victim)
        self.policy.on_access(unit, t)
        return False

    def prefetch(self, unit: Unit, t: int) -> bool:
        """Load `unit` ahead of its use, before the access at index t happens.

        Returns True when the unit is resident afterwards (already there, or loaded now). When the cache
        is full and the policy's victim is needed sooner than `unit` (next uses counted from index t on),
        returns False and changes nothing. Does not count as an access.
        """
        self._check_time(t)
        self.last_evicted = None
        if unit in self._resident:
            return True
        victim: object = _NOTHING
        if len(self._resident) >= self.capacity:
            # Asked as of just before index t, so the reference at t itself counts as a future use.
            victim = self.policy.victim(self._resident, t - 1, self.future)
            victim_next = self.future.next_use(victim, t - 1)
            unit_next = self.future.next_use(unit, t - 1)
            if victim_next is not None and (unit_next is None or victim_next < unit_next):
                return False
        self.stats.prefetches += 1
        self._load(unit, t, victim)
        return True


def simulate_cache(
    refs: Sequence[Unit],
    capacity: int,
    policy: str | EvictionPolicy,
    window: int | None = None,
    seed: int = 0,
) -> CacheStats:
    """Run a reference string through an initially empty cache; the whole string is the known future
    (cut to `window` references ahead when given). `seed` is used only by a policy given by name."""
    cache = ExpertCache(capacity, policy, FutureView.from_references(refs, window), seed)
    access = cache.access
    for t, unit in enumerate(refs):
        access(unit, t)
    return cache.stats


def optimal_hits(refs: Sequence[Unit], capacity: int) -> int:
    """Most hits any demand-loading cache of `capacity` can get on `refs` (every miss loads the unit).

    Exhaustive search over every choice of victim (memoised on position and resident set): an
    independent check of Belady for tiny strings in tests, exponential in the number of units.
    """
    _check_capacity(capacity)
    refs = list(refs)
    memo: dict[tuple[int, frozenset], int] = {}

    def best(i: int, resident: frozenset) -> int:
        if i == len(refs):
            return 0
        key = (i, resident)
        if key not in memo:
            unit = refs[i]
            if unit in resident:
                memo[key] = 1 + best(i + 1, resident)
            elif len(resident) < capacity:
                memo[key] = best(i + 1, resident | {unit})
            else:
                memo[key] = max(best(i + 1, (resident - {v}) | {unit}) for v in resident)
        return memo[key]

    return best(0, frozenset())


# ---------------------------------------------------------------------------------------------------
# Residency: the cache decisions and the slots of a fast tier
# ---------------------------------------------------------------------------------------------------
@dataclass
class ResidencyStats(CacheStats):
    """Cache counters plus slot traffic. `bypass` = slices used without a cache slot (the unit was not
    resident when the layer ran: a step needing more units than the capacity streams the rest, through a
    stream ring or the staging buffer)."""

    bypass: int = 0


def max_streams(num_experts: int) -> int:
    """The most experts one step can stream (Residency's `streams`): every expert of the step but the last
    it accessed, which the cache keeps whatever it evicts for it."""
    return max(0, num_experts - 1)


class Residency:
    """Which units are in the fast tier, which slot holds which slice, and which loads are wanted.

    Physical slots: unit "expert" -> capacity * L slots (slot j*L + l holds layer l of the expert in
    unit slot j); unit "slice" -> capacity slots. `content[p]` = (layer, expert) whose bytes slot p holds
    (None: nothing valid). `want[p]` = (layer, expert, need): a load the owner should perform, `need`
    = step * L + layer orders urgency. A load may start when slot p is not `pinned` to other content
    (pinned: the running layer, or for whole experts the rest of the step, still reads it) and, for a
    stream slot or without prefetching, need <= `horizon` (the current layer plus the prefetch depth;
    without prefetching only the current layer). With prefetching a cache slot's load needs no horizon:
    the slot is its unit's until the cache evicts it, so loading it early takes it from nobody, and the
    link works through a missed expert's layers as fast as it can instead of `depth` layers ahead of the
    compute (stream slots are shared by the layers of a ring, so theirs wait).
    The owner calls `start_load` / `finish_load` around each transfer. Decisions go through an
    `ExpertCache` over a `FutureView` of the planned steps; both forget references before the running
    step, so the bookkeeping stays bounded however many steps run.

    Streamed experts (unit "expert", prefetching, `streams` > 0): a step that cannot keep an expert
    resident reads its slices without a cache slot. Up to `streams` such experts per step get a ring of
    depth + 1 stream slots after the cache slots, and their next layers' slices are wanted like any
    prefetch (pre-gating: the step uses the same experts in every layer), so the link streams layer i + 1
    while layer i computes. Without a ring (no prefetching, unit "slice", or more streamed experts than
    rings) a streamed slice has no slot and is read when the layer asks for it. Either way it counts as
    `bypass`, and the cache's decisions do not change.
    """

    def __init__(
        self,
        num_layers: int,
        unit: str,
        capacity: int,
        policy: str = "lru",
        window: int | None = None,
        prefetch: bool = False,
        depth: int = 1,
        seed: int = 0,
        streams: int = 0,
    ) -> None:
        self.L = num_layers
        self.unit = check_unit(unit)
        check_int("prefetch depth", depth, error=CacheError, why="layers loaded ahead")
        self.future = FutureView(window)
        self.cache = ExpertCache(capacity, policy, self.future, seed, keep_loads=False)
        self.capacity = capacity
        self.prefetch = prefetch
        self.depth = depth
        self.per_unit = num_layers if unit == "expert" else 1
        check_int("streams", streams, 0, error=CacheError)
        self.streams = streams if prefetch and unit == "expert" else 0
        # stream slots per streamed expert: the running layer and `depth` ahead, never more than a step
        self.ring = min(depth + 1, num_layers)
        self.cache_slots = capacity * self.per_unit
        self.num_slots = self.cache_slots + self.streams * self.ring
        self.content: list[tuple[int, int] | None] = [None] * self.num_slots
        self.want: dict[int, tuple[int, int, int]] = {}
        self.inflight: dict[int, tuple[int, int]] = {}
        self.pinned: dict[int, tuple[int, int]] = {}
        self.horizon = -1
        self.bypass = 0
        self.step = -1
        self._slot_of: dict[Unit, int] = {}  # resident unit -> unit slot
        self._free = list(range(capacity - 1, -1, -1))
        self._refs: list[Unit] = []  # references from index _refs_base on (planned or observed)
        self._refs_base = 0  # earlier references are past and forgotten (a long-running server)
        self._planned: deque[tuple[int, ...]] = deque()  # planned steps not yet started
        self._t = 0  # index of the next access
        self._step_slot: dict[int, int] = {}  # expert -> unit slot, frozen for the step (unit expert)
        self._stream_of: dict[int, int] = {}  # streamed expert -> its ring, for the step (unit expert)
        self._next: tuple[dict[int, int], dict[int, int], set[int]] | None = None  # see _decide_next
        self._accessed: set[int] = set()
        self._layer = -1
        self._cross_done = False

    # -- the known future
    def plan(self, steps: Iterable[Iterable[int]]) -> None:
        """Append steps whose expert sets are known ahead (routed, queued work), in execution order."""
        for s in steps:
            s = tuple(sorted(set(s)))
            self._planned.append(s)
            refs = unit_references([s], self.L, self.unit)
            self._refs.extend(refs)
            self.future.extend(refs)

    @property
    def stats(self) -> ResidencyStats:
        return ResidencyStats(**vars(self.cache.stats), bypass=self.bypass)

    # -- decisions
    def _assign(self, unit: Unit) -> int:
        """Give the just-loaded `unit` the slot its victim freed (or a free one); drop stale wants."""
        victim = self.cache.last_evicted
        j = self._slot_of.pop(victim) if victim is not None else self._free.pop()
        self._slot_of[unit] = j
        for p in range(j * self.per_unit, (j + 1) * self.per_unit):
            self.want.pop(p, None)
        return j

    def _want(self, p: int, layer: int, e: int, need: int) -> None:
        # what slot p will hold once its transfer (if any) lands: wanting that again would load it twice
        if self.inflight.get(p, self.content[p]) != (layer, e):
            self.want[p] = (layer, e, need)

    def _access(self, layer: int, e: int, step_slot: dict[int, int] | None = None) -> None:
        unit = unit_of(layer, e, self.unit)
        t = self._t
        known = self._refs[t - self._refs_base] if t < self._refs_base + len(self._refs) else None
        if known is None:  # not planned: the step becomes known now
            self._refs.append(unit)
            self.future.extend([unit])
        elif known != unit:
            raise CacheError(
                f"step {self.step} uses {unit!r} at reference {t} but the plan says {known!r}; "
                "plan() must list the experts of the steps in the order they run"
            )
        self._t += 1
        if not self.cache.access(unit, t):
            victim = self.cache.last_evicted
            own = self._step_slot if step_slot is None else step_slot
            if self.unit == "expert" and victim in own:
                del own[victim]  # evicted by its own step (more experts than slots): streams
            self._assign(unit)

    def begin_layer(self, layer: int, experts: Sequence[int]) -> dict[int, int | None]:
        """Layer `layer` is about to run with `experts` (layer 0 starts a step). Returns expert ->
        physical slot holding (or about to hold) its slice, or None (not resident: stream it)."""
        experts = sorted(set(experts))
        if layer == 0:
            self._start_step(experts)
        elif not 0 < layer < self.L or self.step < 0:
            raise CacheError(f"layer={layer} out of range [0, {self.L}) or called before layer 0 of a step")
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
            early = layer == 0 and self._next is not None
            if early:  # the step's accesses were taken in the previous step's tail
                self._step_slot, self._stream_of, self._accessed = self._next
                self._next = None
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
            if layer == 0 and self.streams and not early:
                self._stream_of = self._rings(experts, self._step_slot)
            for e in experts:
                j = self._step_slot.get(e)
                plan[e] = None if j is None else j * self.L + layer
                if j is None and e in self._stream_of:
                    plan[e] = p = self._stream_slot(e, layer)
                    self.pinned[p] = (layer, e)
                    self._want(p, layer, e, need)
                    for l2 in range(layer + 1, min(self.L, layer + 1 + self.depth)):  # stream ahead
                        self._want(self._stream_slot(e, l2), l2, e, self.step * self.L + l2)
        self.horizon = need + (self.depth if self.prefetch else 0)
        if self.prefetch:
            self._prefetch(layer, experts)
        self.bypass += sum(1 for p in plan.values() if p is None or p >= self.cache_slots)
        return plan

    def _rings(self, experts: Sequence[int], step_slot: dict[int, int]) -> dict[int, int]:
        """Streamed expert -> ring, for the first `streams` experts of a step that keep no slot."""
        streamed = [e for e in experts if e not in step_slot]
        return {e: r for r, e in enumerate(streamed[: self.streams])}

    def _stream_slot(self, e: int, layer: int, rings: dict[int, int] | None = None) -> int:
        r = (self._stream_of if rings is None else rings)[e]
        return self.cache_slots + r * self.ring + layer % self.ring

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
        self._step_slot = {}
        self._stream_of = {}
        if self._next is None:  # last step's streams are done (else they hold this step's early wants)
            for p in range(self.cache_slots, self.num_slots):
                self.want.pop(p, None)
        self._accessed = set()
        self._cross_done = False
        if self._planned:  # _access also checks every reference against the plan
            planned = self._planned.popleft()
            if tuple(experts) != planned:
                raise CacheError(
                    f"step {self.step} uses experts {experts}, the plan says {list(planned)}; "
                    "plan() must list the experts of the steps in the order they run"
                )

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
                self._decide_next(nxt)
            else:
                for l2 in range(0, layer + self.depth - self.L + 1):
                    for e in nxt:
                        self._prefetch_unit(l2, e, base + self.L + l2)

    def _decide_next(self, nxt: tuple[int, ...]) -> None:
        """Take the next planned step's cache accesses now, in this step's tail (unit expert), so its
        slices, missed into a slot or streamed through a ring, load while this step finishes instead of
        after it: the LM head, sampling and scheduling between two steps leave the link idle otherwise.
        The accesses are the plan's next references, in order, so the decisions are those the next step
        would take itself. The running step keeps reading its slots: they stay pinned until it ends, so
        nothing is loaded over them (an expert the accesses evict finishes this step from its slot)."""
        step_slot: dict[int, int] = {}
        for e in nxt:
            self._access(-1, e, step_slot)
            if e in self._slot_of:
                step_slot[e] = self._slot_of[e]
        rings = self._rings(nxt, step_slot) if self.streams else {}
        self._next = (step_slot, rings, set(nxt))
        base = (self.step + 1) * self.L
        for e, j in step_slot.items():
            for l2 in range(self.L):
                self._want(j * self.L + l2, l2, e, base + l2)
        for e in rings:
            for l2 in range(min(self.L, self.ring)):
                self._want(self._stream_slot(e, l2, rings), l2, e, base + l2)
        if self._layer == self.L - 1:  # the tail: the next step's first layers may load
            self.horizon = max(self.horizon, base + self.depth)

    # -- the owner's side of a transfer
    def next_load(self) -> tuple[int, int, int, int] | None:
        """The most urgent startable load (slot, layer, expert, need), or None."""
        best = None
        for p, (layer, e, need) in self.want.items():
            early = self.prefetch and p < self.cache_slots  # see the class docstring
            if (need > self.horizon and not early) or p in self.inflight:
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
