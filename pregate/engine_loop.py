"""The thread that owns the engine for the HTTP server: commands come in through an inbox, events go
out to one asyncio queue per request.

The engine is not thread-safe, so nothing else touches it. When it has been idle for a whole poll after
work, the thread gives the memory that work freed back to the OS (`pregate.heap`), so a server's RSS
falls back after a burst. Imports `engine`, `heap` and `errors` only.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pregate import heap
from pregate.engine import Engine, RequestOutput, SamplingParams
from pregate.errors import PregateError

log = logging.getLogger("pregate.server")


class EngineStopped(PregateError):
    """The engine thread died, so the server exited; `pregate serve` exits with status 1."""

    exit_status = 1


EVENT_POLL_S = 0.5  # how often a waiting handler checks that the engine thread is still alive
IDLE_POLL_S = 0.5  # an idle engine thread wakes this often; idle a whole poll after work, it trims the heap


@dataclass
class Submission:
    prompt: Any
    params: SamplingParams
    rid: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue


class EngineLoop:
    """Runs `engine.step()` on its own thread while there is work; commands arrive through an inbox.

    Nothing a request does can end this thread: a request the engine refuses fails alone (400), an
    unexpected error while adding one fails it alone (500), and the engine confines an error inside a
    step to that step's requests. If the thread ever stops anyway, `error` says why, every request still
    waiting gets an error event, and `on_death` (the server's exit hook) is called.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.error: str | None = None  # why the engine thread stopped; None while it is healthy
        self.on_death: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pregate-engine", daemon=True)
        self._waiting: dict[str, Submission] = {}  # every admitted request whose end is not yet delivered
        self._posted = 0  # submits in the inbox, not yet handled
        self._count_lock = threading.Lock()
        self._stepped = False  # a step ran since the heap was last trimmed
        self.trims = 0  # times freed memory went back to the OS (pregate.heap)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self.inbox.put(None)
        self._thread.join(timeout=timeout)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet ended (queued in the inbox, waiting or running in the engine)."""
        with self._count_lock:
            return self._posted + len(self._waiting)

    def submit(self, prompt, params: SamplingParams, rid: str, loop, events: asyncio.Queue) -> None:
        with self._count_lock:
            self._posted += 1
        self.inbox.put(Submission(prompt, params, rid, loop, events))

    def abort(self, rid: str) -> None:
        self.inbox.put(("abort", rid))

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self.engine.has_work()
                try:
                    while True:
                        cmd = self.inbox.get(block=block, timeout=IDLE_POLL_S if block else None)
                        block = False
                        self._handle(cmd)
                except queue.Empty:
                    if block and self._stepped:  # idle a whole poll since the last step: return its memory
                        self.trims += heap.trim()
                        self._stepped = False
                if self.engine.has_work():
                    self._step()
                    self._stepped = True
        except BaseException as err:  # the engine itself is broken: say so, answer everyone, exit
            self.error = f"the engine stopped: {type(err).__name__}: {err}"
            log.exception("engine thread stopped")
        finally:
            self._drain()
            if self.error is not None and self.on_death is not None:
                self.on_death()

    def _step(self) -> None:
        try:
            self.engine.step()  # confines an error inside the step to that step's requests
        except Exception as err:  # the guard itself failed: end every request, keep serving new ones
            log.exception("engine step failed outside its own guard")
            self.engine.fail_all(f"internal error: {type(err).__name__}: {err}")

    def _handle(self, cmd) -> None:
        if cmd is None:
            return
        if isinstance(cmd, tuple) and cmd[0] == "abort":
            try:
                self.engine.abort(cmd[1])
            except Exception:  # an abort that fails leaves the request to finish on its own
                log.exception("aborting request %s failed", cmd[1])
            return

        def deliver(ev: RequestOutput, cmd=cmd) -> None:
            if ev.finished:
                with self._count_lock:
                    self._waiting.pop(cmd.rid, None)
            cmd.loop.call_soon_threadsafe(cmd.events.put_nowait, ev)

        with self._count_lock:
            self._posted -= 1
            self._waiting[cmd.rid] = cmd
        try:
            self.engine.add_request(cmd.prompt, cmd.params, request_id=cmd.rid, callback=deliver)
        except PregateError as err:
            deliver(RequestOutput(cmd.rid, [], "", True, "error", error=str(err)))
        except Exception as err:  # our bug, found by this request: it alone fails
            log.exception("adding request %s failed", cmd.rid)
            message = f"internal error: {type(err).__name__}: {err}"
            deliver(RequestOutput(cmd.rid, [], "", True, "error", error=message, internal_error=True))

    def _drain(self) -> None:
        """Give every request still waiting an error event, so no handler waits forever."""
        message = self.error or "the server is shutting down"
        for rid, cmd in list(self._waiting.items()):
            ev = RequestOutput(rid, [], "", True, "error", error=message, internal_error=True)
            try:
                cmd.loop.call_soon_threadsafe(cmd.events.put_nowait, ev)
            except RuntimeError:
                pass  # that handler's event loop is already closed
        self._waiting.clear()
