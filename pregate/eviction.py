"""Expert-cache eviction: a capacity-bounded fast tier and the policies that choose what leaves it.

Torch-free on purpose: the tiered expert store (which moves real tensors) and the simulator (which
moves nothing) drive the same `ExpertCache` and the same policy objects.

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
"""

from __future__ import annotations

import heapq
import random
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pregate.errors import PregateError

Unit = Hashable

EVICTION_POLICIES = ("random", "lru", "lfu", "belady")

_NEVER = 1 << 62  # next-use key of a unit with no known next use; larger than any reference index
_NOTHING = object()  # "no unit" where None could itself be a unit


class CacheError(PregateError):
    """Bad cache configuration or a cache driven against its contract; the message says what to fix."""


def _check_capacity(capacity: object) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise CacheError(
            f"capacity={capacity!r} is invalid: the fast tier must hold at least one unit; "
            "pass an int >= 1"
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
    """Counters of one cache run. Loads (bytes moved into the fast tier) = misses + prefetches."""

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
    that is needed sooner than the prefetched one. `loads` keeps every load in order and `last_evicted`
    names the unit the latest call evicted (None if it evicted nothing), so a tiered store can move the
    bytes and reuse the freed slot. Times t must not decrease from call to call; None is not a unit.
    """

    def __init__(
        self,
        capacity: int,
        policy: str | EvictionPolicy = "belady",
        future: FutureView | None = None,
        seed: int = 0,
    ) -> None:
        self.capacity = _check_capacity(capacity)
        self.policy = make_eviction_policy(policy, seed) if isinstance(policy, str) else policy
        # No future given: nothing is known ahead, so Belady degenerates to LRU (documented there).
        self.future = future if future is not None else FutureView()
        self.stats = CacheStats()
        self.loads: list[Unit] = []
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
