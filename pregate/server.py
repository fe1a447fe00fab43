"""An OpenAI-compatible HTTP server over the engine (`pregate serve`).

Thin by design: decode the request, hand it to the engine loop, encode the answer (JSON, or server-sent
events when `stream` is true). The engine is not thread-safe, so one background thread owns it: HTTP
handlers post commands to its inbox and receive events through an asyncio queue per request.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health.
`serve(...)` (behind `pregate serve`) loads a trained checkpoint and runs this app under uvicorn.
A request that the engine refuses (empty prompt, too long, bad sampling parameters) gets HTTP 400 with an
OpenAI-style error body; the other requests are unaffected. A client that disconnects mid-stream aborts
its request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pregate.engine import Engine, RequestOutput, SamplingParams
from pregate.errors import PregateError
from pregate.scheduler import SchedulerConfig

log = logging.getLogger("pregate.server")
GRACEFUL_S = 10  # seconds open requests get to finish on shutdown (SIGTERM, Ctrl-C)


class EngineStopped(PregateError):
    """The engine thread died, so the server exited; `pregate serve` exits with status 1."""

    exit_status = 1
EVENT_POLL_S = 1.0  # how often a waiting handler checks that the engine thread is still alive


@dataclass
class _Submit:
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
        self._waiting: dict[str, _Submit] = {}  # every admitted request whose end is not yet delivered

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self.inbox.put(None)
        self._thread.join(timeout=timeout)

    def submit(self, prompt, params: SamplingParams, rid: str, loop, events: asyncio.Queue) -> None:
        self.inbox.put(_Submit(prompt, params, rid, loop, events))

    def abort(self, rid: str) -> None:
        self.inbox.put(("abort", rid))

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self.engine.has_work()
                try:
                    while True:
                        cmd = self.inbox.get(block=block, timeout=0.5 if block else None)
                        block = False
                        self._handle(cmd)
                except queue.Empty:
                    pass
                if self.engine.has_work():
                    self._step()
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
                self._waiting.pop(cmd.rid, None)
            cmd.loop.call_soon_threadsafe(cmd.events.put_nowait, ev)

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


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    """An answer in OpenAI's error shape: {"error": {message, type, param, code}}."""
    body = {"message": message, "type": kind, "param": param, "code": str(status)}
    return JSONResponse(status_code=status, content={"error": body})


def _event_error(ev: RequestOutput) -> JSONResponse:
    if ev.internal_error:
        return _error(500, ev.error or "internal error", "server_error")
    return _error(400, ev.error or "bad request")


class BadField(PregateError):
    """A request field with a wrong type or value; `param` names it for OpenAI's error object."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


MAX_STOP_STRINGS = 4  # as OpenAI


def _sampling(body: dict) -> SamplingParams:
    """SamplingParams from the request body; BadField names the field that is wrong."""
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_STRINGS:
            raise BadField("stop", f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        stop = tuple(stop)
    else:
        raise BadField("stop", f"stop must be a string or a list of strings, got {stop!r:.80}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadField("stream", f"stream must be true or false, got {stream!r:.80}")
    fields = {
        "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "seed": body.get("seed"),
    }
    defaults = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "seed": None}
    values = {k: defaults[k] if v is None else v for k, v in fields.items()}
    try:
        return SamplingParams(stop=stop, **values)
    except PregateError as err:
        name = next((k for k in fields if f".{k}=" in str(err)), None)
        if name == "max_tokens" and body.get("max_completion_tokens") is not None:
            name = "max_completion_tokens"
        raise BadField(name, str(err)) from None


def build_app(engine: Engine, model_name: str = "pregate"):
    """The FastAPI application; the engine loop starts with the app and stops with it."""
    from contextlib import asynccontextmanager

    runner = EngineLoop(engine)

    @asynccontextmanager
    async def lifespan(_app):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="pregate", lifespan=lifespan)

    async def run(prompt, body: dict, chat: bool):
        try:
            params = _sampling(body)
        except BadField as err:
            return _error(400, str(err), param=err.param)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        events: asyncio.Queue = asyncio.Queue()
        runner.submit(prompt, params, rid, asyncio.get_running_loop(), events)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def choice(text: str, reason: str | None, delta: bool) -> dict:
            if chat:
                key = "delta" if delta else "message"
                return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": reason}
            return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

        async def next_event() -> RequestOutput:
            # never wait forever: if the engine thread has stopped, no event will come
            while True:
                try:
                    return await asyncio.wait_for(events.get(), timeout=EVENT_POLL_S)
                except asyncio.TimeoutError:
                    if not runner.alive:
                        return RequestOutput(rid, [], "", True, "error", error=runner.error or "the engine stopped",
                                             internal_error=True)

        first = await next_event()
        if first.error is not None:
            return _event_error(first)

        if not body.get("stream"):
            text, ev, completion = first.new_text, first, len(first.new_token_ids)
            while not ev.finished:
                ev = await next_event()
                text += ev.new_text
                completion += len(ev.new_token_ids)
            if ev.error is not None:
                return _event_error(ev)
            n_prompt = len(prompt) if isinstance(prompt, list) else len(engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            return {
                "id": rid, "object": obj, "created": created, "model": model_name,
                "choices": [choice(text, _reason(ev.finish_reason), delta=False)],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion},
            }

        async def sse():
            ev = first
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"
            try:
                while True:
                    if ev.error is not None:  # the request failed mid-stream: say so, then end the stream
                        kind = "server_error" if ev.internal_error else "invalid_request_error"
                        err = {"message": ev.error, "type": kind, "param": None, "code": "500" if ev.internal_error else "400"}
                        yield f"data: {json.dumps({'error': err})}\n\n"
                        break
                    reason = _reason(ev.finish_reason) if ev.finished else None
                    if ev.new_text or ev.finished:
                        payload = {"id": rid, "object": chunk_obj, "created": created, "model": model_name,
                                   "choices": [choice(ev.new_text, reason, delta=True)]}
                        yield f"data: {json.dumps(payload)}\n\n"
                    if ev.finished:
                        break
                    ev = await next_event()
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:  # the client went away: free its slot
                runner.abort(rid)
                raise

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        prompt = body.get("prompt")
        # OpenAI's batch forms: a list of strings, a list of token lists; one of either is one prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                return _error(400, "send one prompt per request (a list of several prompts is not supported)", param="prompt")
            prompt = prompt[0]
        if not isinstance(prompt, (str, list)):
            return _error(400, "prompt must be a string or a list of token ids", param="prompt")
        return await run(prompt, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list of {role, content}")
        tok = engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            return _error(400, "this model's tokenizer has no chat template; use /v1/completions")
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as err:  # a malformed message list is the client's mistake
            return _error(400, f"cannot apply the chat template to these messages: {err}")
        return await run(list(ids), body, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "pregate"}]}

    @app.get("/health")
    async def health():
        if not runner.alive:
            return _error(503, runner.error or "the engine is not running", "server_error")
        return {"status": "ok"}

    app.state.runner = runner

    return app


async def _json_body(request: Request) -> dict | JSONResponse:
    """The request's JSON object, or a 400 answer saying what is wrong with it."""
    try:
        body = await request.json()
    except ValueError as err:
        return _error(400, f"the request body is not valid JSON ({err})")
    if not isinstance(body, dict):
        return _error(400, "the request body must be a JSON object")
    return body


def _reason(reason: str | None) -> str | None:
    """OpenAI's finish reasons: 'stop' (eos or a stop string) or 'length'."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason or "", reason)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, config: SchedulerConfig | None = None,
          router_dir: str | None = None, dtype: str = "bfloat16", model_name: str | None = None,
          resident_experts: int | None = None, prefetch: bool = False) -> None:
    """Serve a trained pregate MoE (`pregate train` output: MoE + router) until interrupted.

    resident_experts k: keep at most k whole routed experts in memory (Belady eviction over the running
    step, the rest read from the checkpoint file when needed; `prefetch` loads the next layers' slices
    while a layer computes). The model then computes in the checkpoint's dtype."""
    import uvicorn
    from transformers import AutoTokenizer

    from pregate.config import parse_dtype
    from pregate.moe import load_moe
    from pregate.router import PreGatingRouter
    from pregate.train import load_router

    import socket

    with socket.socket() as probe:  # fail before loading the model, with a message that says what to do
        # as uvicorn binds: a restart right after a stop must not trip over the old TIME_WAIT connections
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise PregateError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host") from None
    store, weights_dtype = None, parse_dtype(dtype)
    if resident_experts is not None:
        from pregate.store import ExpertStore, StoreConfig

        store = ExpertStore(model_dir, StoreConfig(capacity=resident_experts, prefetch=prefetch))
        if store.dtype != weights_dtype:
            print(f"note: with --resident-experts the model computes in the checkpoint's {store.dtype}, not {dtype}")
        weights_dtype = store.dtype
    moe = load_moe(model_dir, weights_dtype, routed_experts=store is None)  # offloaded: never all in memory
    router = load_router(router_dir or model_dir) if moe.num_experts else None
    if router is not None and not isinstance(router, PreGatingRouter):
        raise PregateError(f"{router_dir or model_dir} holds a layer-wise gate; pre-gating serving needs a router trained without --layerwise")
    if store is not None:
        on_disk = store.slice_bytes * store.num_experts * store.num_layers
        print(f"expert offloading: {store.capacity} of {store.num_experts} experts resident, "
              f"{on_disk / 2**20:.0f} MiB of routed-expert weights read from disk as needed")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(moe, tokenizer, router, config or SchedulerConfig(), expert_store=store)
    name = model_name or Path(model_dir).resolve().name
    print(f"serving {model_dir} as {name!r} on http://{host}:{port}/v1 (policy {engine.scheduler_config.policy}, "
          f"{torch.get_num_threads()} torch threads); Ctrl-C stops", flush=True)
    app = build_app(engine, name)
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACEFUL_S)
    )
    runner = app.state.runner
    runner.on_death = lambda: setattr(server, "should_exit", True)  # a supervisor restarts us on exit 1
    try:
        server.run()
    finally:
        if store is not None:
            store.close()
    if runner.error is not None:
        raise EngineStopped(f"{runner.error}; the server stopped (exit status 1 so a supervisor can restart it)")
