"""Metrics on a fake clock: exact known numbers."""

from __future__ import annotations

import numpy as np
import pytest

from pregate.errors import PregateError
from pregate.metrics import (
    MetricsRecorder,
    RequestMetrics,
    StepRecord,
    describe,
    percentile,
    repeat_spread,
    summarize_run,
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_request_metrics_definitions():
    m = RequestMetrics("a", arrival=1.0, first_token_time=1.5, finish_time=3.5, num_generated=5)
    assert m.ttft == 0.5
    assert m.e2e == 2.5
    assert m.tpot == 0.5  # (3.5 - 1.5) / 4
    assert m.normalized_latency == 0.5  # 2.5 / 5
    one = RequestMetrics("b", 0.0, 0.2, 0.2, 1)
    assert one.tpot is None and one.normalized_latency == pytest.approx(0.2)
    with pytest.raises(PregateError, match="arrival <= first_token_time"):
        RequestMetrics("c", 2.0, 1.0, 3.0, 2)


def test_percentile_linear_interpolation_matches_numpy():
    xs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    assert percentile([10.0, 20.0], 50) == 15.0
    assert percentile([10.0, 20.0, 30.0, 40.0], 95) == pytest.approx(38.5)  # index 2.85
    assert percentile([7.0], 99) == 7.0
    for q in (0, 10, 50, 95, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    with pytest.raises(PregateError, match="empty"):
        percentile([], 50)
    with pytest.raises(PregateError, match="q=101"):
        percentile(xs, 101)
    assert describe([]) is None
    stats = {"mean": 2.0, "p50": 2.0, "p95": pytest.approx(2.9), "p99": pytest.approx(2.98), "max": 3.0}
    assert describe([1.0, 2.0, 3.0]) == stats


def test_recorder_on_fake_clock_gives_exact_summary():
    clock = FakeClock()
    rec = MetricsRecorder(clock=clock)
    rec.on_arrival("a")  # t=0
    clock.t = 1.0
    rec.on_arrival("b")
    rec.on_step(
        0,
        start=0.0,
        num_tokens=10,
        unique_experts=3,
        num_prefill_tokens=10,
        num_decode_tokens=0,
        num_token_rows=1,
    )
    rec.on_token("a")  # first token of a at t=1
    clock.t = 2.0
    rec.on_step(
        1,
        start=1.0,
        num_tokens=6,
        unique_experts=3,
        num_prefill_tokens=5,
        num_decode_tokens=1,
        num_token_rows=2,
    )
    rec.on_token("a")
    rec.on_token("b")  # first token of b at t=2
    clock.t = 3.0
    rec.on_step(
        2,
        start=2.0,
        num_tokens=2,
        unique_experts=1,
        num_prefill_tokens=0,
        num_decode_tokens=2,
        num_token_rows=2,
    )
    rec.on_token("a", n=2)  # a: 4 tokens
    rec.on_token("b")
    ma = rec.on_finish("a")
    clock.t = 5.0
    rec.on_token("b")  # b: 3 tokens
    mb = rec.on_finish("b")
    assert (ma.ttft, ma.e2e, ma.tpot, ma.normalized_latency, ma.num_generated) == (1.0, 3.0, 2 / 3, 0.75, 4)
    assert (mb.ttft, mb.e2e, mb.tpot, mb.normalized_latency, mb.num_generated) == (1.0, 4.0, 1.5, 4 / 3, 3)

    s = rec.summary()
    assert s["num_requests"] == 2 and s["generated_tokens"] == 7
    assert s["makespan"] == 5.0 and s["throughput"] == 7 / 5
    assert s["ttft"] == {"mean": 1.0, "p50": 1.0, "p95": 1.0, "p99": 1.0, "max": 1.0}
    assert s["e2e"]["mean"] == 3.5 and s["e2e"]["p50"] == 3.5 and s["e2e"]["max"] == 4.0
    assert s["e2e"]["p95"] == pytest.approx(3.95)
    assert s["normalized_latency"]["mean"] == pytest.approx((0.75 + 4 / 3) / 2)
    assert s["tpot"]["max"] == 1.5
    assert s["num_steps"] == 3 and s["tokens_per_step_mean"] == 6.0
    assert s["unique_experts_per_step_mean"] == pytest.approx(7 / 3)
    assert s["unique_experts_histogram"] == {1: 1, 3: 2}
    assert s["step_time_mean"] == 1.0
    assert rec.steps[1] == StepRecord(1, 1.0, 2.0, 6, 3, 5, 1, 2)


def test_recorder_explicit_times_and_errors():
    rec = MetricsRecorder(clock=lambda: 100.0)
    rec.on_arrival("a", at=10.0)  # trace arrival time, not the clock
    rec.on_token("a")
    m = rec.on_finish("a")
    assert m.ttft == 90.0 and m.tpot is None
    with pytest.raises(PregateError, match="no on_arrival"):
        rec.on_token("a")
    rec.on_arrival("b")
    with pytest.raises(PregateError, match="twice"):
        rec.on_arrival("b")
    with pytest.raises(PregateError, match="before any on_token"):
        rec.on_finish("b")
    rec.on_abort("b")
    assert [r.request_id for r in rec.requests] == ["a"]
    with pytest.raises(PregateError, match="no finished requests"):
        summarize_run([], [])
    s = summarize_run(rec.requests)
    assert s["tpot"] is None and s["num_steps"] == 0 and s["unique_experts_histogram"] == {}


def test_repeat_spread_takes_one_repeat_as_median_and_flags_far_ones():
    sp = repeat_spread([1.0, 1.3, 0.95], flag=0.2)
    assert sp == {"median": 1.0, "min": 0.95, "max": 1.3, "repeats": [1.0, 1.3, 0.95], "flagged": [1]}
    with pytest.raises(PregateError, match="empty"):
        repeat_spread([], flag=0.2)
