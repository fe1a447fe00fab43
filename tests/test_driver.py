"""The one scheduling loop (`pregate.driver.drive`) on a virtual clock."""

import pytest

from pregate.driver import drive
from pregate.scheduler import Request, Scheduler, SchedulerConfig, StepResult


def test_drive_admits_on_arrival_and_runs_every_request_to_the_end():
    sched = Scheduler(SchedulerConfig(policy="fcfs", token_budget=8, max_running=4))
    now = [0.0]
    admitted, finished, producing = [], [], []

    def run(out):
        now[0] += 1.0  # each step takes one second of virtual time
        producing.extend(it.request_id for it in out.items if it.produces_token)
        return StepResult({it.request_id: 0 for it in out.items if it.produces_token})

    def wait_until(at):
        now[0] = at

    arrivals = [(0.0, Request("a", [0] * 3, 2)), (10.0, Request("b", [0] * 12, 1))]
    drive(
        sched,
        run,
        arrivals,
        clock=lambda: now[0],
        wait_until=wait_until,
        on_arrival=lambda r, at: admitted.append((r.request_id, at, now[0])),
        on_step=lambda out, result, done: finished.extend((r.request_id, now[0]) for r in done),
    )
    # "a" runs at once (prefill + one decode); the clock then jumps to b's arrival, whose 12-token
    # prompt takes two 8-token steps: only the chunk that completes it produces a token
    assert admitted == [("a", 0.0, 0.0), ("b", 10.0, 10.0)]
    assert finished == [("a", 2.0), ("b", 12.0)]
    assert producing == ["a", "a", "b"]
    assert not sched.has_work()


def test_drive_needs_a_way_to_wait_for_a_later_arrival():
    sched = Scheduler(SchedulerConfig())
    with pytest.raises(ValueError, match="wait_until"):
        drive(sched, lambda out: StepResult({}), [(5.0, Request("late", [0], 1))])
