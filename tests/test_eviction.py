"""Expert-cache eviction: Belady is optimal (checked by exhaustive search), the simple policies do what
their docstrings say, the lookahead window and prefetch keep their promises, and libCacheSim agrees."""

import random
import subprocess
import sys
import time

import pytest

from pregate.errors import PregateError
from pregate.eviction import (
    EVICTION_POLICIES,
    CacheError,
    CacheStats,
    EvictionPolicy,
    ExpertCache,
    FutureView,
    Residency,
    make_eviction_policy,
    max_streams,
    optimal_hits,
    simulate_cache,
    unit_references,
)
from tests.conftest import bookkeeping_size


def zipf_refs(n: int, units: int, seed: int, s: float = 1.1) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** s for k in range(units)]
    return rng.choices(range(units), weights=weights, k=n)


def uniform_refs(n: int, units: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(units) for _ in range(n)]


def test_module_does_not_import_torch():
    code = "import sys, pregate.eviction; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_make_eviction_policy_builds_every_name_and_rejects_others():
    for name in EVICTION_POLICIES:
        policy = make_eviction_policy(name)
        assert policy.name == name
        assert isinstance(policy, EvictionPolicy)
    with pytest.raises(PregateError, match=r"'mru'.*random, lru, lfu, belady"):
        make_eviction_policy("mru")


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True, "2"])
def test_bad_capacity_is_a_clear_error(capacity):
    with pytest.raises(PregateError, match=r"capacity="):
        simulate_cache([1, 2], capacity, "lru")
    with pytest.raises(PregateError, match=r"capacity="):
        ExpertCache(capacity, "lru")


def test_bad_window_is_a_clear_error():
    with pytest.raises(PregateError, match=r"window=-1"):
        FutureView.from_references([1, 2], window=-1)


def test_time_must_not_go_back():
    cache = ExpertCache(2, "lru")
    cache.access("a", 5)
    with pytest.raises(PregateError, match=r"t=4"):
        cache.access("b", 4)


def test_belady_equals_exhaustive_optimum_on_small_strings():
    rng = random.Random(0)
    for _ in range(200):
        units = rng.randint(1, 5)
        refs = [rng.randrange(units) for _ in range(rng.randint(1, 12))]
        capacity = rng.randint(1, 4)
        best = optimal_hits(refs, capacity)
        assert simulate_cache(refs, capacity, "belady").hits == best, (refs, capacity)
        for name in ("lru", "lfu", "random"):
            assert simulate_cache(refs, capacity, name, seed=rng.randrange(99)).hits <= best


def test_optimal_hits_known_values():
    assert optimal_hits([1, 2, 1], 1) == 0  # every miss must load: no bypassing
    assert optimal_hits([1, 2, 3, 1, 2, 3], 2) == 2
    assert optimal_hits([1, 1, 1], 1) == 2


@pytest.mark.parametrize(
    "refs",
    [
        [0, 1, 2, 3] * 25,  # loop one larger than the cache: LRU and LFU get nothing
        zipf_refs(3000, 12, seed=1),
        uniform_refs(3000, 9, seed=2),
    ],
    ids=["loop", "zipf", "uniform"],
)
def test_belady_beats_every_other_policy(refs):
    for capacity in (1, 2, 3, 5):
        belady = simulate_cache(refs, capacity, "belady").hits
        for name in ("lru", "lfu", "random"):
            assert belady >= simulate_cache(refs, capacity, name).hits, (name, capacity)


def test_loop_one_larger_than_cache():
    refs = [0, 1, 2, 3] * 25
    assert simulate_cache(refs, 3, "lru").hits == 0
    assert simulate_cache(refs, 3, "lfu").hits == 0
    belady = simulate_cache(refs, 3, "belady").hits
    assert belady == optimal_hits(refs, 3) and belady >= 60  # about two of every three references hit


def test_lru_order_on_hand_made_string():
    cache = ExpertCache(2, "lru")
    hits = [cache.access(u, t) for t, u in enumerate("abacb")]
    # a, b load; a hits (b becomes LRU); c evicts b; b evicts a (LRU after c)
    assert hits == [False, False, True, False, False]
    assert cache.resident == {"c", "b"}
    assert cache.loads == ["a", "b", "c", "b"]
    assert cache.stats == CacheStats(hits=1, misses=4, evictions=2)


def test_lfu_evicts_least_frequent_then_least_recent():
    cache = ExpertCache(2, "lfu")
    for t, u in enumerate("aab"):
        cache.access(u, t)
    cache.access("c", 3)  # a used twice, b once: b goes
    assert cache.last_evicted == "b" and cache.resident == {"a", "c"}
    cache = ExpertCache(2, "lfu")
    for t, u in enumerate("abc"):  # a and b tie at one use each: the older one, a, goes
        cache.access(u, t)
    assert cache.last_evicted == "a" and cache.resident == {"b", "c"}


def test_lfu_forgets_counts_on_eviction():
    cache = ExpertCache(2, "lfu")
    for t, u in enumerate("bbbaaac"):  # b and a tie at 3 uses; b is older and goes for c
        cache.access(u, t)
    assert cache.last_evicted == "b"
    cache.access("b", 7)  # c (1 use) goes; b is back with a fresh count of 1, not 4
    assert cache.last_evicted == "c"
    cache.access("d", 8)  # so b (1) goes before a (3); a remembered count would have evicted a
    assert cache.last_evicted == "b" and cache.resident == {"a", "d"}


def test_random_is_seeded_and_stays_within_residents():
    refs = uniform_refs(2000, 8, seed=3)
    a = simulate_cache(refs, 3, "random", seed=7)
    assert simulate_cache(refs, 3, "random", seed=7) == a
    others = {simulate_cache(refs, 3, "random", seed=s).hits for s in range(5)}
    assert len(others) > 1  # the seed matters
    cache = ExpertCache(3, "random", seed=1)
    for t, u in enumerate(refs[:300]):
        before = cache.resident
        cache.access(u, t)
        if cache.last_evicted is not None:
            assert cache.last_evicted in before and len(cache) == 3


@pytest.mark.parametrize("name", ["lru", "random", "lfu"])
def test_non_anticipating_policies_hit_k_over_n_on_uniform_refs(name):
    # With independent uniform references any policy that cannot see the future hits k/n of the time.
    refs = uniform_refs(20000, 10, seed=4)
    assert abs(simulate_cache(refs, 4, name).hit_ratio - 0.4) < 0.02


@pytest.mark.parametrize("name", EVICTION_POLICIES)
def test_capacity_covering_all_units_never_evicts(name):
    refs = zipf_refs(500, 7, seed=5)
    stats = simulate_cache(refs, 7, name)
    assert stats.evictions == 0
    assert stats.misses == len(set(refs))
    assert stats.hit_ratio == pytest.approx(1 - len(set(refs)) / len(refs))


def test_hit_ratio_of_empty_run_is_zero():
    assert simulate_cache([], 2, "belady") == CacheStats()
    assert CacheStats().hit_ratio == 0.0


def test_window_zero_is_exactly_lru():
    for seed in range(5):
        refs = zipf_refs(2000, 9, seed=seed)
        for capacity in (1, 3, 5):
            assert simulate_cache(refs, capacity, "belady", window=0) == simulate_cache(refs, capacity, "lru")


def test_window_grows_from_lru_to_min():
    refs = uniform_refs(3000, 6, seed=0)
    full = simulate_cache(refs, 3, "belady").hits
    hits = [simulate_cache(refs, 3, "belady", window=w).hits for w in (0, 1, 2, 4, 8)]
    assert hits == sorted(hits) and simulate_cache(refs, 3, "lru").hits == hits[0] < hits[-1] <= full
    assert simulate_cache(refs, 3, "belady", window=len(refs)).hits == full


def test_future_view_next_use_and_window():
    view = FutureView.from_references("abcab")
    assert [view.next_use("a", t) for t in (-1, 0, 2, 3)] == [0, 3, 3, None]
    assert view.next_use("z", 0) is None
    windowed = FutureView.from_references("abcab", window=2)
    assert windowed.next_use("a", 0) is None  # index 3 is three ahead: beyond the window
    assert windowed.next_use("a", 1) == 3


def test_online_view_with_lookahead_equals_offline_window():
    # Routing keeps `ahead` references known; the owner forgets the past as it goes.
    refs = zipf_refs(6000, 10, seed=6)
    ahead = 5
    view = FutureView()
    cache = ExpertCache(4, "belady", view)
    view.extend(refs[: ahead + 1])
    for t, unit in enumerate(refs):
        cache.access(unit, t)
        view.extend(refs[t + ahead + 1 : t + ahead + 2])
        view.advance(t + 1)
    assert cache.stats == simulate_cache(refs, 4, "belady", window=ahead)
    with pytest.raises(PregateError, match=r"forgotten"):
        view.next_use(refs[0], 0)


def test_victim_is_a_query_and_respects_pinned_units():
    view = FutureView.from_references([0, 1, 2, 3, 0, 1, 2])
    for name in EVICTION_POLICIES:
        cache = ExpertCache(3, name, view, seed=2)
        for t in range(3):
            cache.access(t, t)
        policy = cache.policy
        first = policy.victim({0, 1, 2}, 3, view)
        assert policy.victim({0, 1, 2}, 3, view) == first  # asking changes nothing
        pinned = {first}
        other = policy.victim({0, 1, 2} - pinned, 3, view)
        assert other in {0, 1, 2} - pinned
        assert policy.victim({0, 1, 2}, 3, view) == first
    belady = ExpertCache(3, "belady", view)
    for t in range(3):
        belady.access(t, t)
    assert belady.policy.victim({0, 1, 2}, 3, view) == 2  # used furthest ahead
    assert belady.policy.victim({0, 1}, 3, view) == 1


def test_prefetch_loads_what_is_needed_soon():
    view = FutureView.from_references(["a", "b", "c", "a", "b", "c"])
    cache = ExpertCache(2, "belady", view)
    cache.access("a", 0)
    cache.access("b", 1)
    assert cache.prefetch("c", 2) and cache.last_evicted == "b"  # c is needed next, b last
    assert cache.resident == {"a", "c"} and cache.stats.prefetches == 1
    assert cache.access("c", 2) and cache.access("a", 3)
    assert cache.stats == CacheStats(hits=2, misses=2, evictions=1, prefetches=1)
    assert cache.loads == ["a", "b", "c"]
    assert cache.prefetch("a", 4)  # already resident: nothing to do
    assert cache.stats.prefetches == 1


def test_prefetch_refuses_to_evict_sooner_needed_unit():
    view = FutureView.from_references(["a", "b", "a", "b", "c"])
    for name in EVICTION_POLICIES:
        cache = ExpertCache(2, name, view)
        cache.access("a", 0)
        cache.access("b", 1)
        before = (cache.resident, CacheStats(**vars(cache.stats)), list(cache.loads))
        assert cache.prefetch("c", 2) is False  # a (t=2) and b (t=3) are both needed before c (t=4)
        assert cache.prefetch("z", 2) is False  # z is never needed: nothing is worth evicting for it
        assert (cache.resident, cache.stats, cache.loads) == before and cache.last_evicted is None


@pytest.mark.parametrize("name", EVICTION_POLICIES)
def test_prefetch_never_evicts_a_sooner_needed_unit_on_random_traces(name):
    rng = random.Random(8)
    for trial in range(30):
        refs = zipf_refs(300, 8, seed=trial)
        view = FutureView.from_references(refs, window=rng.choice([None, 3, 20]))
        cache = ExpertCache(3, name, view, seed=trial)
        for t, unit in enumerate(refs):
            if rng.random() < 0.5:
                wanted = refs[min(t + rng.randrange(1, 6), len(refs) - 1)]
                resident_before = cache.resident
                loaded = cache.prefetch(wanted, t)
                assert loaded == (wanted in cache)
                victim = cache.last_evicted
                if victim is not None:
                    v_next, w_next = view.next_use(victim, t - 1), view.next_use(wanted, t - 1)
                    assert v_next is None or (w_next is not None and w_next <= v_next)
                elif not loaded:
                    assert cache.resident == resident_before
            cache.access(unit, t)
        assert cache.stats.loads == len(cache.loads)


@pytest.mark.parametrize("name", EVICTION_POLICIES)
def test_tuple_units_and_large_trace_are_fast(name):
    rng = random.Random(9)
    refs = [(rng.randrange(30), rng.randrange(8)) for _ in range(100_000)]  # (layer, expert)
    start = time.perf_counter()
    stats = simulate_cache(refs, 60, name)
    elapsed = time.perf_counter() - start
    assert stats.accesses == len(refs) and stats.evictions == stats.misses - 60
    assert elapsed < 5.0, f"{name} took {elapsed:.1f}s for 1e5 accesses"


def _libcachesim_hits(lcs, cache, refs):
    """Hits of a libCacheSim cache on `refs`, each object of size 1, next access told for Belady."""
    nxt, last = [0] * len(refs), {}
    for i in range(len(refs) - 1, -1, -1):
        nxt[i] = last.get(refs[i], 1 << 62)  # libCacheSim's "never again"
        last[refs[i]] = i
    hits = 0
    for i, unit in enumerate(refs):
        req = lcs.Request()
        req.obj_id, req.obj_size, req.clock_time, req.next_access_vtime = unit, 1, i, nxt[i]
        hits += bool(cache.get(req))
    return hits


@pytest.mark.slow
def test_hits_match_libcachesim():
    lcs = pytest.importorskip("libcachesim")
    rng = random.Random(10)
    for seed in range(3):
        refs = [min(int(rng.paretovariate(1.0)), 60) for _ in range(20_000)]
        refs += zipf_refs(20_000, 16, seed=seed)
        for capacity in (2, 5, 11):
            for ours, theirs in (("belady", lcs.Belady), ("lru", lcs.LRU), ("lfu", lcs.LFU)):
                expected = _libcachesim_hits(lcs, theirs(capacity), refs)
                assert simulate_cache(refs, capacity, ours).hits == expected, (ours, capacity, seed)


def test_belady_is_optimal_on_small_reference_strings():
    rng = random.Random(3)
    for _ in range(30):
        steps = [rng.sample(range(5), rng.randint(1, 3)) for _ in range(6)]
        refs = unit_references(steps, 2, "expert")
        for k in (1, 2, 3):
            assert simulate_cache(refs, k, "belady").hits == optimal_hits(refs, k)


# ---------------------------------------------------------------------------------------------------
# Residency: slots over the cache, as the store and the simulator drive it
# ---------------------------------------------------------------------------------------------------
L, E = 4, 7


def test_residency_rejects_a_contradicted_plan():
    res = Residency(L, "slice", 4)
    res.plan([[1, 2]])
    with pytest.raises(CacheError, match="plan says"):
        res.begin_layer(0, [3])


def _long_replay(res: Residency, steps: list[list[int]]) -> Residency:
    """Drive a Residency as the expert store does: plan each step as it is scheduled, run its layers."""
    for experts in steps:
        res.plan([experts])
        for layer in range(L):
            res.begin_layer(layer, experts)
            for p, (lay, e, need) in list(res.want.items()):
                if need <= res.horizon and p not in res.inflight and p not in res.pinned:
                    res.start_load(p, lay, e)
                    res.finish_load(p)
    return res


@pytest.mark.parametrize("unit", ["slice", "expert"])
def test_long_replay_keeps_bookkeeping_bounded(monkeypatch, unit):
    """A long-running server plans steps forever: past references are forgotten, decisions unchanged."""
    rng = random.Random(0)
    steps = [sorted(rng.sample(range(E), 2)) for _ in range(3000)]
    res = _long_replay(Residency(L, unit, 3, policy="belady"), steps)
    refs = len(steps) * 2 * (L if unit == "slice" else 1)
    assert len(res._refs) < refs // 2
    assert sum(len(b) for b in res.future._positions.values()) < refs // 2
    monkeypatch.setattr(Residency, "_forget_past", lambda self: None)  # the old, unbounded bookkeeping
    unbounded = _long_replay(Residency(L, unit, 3, policy="belady"), steps)
    assert len(unbounded._refs) == refs
    assert res.stats == unbounded.stats


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
@pytest.mark.parametrize("unit", ["slice", "expert"])
def test_long_replay_keeps_every_structure_bounded(unit, policy):
    """Every container the residency holds (its cache, policy, future view, slots), counted entry by
    entry, stops growing: 3000 steps end no bigger than they were a thousand steps in (the load log
    of the cache, once kept, doubled it)."""
    rng = random.Random(1)
    res = Residency(L, unit, 3, policy=policy, prefetch=True)
    sizes = []
    for i in range(3000):
        experts = sorted(rng.sample(range(E), 2))
        res.plan([experts])
        for layer in range(L):
            res.begin_layer(layer, experts)
            while (job := res.next_load()) is not None:
                res.start_load(job[0], job[1], job[2])
                res.finish_load(job[0])
        if i % 20 == 0:
            sizes.append(bookkeeping_size(res))
    assert res.stats.misses > 1000 and res.stats.evictions > 1000  # the cache really turned over
    n = len(sizes)
    early = max(sizes[n // 4 : n // 2])
    late = max(sizes[3 * n // 4 :])
    assert late <= 1.1 * early, (early, late)
    assert late < 8 * 1024
    assert res.cache.loads == []


def test_streamed_experts_are_loaded_a_layer_ahead_through_their_rings():
    """A step with more experts than the capacity streams the rest. With prefetching and stream rings
    its next layer's slices are wanted (and loaded) while this layer runs, into stream slots; the
    cache's decisions and the bypass count are those of a residency without rings."""
    steps = [[0, 1, 2, 3], [2, 4, 5], [0, 1, 2, 3]]
    runs = {}
    for streams in (0, max_streams(E)):
        res = Residency(L, "expert", 1, policy="belady", prefetch=True, streams=streams)
        res.plan(steps)
        ahead = 0  # streamed slices already in their slot when their layer starts
        for experts in steps:
            for layer in range(L):
                plan = res.begin_layer(layer, experts)
                for e, p in plan.items():
                    if p is not None and p >= res.cache_slots:
                        assert res.pinned[p] == (layer, e)
                        ahead += res.content[p] == (layer, e)
                while (job := res.next_load()) is not None:
                    res.start_load(job[0], job[1], job[2])
                    res.finish_load(job[0])
        runs[streams] = (res, ahead)
    plain, rings = runs[0][0], runs[max_streams(E)][0]
    assert plain.num_slots == L and rings.num_slots == L + (E - 1) * 2  # depth 1: rings of 2 slices
    assert plain.stats == rings.stats and rings.stats.bypass > 0
    # every streamed slice was loaded before its layer began (a later step's first layer in the tail of
    # the step before), but those of the very first layer: k = 1 keeps one of its 4 experts
    assert runs[max_streams(E)][1] == rings.stats.bypass - (len(steps[0]) - 1)
    assert runs[0][1] == 0
    deep = Residency(L, "expert", 1, prefetch=True, depth=10 * L, streams=E - 1)
    assert deep.num_slots == L + (E - 1) * L  # a ring never holds more than the step's L layers
    with pytest.raises(CacheError, match="streams=-1"):
        Residency(L, "expert", 1, prefetch=True, streams=-1)


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_missed_expert_loads_every_layer_as_soon_as_its_slot_is_free(prefetch):
    """With prefetching, a cache slot's loads wait for no horizon: once step 0 has missed expert 1 at
    layer 0, all L of its slices can load while layer 0 runs (the slot is its unit's until evicted).
    Without prefetching only the running layer's slice may load, and a stream slot always waits for
    the horizon (the layers of a ring share it)."""
    res = Residency(L, "expert", 2, policy="belady", prefetch=prefetch, streams=max_streams(E))
    res.plan([[0, 1, 2]])  # k = 2: two experts keep a slot, the third streams
    plan = res.begin_layer(0, [0, 1, 2])
    slotted = sorted(e for e, p in plan.items() if p is not None and p < res.cache_slots)
    assert len(slotted) == 2
    started = []
    while (job := res.next_load()) is not None:
        res.start_load(job[0], job[1], job[2])
        res.finish_load(job[0])
        started.append(job[1:3])
    cached = sorted((layer, e) for layer, e in started if e in slotted)
    streamed = sorted(layer for layer, e in started if e not in slotted)
    if prefetch:
        assert cached == sorted((layer, e) for layer in range(L) for e in slotted)
        assert streamed == [0, 1]  # the running layer and depth 1 ahead, in its ring of 2
    else:  # on demand: the running layer only, and the streamed expert has no ring
        assert cached == [(0, e) for e in slotted] and streamed == []
    assert res.stats.misses == 3 and res.stats.bypass == 1
