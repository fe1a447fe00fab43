"""The one loop that runs a Scheduler to the end: admit what has arrived, schedule a step, run it, update.

The simulator (`sim.simulate`, `sim.scheduled_steps`) and the cache benchmark's measured replay
(`cache_bench.replay_teacher_forced`) each supply only a `StepRunner` (what a step costs or computes) and
a clock; the scheduling is this loop for all of them. The engine runs one step at a time for a server
(`Engine.step`) with the same schedule -> run -> update order. Imports only `scheduler`: no torch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from pregate.scheduler import Request, Scheduler, SchedulerOutput, StepResult


class StepRunner(Protocol):
    def __call__(self, out: SchedulerOutput) -> StepResult:
        """Execute one scheduled step (compute it, or advance a virtual clock by its cost) and report
        the experts of the tokens it sampled. Called before the scheduler is updated."""
        ...


def drive(
    scheduler: Scheduler,
    run: StepRunner,
    arrivals: Iterable[tuple[float, Request]] = (),
    clock: Callable[[], float] = lambda: 0.0,
    wait_until: Callable[[float], None] | None = None,
    on_arrival: Callable[[Request, float], None] | None = None,
    on_step: Callable[[SchedulerOutput, StepResult, list[Request]], None] | None = None,
) -> None:
    """Run `scheduler` until every request of `arrivals` (arrival time, request) has finished.

    A request is admitted once clock() reaches its arrival time; when nothing is runnable,
    wait_until(next arrival) must move the clock there. on_step(out, result, finished) sees each step
    after the scheduler's update, with the requests it finished."""
    pending = deque(sorted(arrivals, key=lambda a: a[0]))
    while pending or scheduler.has_work():
        while pending and pending[0][0] <= clock():
            at, request = pending.popleft()
            scheduler.add_request(request, now=at)
            if on_arrival is not None:
                on_arrival(request, at)
        if not scheduler.has_work():
            if wait_until is None:
                raise ValueError("drive: requests arrive later, but no wait_until moves the clock")
            wait_until(pending[0][0])
            continue
        out = scheduler.schedule()
        result = run(out)
        finished = scheduler.update(out, result)
        if on_step is not None:
            on_step(out, result, finished)
