"""Latency metrics: per-request timings, per-step records, summaries. Data with an injected clock.

Definitions (per request): ttft = first_token_time - arrival; e2e = finish_time - arrival;
tpot = (finish_time - first_token_time) / (num_generated - 1), defined for num_generated > 1;
normalized latency = e2e / num_generated (the Read-ME / Orca metric, seconds per generated token).
Percentiles use linear interpolation between closest ranks (numpy's default ``method="linear"``):
p-th percentile of sorted x[0..n-1] is x at fractional index (n - 1) * p / 100. No torch here.

Owns the request and step records, `MetricsRecorder` and `summarize_run` (the one summary the engine,
the simulator and the benchmarks report); imports only `pregate.errors`.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pregate.errors import PregateError


class MetricsError(PregateError):
    """Inconsistent timings or an event for an unknown request."""


@dataclass(frozen=True)
class RequestMetrics:
    """Timings of one finished request (seconds, same clock for all fields)."""

    request_id: str
    arrival: float
    first_token_time: float
    finish_time: float
    num_generated: int

    def __post_init__(self) -> None:
        if self.num_generated < 1:
            raise MetricsError(
                f"request {self.request_id!r}: num_generated={self.num_generated} must be >= 1"
            )
        if not self.arrival <= self.first_token_time <= self.finish_time:
            raise MetricsError(
                f"request {self.request_id!r}: need arrival <= first_token_time <= finish_time, got "
                f"{self.arrival} / {self.first_token_time} / {self.finish_time}"
            )

    @property
    def ttft(self) -> float:
        return self.first_token_time - self.arrival

    @property
    def e2e(self) -> float:
        return self.finish_time - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for a single-token response."""
        if self.num_generated < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_generated - 1)

    @property
    def normalized_latency(self) -> float:
        return self.e2e / self.num_generated


@dataclass(frozen=True)
class StepRecord:
    """One executed step: wall interval and batch composition."""

    step: int
    start: float
    end: float
    num_tokens: int
    unique_experts: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_token_rows: int  # items that produced a token: the LM head's rows (SchedulerOutput's)

    @property
    def duration(self) -> float:
        return self.end - self.start


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) by linear interpolation between closest ranks (numpy "linear")."""
    if not values:
        raise MetricsError("percentile of an empty list is undefined")
    if not 0 <= q <= 100:
        raise MetricsError(f"percentile q={q!r} must be within [0, 100]")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def repeat_spread(values: Sequence[float], flag: float) -> dict:
    """A benchmark setting over its repeats: the median (one of them when their number is odd), min, max,
    the repeats themselves, and the indices of those further than `flag` x median from it."""
    if not values:
        raise MetricsError("repeat_spread of an empty list is undefined")
    med = percentile(values, 50)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "repeats": list(values),
        "flagged": [i for i, v in enumerate(values) if med > 0 and abs(v - med) > flag * med],
    }


def describe(values: Sequence[float]) -> dict[str, float] | None:
    """mean, p50, p95, p99, max of values; None when there are none."""
    if not values:
        return None
    return {
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def summarize_run(metrics: Sequence[RequestMetrics], steps: Sequence[StepRecord] = ()) -> dict:
    """Summary of a run (JSON-serialisable apart from int histogram keys).

    Keys: num_requests, generated_tokens, makespan (first arrival to last finish, s), throughput
    (generated tokens / makespan, tok/s; None if makespan is 0), ttft / tpot / e2e / normalized_latency
    (each ``describe``: mean, p50, p95, p99, max; tpot over requests with > 1 token, None if none),
    num_steps, tokens_per_step_mean, unique_experts_per_step_mean, unique_experts_histogram
    ({unique experts: number of steps}, ascending), step_time_mean (s).
    """
    if not metrics:
        raise MetricsError("no finished requests to summarize; run the workload first")
    generated = sum(m.num_generated for m in metrics)
    makespan = max(m.finish_time for m in metrics) - min(m.arrival for m in metrics)
    tpots = [t for m in metrics if (t := m.tpot) is not None]
    n_steps = len(steps)
    return {
        "num_requests": len(metrics),
        "generated_tokens": generated,
        "makespan": makespan,
        "throughput": generated / makespan if makespan > 0 else None,
        "ttft": describe([m.ttft for m in metrics]),
        "tpot": describe(tpots),
        "e2e": describe([m.e2e for m in metrics]),
        "normalized_latency": describe([m.normalized_latency for m in metrics]),
        "num_steps": n_steps,
        "tokens_per_step_mean": sum(s.num_tokens for s in steps) / n_steps if n_steps else None,
        "unique_experts_per_step_mean": sum(s.unique_experts for s in steps) / n_steps if n_steps else None,
        "unique_experts_histogram": dict(sorted(Counter(s.unique_experts for s in steps).items())),
        "step_time_mean": sum(s.duration for s in steps) / n_steps if n_steps else None,
    }


class MetricsRecorder:
    """Collects request and step events as the engine (or simulator) produces them.

    Times come from ``clock`` (default time.perf_counter; the simulator passes its virtual clock, tests a
    fake one) unless given explicitly with ``at=``. Call order per request: on_arrival, on_token (one call
    per generated token or a count), on_finish.

    keep: remember only the last ``keep`` finished requests and steps (a long-running server); None keeps
    every one (a benchmark summarises the whole run).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, keep: int | None = None) -> None:
        self.clock = clock
        self._arrival: dict[str, float] = {}
        self._first: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self.requests: deque[RequestMetrics] = deque(maxlen=keep)  # finished, in finish order
        self.steps: deque[StepRecord] = deque(maxlen=keep)

    def _t(self, at: float | None) -> float:
        return self.clock() if at is None else at

    def _live(self, rid: str, event: str) -> None:
        if rid not in self._arrival:
            raise MetricsError(f"{event} for request {rid!r}, which has no on_arrival (or already finished)")

    def on_arrival(self, rid: str, at: float | None = None) -> None:
        if rid in self._arrival:
            raise MetricsError(f"on_arrival for request {rid!r} twice; request ids must be unique")
        self._arrival[rid] = self._t(at)
        self._count[rid] = 0

    def on_token(self, rid: str, n: int = 1, at: float | None = None) -> None:
        """``n`` new tokens of request rid became available now (the first call sets the TTFT)."""
        self._live(rid, "on_token")
        if n < 1:
            raise MetricsError(f"on_token n={n!r} must be >= 1")
        self._first.setdefault(rid, self._t(at))
        self._count[rid] += n

    def on_finish(self, rid: str, at: float | None = None) -> RequestMetrics:
        self._live(rid, "on_finish")
        if self._count[rid] == 0:
            raise MetricsError(f"on_finish for request {rid!r} before any on_token; use on_abort to drop it")
        m = RequestMetrics(
            rid, self._arrival.pop(rid), self._first.pop(rid), self._t(at), self._count.pop(rid)
        )
        self.requests.append(m)
        return m

    def on_abort(self, rid: str) -> None:
        """Forget an unfinished request (client gone); it is not part of the summary."""
        self._live(rid, "on_abort")
        for d in (self._arrival, self._first, self._count):
            d.pop(rid, None)

    def on_step(
        self,
        step: int,
        start: float,
        num_tokens: int,
        unique_experts: int,
        num_prefill_tokens: int,
        num_decode_tokens: int,
        num_token_rows: int,
        end: float | None = None,
    ) -> StepRecord:
        """Record a step that began at ``start`` (read ``clock()`` before running it) and ends now."""
        rec = StepRecord(
            step,
            start,
            self._t(end),
            num_tokens,
            unique_experts,
            num_prefill_tokens,
            num_decode_tokens,
            num_token_rows,
        )
        self.steps.append(rec)
        return rec

    def summary(self) -> dict:
        return summarize_run(self.requests, self.steps)
