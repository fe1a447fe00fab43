"""An OpenAI-compatible HTTP server over the engine (`pregate serve`).

Thin by design: decode the request, hand it to the engine loop, encode the answer (JSON, or server-sent
events when `stream` is true). The engine is not thread-safe, so one background thread owns it: HTTP
handlers post commands to its inbox and receive events through an asyncio queue per request.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health.
`pregate.launch.serve` (behind `pregate serve`) loads a trained checkpoint and runs this app under
uvicorn; `pregate.engine_loop` is the thread that owns the engine.

Every refusal is in OpenAI's error shape {"error": {message, type, param, code}}, 404/405 included:
Host (400) and API key (401) before any route; then Content-Type (415), body size (413, before parsing),
JSON and nesting (400); then the fields (`pregate.protocol`: 400 naming the field, 404 for an unknown
model); then the queue bound (429 with Retry-After); then the engine's own checks (400). A request with
n choices (or OpenAI's batch prompt forms) runs one engine sequence per choice. Prompts are tokenized
off the event loop. A client that disconnects aborts its request, streaming or not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pregate.engine import Engine, RequestOutput
from pregate.engine_loop import EVENT_POLL_S, EngineLoop
from pregate.errors import PregateError
from pregate.protocol import (
    ApiRequest,
    BadField,
    chat_logprobs,
    check_depth,
    completion_logprobs,
    parse_chat,
    parse_completion,
)


def _error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict | None = None,
):
    """An answer in OpenAI's error shape: {"error": {message, type, param, code}}."""
    body = {"message": message, "type": kind, "param": param, "code": str(status)}
    return JSONResponse(status_code=status, content={"error": body}, headers=headers)


def _event_error(ev: RequestOutput) -> JSONResponse:
    if ev.internal_error:
        return _error(500, ev.error or "internal error", "server_error")
    return _error(400, ev.error or "bad request")


@dataclass(frozen=True)
class ServerLimits:
    """What the HTTP layer refuses before the engine sees a request (`pregate serve` flags).

    max_body_bytes: larger bodies get 413 before they are parsed. max_queued: sequences (choices) that
    may wait beyond the engine's max_running; more get 429 with Retry-After. api_key: when set, every
    route but /health needs `Authorization: Bearer <key>` (401 otherwise). cors_origins: origins allowed
    to call from a browser (none by default). allowed_hosts: Host header names accepted (None: any;
    `serve` sets the loopback names when bound to loopback, against DNS rebinding). docs: /docs, /redoc
    and /openapi.json are served only when true.
    """

    max_body_bytes: int = 1 << 20
    max_queued: int = 256
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: frozenset[str] | None = None
    docs: bool = False

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise PregateError(f"ServerLimits.max_body_bytes={self.max_body_bytes} must be >= 1")
        if self.max_queued < 0:
            raise PregateError(f"ServerLimits.max_queued={self.max_queued} must be >= 0")
        if self.api_key is not None and not self.api_key:
            raise PregateError("ServerLimits.api_key is empty; give a key or none")


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class _Guard:
    """ASGI middleware: the Host check and the API key, before any route (404s included)."""

    def __init__(self, app, limits: ServerLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, scope, headers: dict) -> JSONResponse | None:
        hosts = self.limits.allowed_hosts
        if hosts is not None:
            host = headers.get("host", "")
            name = (
                host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
            )
            if name.lower() not in hosts:
                return _error(400, f"Host {host!r:.80} is not allowed; this server answers {sorted(hosts)}")
        key = self.limits.api_key
        if key is not None and scope["path"] != "/health" and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return _error(
                    401,
                    "missing or wrong API key; send Authorization: Bearer <key>",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return None


class _Refused(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


async def _read_json(request: Request, limit: int) -> dict:
    """The request's JSON object, checked in this order: Content-Type (415), size (413, counted as it
    arrives, before parsing), JSON syntax and nesting (400)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise _Refused(_error(415, f"Content-Type must be application/json, got {kind or 'none'!r}"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Refused(_error(413, f"the request body is {declared} bytes; at most {limit} are accepted"))
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise _Refused(
                _error(413, f"the request body is over {limit} bytes; at most {limit} are accepted")
            )
    try:
        body = json.loads(bytes(raw))
    except RecursionError:
        raise _Refused(_error(400, "the request body is nested too deeply")) from None
    except ValueError as err:
        raise _Refused(_error(400, f"the request body is not valid JSON ({err})")) from None
    if not isinstance(body, dict):
        raise _Refused(_error(400, "the request body must be a JSON object"))
    try:
        check_depth(body)
    except BadField as err:
        raise _Refused(_error(400, str(err))) from None
    return body


@dataclass
class _Choice:
    """One sequence of a request, as its events arrive."""

    index: int
    prompt: int  # which prompt of the request
    text: str = ""
    tokens: int = 0
    logprobs: list = field(default_factory=list)  # TokenLogprob of each generated token
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    started: bool = False
    done: bool = False


def build_app(engine: Engine, model_name: str = "pregate", limits: ServerLimits | None = None):
    """The FastAPI application; the engine loop starts with the app and stops with it."""
    from contextlib import asynccontextmanager

    limits = limits or ServerLimits()
    runner = EngineLoop(engine)
    tokenize_pool = ThreadPoolExecutor(
        1, thread_name_prefix="pregate-tokenize"
    )  # one: HF tokenizers are not re-entrant
    tok = engine.tokenizer
    capacity = engine.scheduler_config.max_running + limits.max_queued

    @asynccontextmanager
    async def lifespan(_app):
        runner.start()
        yield
        runner.stop()
        tokenize_pool.shutdown(wait=False)

    docs = {} if limits.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="pregate", lifespan=lifespan, **docs)
    app.add_middleware(_Guard, limits=limits)
    if limits.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(limits.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(_Refused)
    async def refused(_request, exc: _Refused):
        return exc.response

    def encode_text(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def encode_chat(messages) -> list[int]:
        return list(
            tok.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )

    async def prompt_ids(req: ApiRequest) -> list[list[int]]:
        """Token ids of every prompt, tokenized off the event loop."""
        loop = asyncio.get_running_loop()
        if req.chat:
            if tok is None or not getattr(tok, "chat_template", None):
                raise BadField("messages", "this model's tokenizer has no chat template; use /v1/completions")
            try:
                return [await loop.run_in_executor(tokenize_pool, encode_chat, req.messages)]
            except Exception as err:  # a malformed message list is the client's mistake
                raise BadField(
                    "messages", f"cannot apply the chat template to these messages: {err}"
                ) from None
        out = []
        for p in req.prompts:
            if isinstance(p, str):
                if tok is None:
                    raise BadField("prompt", "this engine has no tokenizer; send token ids")
                out.append(await loop.run_in_executor(tokenize_pool, encode_text, p))
            else:
                out.append(list(p))
        return out

    async def run(request: Request, chat: bool):
        body = await _read_json(request, limits.max_body_bytes)
        try:
            req = parse_chat(body, model_name) if chat else parse_completion(body, model_name)
            ids = await prompt_ids(req)
        except BadField as err:
            return _error(err.status, str(err), param=err.param)
        choices = [_Choice(p * req.n + j, p) for p in range(len(ids)) for j in range(req.n)]
        if runner.in_flight + len(choices) > capacity:
            return _error(
                429,
                f"the server is full ({capacity} requests queued or running); retry shortly",
                "rate_limit_error",
                headers={"Retry-After": "1"},
            )
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        events: asyncio.Queue = asyncio.Queue()
        by_rid = {f"{rid}-{c.index}": c for c in choices}
        loop = asyncio.get_running_loop()
        for sub, c in by_rid.items():
            runner.submit(ids[c.prompt], req.choice_params(c.index % req.n), sub, loop, events)
        created = int(time.time())
        n_prompt = sum(len(x) for x in ids)
        echo = (
            [(tok.decode(x) if isinstance(p, tuple) else p) for p, x in zip(req.prompts, ids)]
            if req.echo
            else None
        )

        checked = [time.monotonic()]  # when the client's connection was last checked

        def abort_all() -> None:
            for sub, c in by_rid.items():
                if not c.done:
                    runner.abort(sub)

        async def next_event(watch_client: bool) -> tuple[_Choice, RequestOutput] | None:
            """The next event of any choice; None when a non-streaming client has gone (all aborted)."""
            while True:
                if watch_client and time.monotonic() >= checked[0] + EVENT_POLL_S:
                    checked[0] = time.monotonic()
                    if await request.is_disconnected():
                        abort_all()
                        return None
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=EVENT_POLL_S)
                    return by_rid[ev.request_id], ev
                except asyncio.TimeoutError:
                    if not runner.alive:  # the engine thread has stopped: no event will come
                        err = runner.error or "the engine stopped"
                        c = next(c for c in choices if not c.done)
                        return c, RequestOutput("", [], "", True, "error", error=err, internal_error=True)

        def absorb(c: _Choice, ev: RequestOutput) -> None:
            c.started = True
            c.text += ev.new_text
            c.tokens += len(ev.new_token_ids)
            c.logprobs += ev.logprobs or []
            if ev.prompt_logprobs is not None:
                c.prompt_logprobs = ev.prompt_logprobs
            if ev.finished:
                c.done, c.finish_reason = True, _reason(ev.finish_reason)

        def logprobs_of(c: _Choice, new: list, start: int, echoed: str) -> dict | None:
            """The completions logprobs object of a chunk: the echoed prompt's tokens (if any), then `new`."""
            if req.logprobs is None:
                return None
            scored = c.prompt_logprobs or [None] * len(ids[c.prompt])
            prompt = list(zip(ids[c.prompt], scored)) if echoed else []
            return completion_logprobs(tok, prompt, new, start, len(echoed))

        def usage() -> dict:
            completion = sum(c.tokens for c in choices)
            return {
                "prompt_tokens": n_prompt,
                "completion_tokens": completion,
                "total_tokens": n_prompt + completion,
            }

        obj = "chat.completion" if chat else "text_completion"

        # every choice's first event (its first token, or why it failed) before any answer
        async def next_or_answer():
            """(choice, event), or (None, the answer) when the client left or a choice failed."""
            got = await next_event(watch_client=True)  # a client may leave while it is queued
            if got is None:
                return None, _error(499, "the client closed the request")
            c, ev = got
            if ev.error is not None:
                abort_all()
                return None, _event_error(ev)
            return c, ev

        early: list[tuple[_Choice, RequestOutput]] = []
        while not all(c.started for c in choices):
            c, ev = await next_or_answer()
            if c is None:
                return ev
            c.started = True
            early.append((c, ev))

        if not req.stream:
            for c, ev in early:
                absorb(c, ev)
            while not all(c.done for c in choices):
                c, ev = await next_or_answer()
                if c is None:
                    return ev
                absorb(c, ev)
            out = []
            for c in choices:
                if chat:
                    lp = chat_logprobs(tok, c.logprobs) if req.logprobs is not None else None
                    out.append(
                        {
                            "index": c.index,
                            "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp,
                            "finish_reason": c.finish_reason,
                        }
                    )
                else:
                    head = echo[c.prompt] if echo else ""
                    lp = logprobs_of(c, c.logprobs, 0, head)
                    out.append(
                        {
                            "index": c.index,
                            "text": head + c.text,
                            "logprobs": lp,
                            "finish_reason": c.finish_reason,
                        }
                    )
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model_name,
                "choices": out,
                "usage": usage(),
            }

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        text_pos = {c.index: 0 for c in choices}  # characters sent per choice (for text_offset)

        def chunk(c: _Choice, ev: RequestOutput) -> str | None:
            first_echo = bool(echo) and ev is early_first.get(c.index)
            new_lp = ev.logprobs or []
            if not (ev.new_text or ev.finished or new_lp or first_echo):
                return None
            reason = _reason(ev.finish_reason) if ev.finished else None
            if chat:
                delta = {"role": "assistant", "content": ev.new_text}
                lp = chat_logprobs(tok, new_lp) if req.logprobs is not None else None
                body = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": reason}
            else:
                head = echo[c.prompt] if first_echo else ""
                lp = logprobs_of(c, new_lp, text_pos[c.index], head)
                text_pos[c.index] += len(head) + len(ev.new_text)
                body = {"index": c.index, "text": head + ev.new_text, "logprobs": lp, "finish_reason": reason}
            payload = {
                "id": rid,
                "object": chunk_obj,
                "created": created,
                "model": model_name,
                "choices": [body],
            }
            return f"data: {json.dumps(payload)}\n\n"

        early_first = {c.index: ev for c, ev in early}

        async def sse():
            pending = list(early)
            try:
                while True:
                    if pending:
                        c, ev = pending.pop(0)
                    else:
                        c, ev = await next_event(watch_client=False)
                    if ev.error is not None:  # the request failed mid-stream: say so, then end the stream
                        abort_all()
                        kind = "server_error" if ev.internal_error else "invalid_request_error"
                        err = {
                            "message": ev.error,
                            "type": kind,
                            "param": None,
                            "code": "500" if ev.internal_error else "400",
                        }
                        yield f"data: {json.dumps({'error': err})}\n\n"
                        break
                    absorb(c, ev)
                    text = chunk(c, ev)
                    if text is not None:
                        yield text
                    if all(x.done for x in choices):
                        if req.include_usage:
                            payload = {
                                "id": rid,
                                "object": chunk_obj,
                                "created": created,
                                "model": model_name,
                                "choices": [],
                                "usage": usage(),
                            }
                            yield f"data: {json.dumps(payload)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:  # the client went away: free its slots
                abort_all()
                raise

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

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


def _reason(reason: str | None) -> str | None:
    """OpenAI's finish reasons: 'stop' (eos or a stop string) or 'length'."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason or "", reason)
