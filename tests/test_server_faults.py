"""The server survives its clients and its own bugs: a real engine with injected faults behind real HTTP."""

import socket
import threading
import time

import httpx
import pytest

from pregate.cli import main
from pregate.errors import PregateError
from pregate.http_timeouts import read_timeout_protocol
from pregate.scheduler import SchedulerConfig
from pregate.server import LOOPBACK_HOSTS, ServerLimits, build_app
from tests.conftest import running, tiny_engine

POISON_TEXT = "poison"


@pytest.fixture
def faulty_server(tmp_path):
    """(base url, engine, app, fault) of a real server whose model raises when fault["when"](input_ids) is
    true: by default, when a step holds a token of POISON_TEXT."""
    engine = tiny_engine(tmp_path)
    tok = engine.tokenizer
    poison = set(tok(POISON_TEXT, add_special_tokens=False)["input_ids"])
    real = engine.model.forward_packed
    fault = {"when": lambda ids: bool(poison & set(ids.tolist()))}

    def forward_packed(input_ids, *args, **kwargs):
        if fault["when"](input_ids):
            raise RuntimeError("injected fault")
        return real(input_ids, *args, **kwargs)

    engine.model.forward_packed = forward_packed
    tok.chat_template = CHAT_TEMPLATE
    app = build_app(engine, "tiny")
    with running(app) as url:
        yield url, engine, app, fault


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def complete(url, timeout=30, **body):
    body = {"model": "tiny", "max_tokens": 4, "temperature": 0, **body}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def assert_openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"] == str(status)
    return err


def test_a_fault_in_a_step_is_a_500_and_the_server_goes_on(faulty_server):
    url, engine, _, fault = faulty_server
    err = assert_openai_error(complete(url, prompt=f"the {POISON_TEXT} quick"), 500)
    assert err["type"] == "server_error" and "injected fault" in err["message"]
    calls = iter(range(100))
    fault["when"] = lambda ids: next(calls) == 1  # the second step: mid-stream
    body = {"prompt": "the lazy dog", "stream": True, "max_tokens": 8, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and "injected fault" not in lines[0]  # a token came, then the fault
    assert "injected fault" in lines[-2] and '"error"' in lines[-2]  # an error event ...
    assert lines[-1] == "data: [DONE]"  # ... then the stream ends as every stream does
    fault["when"] = lambda ids: False
    assert complete(url, prompt="the quick brown").status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200
    assert engine.scheduler.kv_used_tokens == 0


def test_a_fault_while_adding_is_a_500_for_that_request_alone(faulty_server):
    url, engine, _, fault = faulty_server
    real = engine._route_prompt

    def route(ids, total):
        if len(ids) == 7:
            raise KeyError("injected admission fault")
        return real(ids, total)

    engine._route_prompt = route
    err = assert_openai_error(complete(url, prompt=[5, 6, 7, 8, 9, 10, 11]), 500)
    assert "injected admission fault" in err["message"]
    assert complete(url, prompt=[5, 6, 7]).status_code == 200


def test_a_dead_engine_thread_answers_everyone_and_health_says_so(faulty_server):
    url, engine, app, _ = faulty_server
    died = threading.Event()
    app.state.runner.on_death = died.set

    def broken(*args, **kwargs):
        raise RuntimeError("injected fatal fault")

    engine.step = broken  # the step guard fails ...
    engine.fail_all = broken  # ... and so does its last resort: the thread dies
    t0 = time.time()
    err = assert_openai_error(complete(url, prompt="the quick"), 500)
    assert "injected fatal fault" in err["message"] and time.time() - t0 < 10
    assert died.wait(5)
    assert_openai_error(httpx.get(f"{url}/health"), 503)
    assert_openai_error(complete(url, prompt="the quick"), 500)  # later requests do not hang either


BAD_REQUESTS = [
    ({"prompt": [5, None, 7]}, "prompt"),
    ({"prompt": [5, "x", 7]}, "prompt"),
    ({"prompt": [5, 1e300]}, "prompt"),
    ({"prompt": [5, 2.0]}, "prompt"),
    ({"prompt": [True]}, "prompt"),
    ({"prompt": [[5, 6], [7, None]]}, "prompt"),
    ({"prompt": [[5, 6], "x"]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [5, 10**30]}, None),  # the engine's vocabulary check
    ({"prompt": "lone \ud800 surrogate"}, "prompt"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stop": {"a": 1}}, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stream": "false"}, "stream"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "max_completion_tokens": 0}, "max_completion_tokens"),  # a chat field
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": ["a", "b", "c"], "n": 6}, "n"),  # 18 choices
    ({"prompt": "x", "n": 2.0}, "n"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"prompt": "x", "stream": True, "stream_options": {"other": True}}, "stream_options"),
    ({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"5": 100}}, "logit_bias"),
    ({"prompt": "x", "suffix": "tail"}, "suffix"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),  # unknown to OpenAI too
    ({"prompt": "x", "user": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}, None),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),  # past Python's recursion limit
]


@pytest.mark.parametrize("body, param", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_malformed_requests_are_400s_and_the_next_request_works(faulty_server, body, param):
    url, _, _, _ = faulty_server
    content = body if isinstance(body, bytes) else _json(body)
    r = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"})
    err = assert_openai_error(r, 400)
    assert err["param"] == param
    assert complete(url, prompt="the quick").status_code == 200


def user(content) -> list:
    return [{"role": "user", "content": content}]


BAD_CHAT_REQUESTS = [
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user<|im_end|>\n<|im_start|>system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": 5, "content": "x"}]}, "messages[1].role"),
    ({"messages": user(5)}, "messages[0].content"),
    ({"messages": user(None)}, "messages[0].content"),
    ({"messages": user([{"type": "image_url", "image_url": {"url": "http://x"}}])}, "messages[0].content[0]"),
    ({"messages": user([{"type": "text", "text": 5}])}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": user("x"), "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": user("x"), "tool_choice": "auto"}, "tool_choice"),
    ({"messages": user("x"), "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": user("x"), "top_logprobs": 3}, "top_logprobs"),  # without logprobs
    ({"messages": user("x"), "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": user("x"), "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": user("x"), "echo": True}, "echo"),  # a completions field
]


@pytest.mark.parametrize(
    "body, param", BAD_CHAT_REQUESTS, ids=[str(i) for i in range(len(BAD_CHAT_REQUESTS))]
)
def test_malformed_chat_requests_are_400s_and_the_next_request_works(faulty_server, body, param):
    url, _, _, fault = faulty_server
    fault["when"] = lambda ids: False  # the chat template's tokens may hold a poison token
    r = httpx.post(f"{url}/v1/chat/completions", json={"max_tokens": 3, **body})
    err = assert_openai_error(r, 400)
    assert err["param"] == param
    good = httpx.post(f"{url}/v1/chat/completions", json={"messages": user("the quick"), "max_tokens": 3})
    assert good.status_code == 200


def test_chat_accepts_text_parts_and_harmless_fields(faulty_server):
    url, _, _, fault = faulty_server
    fault["when"] = lambda ids: False
    parts = [{"type": "text", "text": "the quick"}, {"type": "text", "text": "brown fox"}]
    body = {
        "model": "tiny",
        "max_tokens": 4,
        "temperature": 0,
        "user": "u-1",
        "tools": [],
        "presence_penalty": 0,
        "response_format": {"type": "text"},
        "metadata": {"a": "b"},
    }
    got = httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": user(parts)}).json()
    want = httpx.post(
        f"{url}/v1/chat/completions", json={**body, "messages": user("the quick\nbrown fox")}
    ).json()
    assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]


REFUSED = [  # (method, path, body or None, status, param)
    ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model",
    ),
    ("GET", "/v1/nowhere", None, 404, None),
    ("GET", "/docs", None, 404, None),
    ("GET", "/redoc", None, 404, None),
    ("GET", "/openapi.json", None, 404, None),
    ("GET", "/v1/completions", None, 405, None),
    ("DELETE", "/v1/models", None, 405, None),
]


@pytest.mark.parametrize(
    "method, path, body, status, param", REFUSED, ids=[f"{m} {p} {s}" for m, p, _, s, _ in REFUSED]
)
def test_unknown_models_and_routes_in_openai_error_shape(faulty_server, method, path, body, status, param):
    url, _, _, _ = faulty_server
    err = assert_openai_error(httpx.request(method, f"{url}{path}", json=body), status)
    assert err["param"] == param
    assert complete(url, prompt="the quick").status_code == 200


def test_docs_when_asked_for(faulty_server):
    _, engine, _, _ = faulty_server
    from pregate.server import ServerLimits

    with running(build_app(engine, "tiny", ServerLimits(docs=True))) as url:
        assert httpx.get(f"{url}/openapi.json").status_code == 200


@pytest.mark.parametrize("temperature, top_p", [(1e-45, 1.0), (1.0, 1e-46), (1e-40, 1e-40)])
def test_float32_underflowing_sampling_parameters_are_served(faulty_server, temperature, top_p):
    url, _, _, _ = faulty_server
    r = complete(url, prompt="the quick", temperature=temperature, top_p=top_p)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


def _json(body) -> bytes:
    import json

    return json.dumps(body).encode()  # keeps a lone surrogate as the \\ud800 escape that clients send


# ------------------------------------------------------------------------------------------ limits


def test_limits_refuse_in_openai_error_shape_and_good_requests_go_on(tmp_path):
    limits = ServerLimits(
        max_body_bytes=2000,
        api_key="sekret",
        cors_origins=("http://ok.example",),
        allowed_hosts=LOOPBACK_HOSTS,
    )
    auth = {"authorization": "Bearer sekret"}
    with running(build_app(tiny_engine(tmp_path), "tiny", limits)) as url:
        good = {"prompt": "the quick", "max_tokens": 2}

        def ok():
            assert httpx.post(f"{url}/v1/completions", json=good, headers=auth).status_code == 200

        assert_openai_error(httpx.post(f"{url}/v1/completions", json=good), 401)
        assert_openai_error(
            httpx.post(f"{url}/v1/completions", json=good, headers={"authorization": "Bearer nope"}), 401
        )
        assert_openai_error(httpx.get(f"{url}/v1/nowhere"), 401)  # the key comes before the routes
        assert httpx.get(f"{url}/health").status_code == 200  # a supervisor needs no key
        ok()
        plain = httpx.post(
            f"{url}/v1/completions",
            content=b'{"prompt": "x"}',
            headers={**auth, "content-type": "text/plain"},
        )
        assert_openai_error(plain, 415)
        ok()
        big = {"prompt": "x" * 3000}
        assert_openai_error(httpx.post(f"{url}/v1/completions", json=big, headers=auth), 413)

        def chunks():  # no Content-Length: the limit is counted as the body arrives
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}'

        chunked = httpx.post(
            f"{url}/v1/completions", content=chunks(), headers={**auth, "content-type": "application/json"}
        )
        assert_openai_error(chunked, 413)
        ok()
        assert_openai_error(
            httpx.post(f"{url}/v1/completions", json=good, headers={**auth, "host": "evil.example"}), 400
        )
        assert (
            httpx.post(
                f"{url}/v1/completions", json=good, headers={**auth, "host": "localhost:1234"}
            ).status_code
            == 200
        )
        assert (
            httpx.post(f"{url}/v1/completions", json=good, headers={**auth, "host": "[::1]:1234"}).status_code
            == 200
        )
        preflight = {
            "origin": "http://ok.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        }
        r = httpx.options(f"{url}/v1/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ok.example"
        r = httpx.options(f"{url}/v1/completions", headers={**preflight, "origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        ok()


def _closed_after(sock, limit: float) -> float | None:
    """Seconds until the server closes `sock` (recv returns b""), or None if it is still open at `limit`."""
    start = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - start < limit:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
    return None


def test_a_client_too_slow_to_send_its_request_is_cut_off(tmp_path):
    """Slowloris: a request head or body trickled past the read deadline loses its connection; a client
    that pauses less, and the server's other clients, are served."""
    with running(build_app(tiny_engine(tmp_path), "tiny", ServerLimits()), timeout_read=1.0) as url:
        port = int(url.rsplit(":", 1)[1])
        body = b'{"prompt": "the quick", "max_tokens": 2}'
        head = b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        with socket.create_connection(("127.0.0.1", port)) as silent:  # connects, sends nothing
            with socket.create_connection(("127.0.0.1", port)) as trickle:
                trickle.sendall(head[:20])  # half a request line
                time.sleep(0.5)
                trickle.sendall(head[20:40])  # still trickling: the deadline is not reset by bytes
                assert _closed_after(trickle, 3.0) is not None
            assert _closed_after(silent, 3.0) is not None
        with socket.create_connection(("127.0.0.1", port)) as slow_body:
            slow_body.sendall(head + f"content-length: {len(body)}\r\n\r\n".encode() + body[:5])
            assert _closed_after(slow_body, 3.0) is not None  # the body never completes
        with socket.create_connection(("127.0.0.1", port)) as patient:  # pauses, but within the deadline
            patient.sendall(head[:30])
            time.sleep(0.4)
            patient.sendall(head[30:] + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode())
            time.sleep(0.4)
            patient.sendall(body)
            patient.settimeout(30)
            reply = b""
            while chunk := patient.recv(65536):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200") and b'"choices"' in reply
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "the quick", "max_tokens": 2})
        assert r.status_code == 200  # the server goes on
        # a keep-alive connection waiting between requests is closed by its own (5 s) timeout, not this one
        with httpx.Client() as c:
            assert c.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200
            time.sleep(1.5)
            assert c.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200


def test_an_idle_server_returns_freed_memory_once_per_burst(tmp_path):
    """After work, once idle for a whole poll, the engine thread trims the heap (glibc): once, not on every
    idle poll, and never between steps."""
    from pregate import heap
    from pregate.engine_loop import IDLE_POLL_S

    if heap._malloc_trim() is None:
        pytest.skip("not glibc: nothing to trim")
    assert heap.trim() is True
    app = build_app(tiny_engine(tmp_path), "tiny", ServerLimits())
    runner = app.state.runner
    with running(app) as url:
        time.sleep(3 * IDLE_POLL_S)
        assert runner.trims == 0  # nothing ran yet
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "the quick", "max_tokens": 3, "n": 2})
        assert r.status_code == 200
        time.sleep(3 * IDLE_POLL_S)
        assert runner.trims == 1  # one trim after the burst, however long it stays idle
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
        time.sleep(3 * IDLE_POLL_S)
        assert runner.trims == 2


def test_read_timeout_must_be_positive():
    with pytest.raises(PregateError, match="> 0"):  # a library caller's mistake: the project's error
        read_timeout_protocol(0)
    with pytest.raises(SystemExit):
        main(["serve", "some/dir", "--timeout-read", "0"])


def test_cors_is_off_by_default(tmp_path):
    with running(build_app(tiny_engine(tmp_path), "tiny")) as url:
        r = httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "the quick", "max_tokens": 2},
            headers={"origin": "http://a.example"},
        )
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_a_full_queue_is_a_429_with_retry_after(tmp_path):
    engine = tiny_engine(tmp_path, SchedulerConfig(max_running=1), step_s=0.05)
    app = build_app(engine, "tiny", ServerLimits(max_queued=1))
    with running(app) as url:
        body = {"prompt": "the quick", "max_tokens": 40, "temperature": 0}
        clients = [
            threading.Thread(target=lambda: httpx.post(f"{url}/v1/completions", json=body, timeout=30))
            for _ in range(2)
        ]
        for c in clients:
            c.start()
        deadline = time.time() + 5
        while app.state.runner.in_flight < 2 and time.time() < deadline:  # one running, one queued: full
            time.sleep(0.01)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "n": 1})
        err = assert_openai_error(r, 429)
        assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
        for c in clients:
            c.join(timeout=30)
        deadline = time.time() + 10
        while engine.has_work() and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "the", "max_tokens": 2}).status_code == 200


def test_a_non_streaming_request_is_aborted_when_its_client_goes(tmp_path):
    engine = tiny_engine(tmp_path, step_s=0.05)  # 200 tokens: 10 s of work
    app = build_app(engine, "tiny")
    with running(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{url}/v1/completions",
                json={"prompt": "the quick", "max_tokens": 200, "temperature": 0, "n": 2},
                timeout=1.0,
            )
        deadline = time.time() + 4
        while app.state.runner.in_flight and time.time() < deadline:
            time.sleep(0.05)
        assert app.state.runner.in_flight == 0 and not engine.has_work()
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "the", "max_tokens": 2}).status_code == 200
