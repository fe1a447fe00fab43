"""The simulator and reference strings: torch-free, over the real Scheduler and ExpertCache."""

import random

import pytest

from pregate.eviction import EVICTION_POLICIES, optimal_hits, simulate_cache
from pregate.scheduler import SchedulerConfig
from pregate.sim import (
    CostModel, Residency, SimConfig, SimError, calibrate, hit_ratio_table, llama2_7b_a100, read_references,
    scheduled_steps, simulate, unit_references, write_references,
)
from pregate.workload import WorkloadRequest

L, E = 4, 7


def routed_trace(n=12, seed=0, experts=E, arrivals=False):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, o = rng.randint(2, 20), rng.randint(1, 12)
        # sticky experts (temporal locality, as Read-ME's router has)
        e, pe, oe = rng.randrange(experts), [], []
        for lst, m in ((pe, p), (oe, o)):
            for _ in range(m):
                e = e if rng.random() < 0.7 else rng.randrange(experts)
                lst.append(e)
        out.append(WorkloadRequest(f"r{i}", "", o, rng.uniform(0, 0.05) * i if arrivals else 0.0, p, pe, oe))
    return out


SCHED = SchedulerConfig(token_budget=16, max_running=4)


def test_belady_is_optimal_on_small_reference_strings():
    rng = random.Random(3)
    for _ in range(30):
        steps = [rng.sample(range(5), rng.randint(1, 3)) for _ in range(6)]
        refs = unit_references(steps, 2, "expert")
        for k in (1, 2, 3):
            assert simulate_cache(refs, k, "belady").hits == optimal_hits(refs, k)


@pytest.mark.parametrize("unit", ["expert", "slice"])
def test_belady_beats_every_policy_on_every_trace(unit):
    for seed in range(4):
        steps = scheduled_steps(routed_trace(seed=seed), SCHED)
        table = hit_ratio_table(steps, L, unit, [1, 2, 3, 5] if unit == "expert" else [2, 6, 12])
        for p in EVICTION_POLICIES:
            for k, h in table[p].items():
                assert table["belady"][k] >= h, (p, k, seed)


def test_reference_file_round_trip_and_independent_replay(tmp_path):
    steps = scheduled_steps(routed_trace(), SCHED)
    for unit in ("expert", "slice"):
        path = write_references(tmp_path / f"{unit}.txt", steps, L, E, unit)
        back = read_references(path)
        assert (back.unit, back.num_layers, back.num_experts) == (unit, L, E)
        assert len(back.accesses) == len(unit_references(steps, L, unit))
        ids = back.object_ids()
        ours = unit_references(steps, L, unit)
        assert [o if unit == "expert" else o[0] * E + o[1] for o in ours] == ids
        assert sorted({s for s, _, _ in back.accesses}) == list(range(len(steps)))
    lcs = pytest.importorskip("libcachesim")
    ids = read_references(tmp_path / "expert.txt").object_ids()
    cache, hits = lcs.LRU(3), 0
    for i, obj in enumerate(ids):
        req = lcs.Request()
        req.obj_id, req.obj_size, req.clock_time = obj, 1, i
        hits += bool(cache.get(req))
    assert hits == simulate_cache(ids, 3, "lru").hits


def test_bad_reference_files(tmp_path):
    with pytest.raises(SimError, match="does not exist"):
        read_references(tmp_path / "none.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\n")
    with pytest.raises(SimError, match="first line"):
        read_references(bad)
    bad.write_text("# pregate reference string v1\n# unit=expert num_layers=2 num_experts=3\n0 -1 x\n")
    with pytest.raises(SimError, match=":3:"):
        read_references(bad)


def cost(**kw):
    base = dict(num_layers=L, slice_bytes=1000, bandwidth=1e6, token_layer_s=1e-4, expert_layer_s=1e-3, step_s=1e-3)
    return CostModel(**{**base, **kw})


def test_sim_drives_the_scheduler_and_cache():
    trace = routed_trace()
    steps = scheduled_steps(trace, SCHED)
    r = simulate(trace, cost(), SimConfig(capacity=3, scheduler=SCHED))
    assert r.steps == steps
    assert r.summary["num_requests"] == len(trace)
    assert r.summary["generated_tokens"] == sum(t.output_len for t in trace)
    assert r.cache.hits == simulate_cache(unit_references(steps, L, "expert"), 3, "belady").hits
    # smaller caches are slower; everything resident never stalls
    nl = [simulate(trace, cost(), SimConfig(capacity=k, scheduler=SCHED)).summary["normalized_latency"]["mean"] for k in (1, 3, E)]
    assert nl[0] > nl[1] > nl[2]
    assert simulate(trace, cost(), SimConfig(capacity=E, scheduler=SCHED)).stall_s == pytest.approx(E * L * 1e-3)  # cold start only


def test_prefetch_hides_loads_when_compute_covers_them():
    trace = routed_trace()
    c = cost(expert_layer_s=2e-3)  # a layer computes longer than a slice loads (1 ms)
    for unit, k in (("expert", 2), ("slice", 8)):
        off = simulate(trace, c, SimConfig(capacity=k, unit=unit, scheduler=SCHED))
        on = simulate(trace, c, SimConfig(capacity=k, unit=unit, prefetch=True, depth=2, scheduler=SCHED))
        assert on.stall_s < off.stall_s
        assert on.summary["normalized_latency"]["mean"] < off.summary["normalized_latency"]["mean"]


def test_sim_with_arrivals_runs_online():
    trace = routed_trace(arrivals=True)
    r = simulate(trace, cost(), SimConfig(capacity=2, policy="lru", scheduler=SCHED))
    assert r.summary["num_requests"] == len(trace) and r.summary["ttft"]["mean"] > 0


def test_residency_rejects_a_contradicted_plan():
    res = Residency(L, "slice", 4)
    res.plan([[1, 2]])
    with pytest.raises(SimError, match="plan says"):
        res.begin_layer(0, [3])


def test_calibrate_recovers_coefficients():
    rng = random.Random(0)
    recs = []
    for _ in range(40):
        t, e, rows = rng.randint(1, 64), rng.randint(1, 7), rng.randint(1, 16)
        recs.append({"tokens": t, "experts": e, "rows": rows, "duration": L * (2e-5 * t + 3e-4 * e) + 1e-4 * rows + 5e-3})
    c = calibrate(recs, L, 1000, 1e9)
    assert c.token_layer_s == pytest.approx(2e-5) and c.expert_layer_s == pytest.approx(3e-4)
    assert c.row_s == pytest.approx(1e-4) and c.step_s == pytest.approx(5e-3)


@pytest.mark.parametrize("kw,match", [(dict(bandwidth=0), "bandwidth"), (dict(slice_bytes=0), "slice_bytes"),
                                      (dict(token_layer_s=-1), "token_layer_s")])
def test_bad_cost_model(kw, match):
    with pytest.raises(SimError, match=match):
        cost(**kw)


def test_llama2_preset_shapes():
    c = llama2_7b_a100()
    assert c.num_layers == 32 and 120e6 < c.slice_bytes < 140e6  # ~64M fp16 params per (layer, expert)
    assert 4e-3 < c.load_s < 6e-3


def test_compare_policies_serves_everyone_and_groups_experts():
    from pregate.scheduler import SCHEDULING_POLICIES
    from pregate.sim import compare_policies, format_policy_table

    cost = CostModel(num_layers=L, slice_bytes=1, bandwidth=1.0, token_layer_s=1e-4, expert_layer_s=1e-3, step_s=1e-3)
    trace = routed_trace(n=60, seed=5)
    result = compare_policies(
        trace, cost, SCHEDULING_POLICIES, SchedulerConfig(token_budget=8, max_running=24), rate=200.0
    )
    assert set(result) == set(SCHEDULING_POLICIES)
    for m in result.values():
        assert m["norm_p95"] <= m["norm_max"] and m["throughput"] > 0
    # identical work, so fewer experts per step means less simulated time
    assert result["expert-aware"]["experts_per_step"] < result["decode-first"]["experts_per_step"]
    assert result["expert-aware"]["throughput"] > result["decode-first"]["throughput"]
    table = format_policy_table(result)
    assert "vs decode-first" in table and "expert-aware" in table


def test_cost_model_from_a_bench_serve_json():
    from pregate.sim import cost_from_json

    truth = dict(token=2e-4, expert=3e-3, row=1e-3, step=5e-3)
    rng = random.Random(0)
    steps = []
    for _ in range(40):
        t, e, r = rng.randint(1, 32), rng.randint(1, 7), rng.randint(1, 16)
        steps.append({"duration": L * (t * truth["token"] + e * truth["expert"]) + r * truth["row"] + truth["step"],
                      "tokens": t, "experts": e, "rows": r})
    cost = cost_from_json({"engine_steps": steps, "workload": {"num_layers": L}})
    assert cost.token_layer_s == pytest.approx(truth["token"]) and cost.expert_layer_s == pytest.approx(truth["expert"])
    with pytest.raises(SimError, match="not a cost model"):
        cost_from_json({"policies": {}})


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
