"""The simulator and its cost model: torch-free, over the real Scheduler and ExpertCache."""

import random
import subprocess
import sys
from dataclasses import replace

import pytest

from pregate.eviction import EVICTION_POLICIES, simulate_cache, unit_references
from pregate.scheduler import SchedulerConfig
from pregate.sim import (
    CostModel,
    SimConfig,
    SimError,
    calibrate,
    fit_check,
    hit_ratio_table,
    llama2_7b_a100,
    scheduled_steps,
    simulate,
    step_time,
)
from tests.conftest import routed_trace

L, E = 4, 7
SCHED = SchedulerConfig(token_budget=16, max_running=4)


def test_simulator_and_reference_files_do_not_import_torch():
    code = "import sys, pregate.sim, pregate.references; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("unit", ["expert", "slice"])
def test_belady_beats_every_policy_on_every_trace(unit):
    for seed in range(4):
        steps = scheduled_steps(routed_trace(seed=seed), SCHED)
        table = hit_ratio_table(steps, L, unit, [1, 2, 3, 5] if unit == "expert" else [2, 6, 12])
        for p in EVICTION_POLICIES:
            for k, h in table[p].items():
                assert table["belady"][k] >= h, (p, k, seed)


def cost(**kw):
    base = dict(
        num_layers=L, slice_bytes=1000, bandwidth=1e6, token_layer_s=1e-4, expert_layer_s=1e-3, step_s=1e-3
    )
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
    nl = [
        simulate(trace, cost(), SimConfig(capacity=k, scheduler=SCHED)).summary["normalized_latency"]["mean"]
        for k in (1, 3, E)
    ]
    assert nl[0] > nl[1] > nl[2]
    assert simulate(trace, cost(), SimConfig(capacity=E, scheduler=SCHED)).stall_s == pytest.approx(
        E * L * 1e-3
    )  # cold start only


def test_the_lm_head_is_charged_once_per_token_produced():
    """row_s per item that produces a token (the engine's logits rows), not per prompt chunk: with only
    that term, the simulated time less its loads is row_s x the tokens generated, however the prompts
    are chunked."""
    trace = routed_trace()
    zero = dict(token_layer_s=0.0, expert_layer_s=0.0, step_s=0.0, row_s=1e-3)
    chunked = SchedulerConfig(token_budget=16, max_running=4, prefill_chunk=3)  # prompts of many chunks
    r = simulate(trace, cost(**zero), SimConfig(capacity=E, scheduler=chunked))
    assert sum(r.step_times) - r.stall_s == pytest.approx(1e-3 * sum(t.output_len for t in trace))


def test_prefetch_hides_loads_when_compute_covers_them():
    trace = routed_trace()
    c = cost(expert_layer_s=2e-3)  # a layer computes longer than a slice loads (1 ms)
    for unit, k in (("expert", 2), ("slice", 8)):
        off = simulate(trace, c, SimConfig(capacity=k, unit=unit, scheduler=SCHED))
        on = simulate(trace, c, SimConfig(capacity=k, unit=unit, prefetch=True, depth=2, scheduler=SCHED))
        assert on.stall_s < off.stall_s
        assert on.summary["normalized_latency"]["mean"] < off.summary["normalized_latency"]["mean"]


def test_prefetch_streams_what_the_cache_cannot_hold():
    """k = 1: most of every step's experts stream. Their next layer's slices load while a layer
    computes (stream rings), so with compute covering the loads almost no stall is left."""
    trace = routed_trace()
    c = cost(expert_layer_s=2e-3)
    off = simulate(trace, c, SimConfig(capacity=1, scheduler=SCHED))
    on = simulate(trace, c, SimConfig(capacity=1, prefetch=True, scheduler=SCHED))
    assert on.cache.bypass == off.cache.bypass > 0 and on.loads == off.loads
    assert on.stall_s < 0.1 * off.stall_s


def test_a_prefetched_load_costs_the_compute_its_copy_time():
    """copy_s: each slice the link loads ahead takes that long from the compute (the CPU tier's loader
    shares the cores); a load on demand, which the compute waits for anyway, costs nothing more."""
    trace = routed_trace()
    for prefetch in (False, True):
        cfg = SimConfig(capacity=2, prefetch=prefetch, depth=2, scheduler=SCHED)
        free, paid = simulate(trace, cost(), cfg), simulate(trace, cost(copy_s=2e-4), cfg)
        assert paid.steps == free.steps and paid.loads == free.loads
        assert paid.prefetched == (free.prefetched if prefetch else 0)
        # the extra time is the copies, less the stall they hid (the link ran on meanwhile)
        extra = sum(paid.step_times) - sum(free.step_times)
        assert extra == pytest.approx(2e-4 * paid.prefetched - (free.stall_s - paid.stall_s))
    assert paid.prefetched > 0


def test_sim_with_arrivals_runs_online():
    trace = routed_trace(arrivals=True)
    r = simulate(trace, cost(), SimConfig(capacity=2, policy="lru", scheduler=SCHED))
    assert r.summary["num_requests"] == len(trace) and r.summary["ttft"]["mean"] > 0


def _steps(rng, n, noise=0.0):
    out = []
    for _ in range(n):
        t, e, rows = rng.randint(1, 64), rng.randint(1, 7), rng.randint(1, 16)
        exact = L * (2e-5 * t + 3e-4 * e) + 1e-4 * rows + 5e-3
        out.append(
            {"tokens": t, "experts": e, "rows": rows, "duration": exact * (1 + rng.uniform(-noise, noise))}
        )
    return out


def test_fit_check_predicts_held_out_runs():
    rng = random.Random(1)
    exact = fit_check([_steps(rng, 30) for _ in range(3)], L)
    assert exact["runs"] == 3 and exact["steps"] == 90
    assert exact["step_error_p90"] < 1e-9 and all(abs(e) < 1e-9 for e in exact["total_error_by_run"])
    noisy = fit_check([_steps(rng, 200, noise=0.2) for _ in range(3)], L)
    assert 0.05 < noisy["step_error_median"] < 0.15 < noisy["step_error_p90"] < 0.2  # uniform +-20 %
    assert all(abs(e) < 0.03 for e in noisy["total_error_by_run"])  # the noise averages out over a run
    slow = _steps(rng, 30)  # a run on a disturbed machine: every step 30 % slower
    for r in slow:
        r["duration"] *= 1.3
    check = fit_check([slow, _steps(rng, 30), _steps(rng, 30)], L)
    assert check["total_error_by_run"][0] == pytest.approx(1 / 1.3 - 1, abs=0.01)
    with pytest.raises(SimError, match="at least 2"):
        fit_check([_steps(rng, 30)], L)


def test_calibrate_refits_without_a_term_the_data_would_make_negative():
    """Rows that make steps *faster* (as prefill-heavy steps do against decode rows at a large budget):
    the rows term is 0 and the others are the best fit without it, not a clipped unconstrained fit."""
    import numpy as np

    rng = random.Random(2)
    recs = []
    for _ in range(60):
        t, e, rows = rng.randint(1, 64), rng.randint(1, 7), rng.randint(1, 16)
        d = L * (2e-5 * t + 3e-4 * e) - 2e-4 * rows + 5e-3 + rng.uniform(0, 1e-3)
        recs.append({"tokens": t, "experts": e, "rows": rows, "duration": d})
    c = calibrate(recs, L, 1000, 1e9)
    assert c.row_s == 0 and c.token_layer_s > 0 and c.expert_layer_s > 0

    def sse(coef):
        return sum((step_time(coef, r) - r["duration"]) ** 2 for r in recs)

    a = np.array([[L * r["tokens"], L * r["experts"], r["rows"], 1.0] for r in recs])
    raw = np.clip(np.linalg.lstsq(a, np.array([r["duration"] for r in recs]), rcond=None)[0], 0, None)
    clipped = replace(c, token_layer_s=raw[0], expert_layer_s=raw[1], row_s=raw[2], step_s=raw[3])
    assert raw[2] == 0 and sse(c) < sse(clipped)
    # mean residual ~0 (unbiased), where the clipped fit overpredicts every step
    assert abs(sum(step_time(c, r) - r["duration"] for r in recs)) / len(recs) < 2e-4
    assert all(step_time(clipped, r) > r["duration"] - 1e-3 for r in recs)


def test_calibrate_recovers_coefficients():
    rng = random.Random(0)
    recs = []
    for _ in range(40):
        t, e, rows = rng.randint(1, 64), rng.randint(1, 7), rng.randint(1, 16)
        recs.append(
            {
                "tokens": t,
                "experts": e,
                "rows": rows,
                "duration": L * (2e-5 * t + 3e-4 * e) + 1e-4 * rows + 5e-3,
            }
        )
    c = calibrate(recs, L, 1000, 1e9)
    assert c.token_layer_s == pytest.approx(2e-5) and c.expert_layer_s == pytest.approx(3e-4)
    assert c.row_s == pytest.approx(1e-4) and c.step_s == pytest.approx(5e-3)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(bandwidth=0), "bandwidth"),
        (dict(slice_bytes=0), "slice_bytes"),
        (dict(token_layer_s=-1), "token_layer_s"),
        (dict(copy_s=-1), "copy_s"),
    ],
)
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

    cost = CostModel(
        num_layers=L, slice_bytes=1, bandwidth=1.0, token_layer_s=1e-4, expert_layer_s=1e-3, step_s=1e-3
    )
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
        steps.append(
            {
                "duration": L * (t * truth["token"] + e * truth["expert"]) + r * truth["row"] + truth["step"],
                "tokens": t,
                "experts": e,
                "rows": r,
            }
        )
    cost = cost_from_json({"engine_steps": steps, "workload": {"num_layers": L}})
    assert cost.token_layer_s == pytest.approx(truth["token"]) and cost.expert_layer_s == pytest.approx(
        truth["expert"]
    )
    with pytest.raises(SimError, match="not a cost model"):
        cost_from_json({"policies": {}})
