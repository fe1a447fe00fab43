"""A bounded load and fault benchmark of the HTTP server on loopback (`pregate bench server`).

`bench_server(engine, cfg)` starts the real app under uvicorn on 127.0.0.1 (a free port) and drives it
with httpx, in two phases:

1. Load: `clients` concurrent clients, `requests_per_client` requests each. Each request is, at random
   (seeded): a bad request from a small corpus (`bad_share`; it must get a 4xx in OpenAI's error shape),
   a stream the client abandons after its first chunk (`disconnect_share`), or a normal stream.
2. Bursts, `bursts` times: `long_prompts` long prompts at once, then one short streaming request
   behind them; its time to first token is reported per burst (what admission gives a short request).

Every request ends in exactly one bucket: completed (a stream that reached [DONE], or a bad request
refused as it should be), disconnected (abandoned on purpose), failed (an error event, a 5xx, a wrong
status or error shape) or lost (no answer within `timeout_s`, or a stream cut short without [DONE]).
RSS of this process (server and engine included) is read before the run, after each burst, and once the
server has been idle long enough to return freed memory (`pregate.heap`).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pregate.errors import PregateError

BAD_BODIES = [
    {"prompt": [5, None]},
    {"prompt": "x", "seed": 2**64},
    {"prompt": "x", "stream": "false"},
    {"prompt": "x", "n": 0},
    {"prompt": "x", "tools": [{"type": "function"}]},
    {"prompt": "x", "model": "no-such-model"},
    {"prompt": "x", "stop": 5},
]
SHORT_PROMPTS = ["the quick brown", "def f(x):", "once upon a time", "import torch"]


@dataclass
class ServerBenchConfig:
    """Sizes of the benchmark; every phase is bounded (at most clients x requests_per_client + bursts x
    (long_prompts + 1) requests, each at most max_tokens new tokens and timeout_s seconds)."""

    clients: int = 64
    requests_per_client: int = 2
    max_tokens: int = 16
    disconnect_share: float = 0.1
    bad_share: float = 0.1
    bursts: int = 4
    long_prompts: int = 16
    long_prompt_tokens: int = 512
    timeout_s: float = 300
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("clients", "requests_per_client", "max_tokens", "long_prompt_tokens"):
            if getattr(self, name) < 1:
                raise PregateError(f"ServerBenchConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("bursts", "long_prompts"):
            if getattr(self, name) < 0:
                raise PregateError(f"ServerBenchConfig.{name}={getattr(self, name)} must be >= 0")
        for name in ("disconnect_share", "bad_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise PregateError(f"ServerBenchConfig.{name}={getattr(self, name)} must lie in [0, 1]")
        if self.disconnect_share + self.bad_share > 1:
            raise PregateError("ServerBenchConfig: disconnect_share + bad_share must be at most 1")


@dataclass
class ServerBenchResult:
    completed: int = 0
    refused: int = 0  # bad requests answered with a proper 4xx (counted in completed too)
    disconnected: int = 0
    failed: int = 0
    lost: int = 0
    failures: list[str] = field(default_factory=list)  # the first few, to read
    ttft_s: dict[str, float | None] = field(default_factory=dict)  # p50/p95/p99 over normal streams
    e2e_s: dict[str, float | None] = field(default_factory=dict)
    short_ttft_after_burst_s: list[float | None] = field(default_factory=list)
    rss_mb_before: float = 0.0
    rss_mb_after_bursts: list[float] = field(default_factory=list)
    rss_mb_idle: float = 0.0  # after the last burst, once the server was idle long enough to trim its heap
    healthy_after: bool = False


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, round(q * (len(v) - 1)))]  # noqa: E731
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


class _Run:
    def __init__(self, url: str, cfg: ServerBenchConfig):
        self.url, self.cfg = url, cfg
        self.result = ServerBenchResult()
        self.ttft: list[float] = []
        self.e2e: list[float] = []

    def fail(self, bucket: str, why: str) -> None:
        setattr(self.result, bucket, getattr(self.result, bucket) + 1)
        if len(self.result.failures) < 20:
            self.result.failures.append(f"{bucket}: {why}"[:300])

    async def bad(self, client, body: dict) -> None:
        try:
            r = await client.post(
                f"{self.url}/v1/completions", json={"max_tokens": 2, **body}, timeout=self.cfg.timeout_s
            )
        except Exception as err:  # no answer at all
            return self.fail("lost", f"bad request {body}: {type(err).__name__}: {err}")
        try:
            err = r.json()["error"]
            shaped = set(err) == {"message", "type", "param", "code"} and err["code"] == str(r.status_code)
        except Exception:
            shaped = False
        if 400 <= r.status_code < 500 and shaped:
            self.result.refused += 1
            self.result.completed += 1
        else:
            self.fail("failed", f"bad request {body} got {r.status_code}: {r.text}")

    async def stream(self, client, body: dict, leave_early: bool = False) -> float | None:
        """One streaming request; returns its time to first token (None if it did not complete)."""
        t0 = time.perf_counter()
        first = None
        try:
            async with client.stream(
                "POST",
                f"{self.url}/v1/completions",
                json={**body, "stream": True},
                timeout=self.cfg.timeout_s,
            ) as r:
                if r.status_code != 200:
                    await r.aread()
                    self.fail("failed", f"status {r.status_code}: {r.text}")
                    return None
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if first is None:
                        first = time.perf_counter() - t0
                        if leave_early:
                            self.result.disconnected += 1
                            return None  # leaving the block closes the connection
                    if line == "data: [DONE]":
                        self.result.completed += 1
                        self.ttft.append(first)
                        self.e2e.append(time.perf_counter() - t0)
                        return first
                    if '"error"' in line and json.loads(line[6:]).get("error"):
                        self.fail("failed", line)
                        return None
            self.fail("lost", "the stream ended without [DONE]")
        except Exception as err:
            self.fail("lost", f"{type(err).__name__}: {err}")
        return None

    async def load(self, client) -> None:
        rng = random.Random(self.cfg.seed)
        plans = [[rng.random() for _ in range(self.cfg.requests_per_client)] for _ in range(self.cfg.clients)]

        async def one_client(i: int, draws: list[float]) -> None:
            for j, u in enumerate(draws):
                if u < self.cfg.bad_share:
                    await self.bad(client, BAD_BODIES[(i + j) % len(BAD_BODIES)])
                    continue
                body = {
                    "prompt": SHORT_PROMPTS[(i + j) % len(SHORT_PROMPTS)],
                    "max_tokens": self.cfg.max_tokens,
                    "temperature": 0,
                }
                await self.stream(
                    client, body, leave_early=u < self.cfg.bad_share + self.cfg.disconnect_share
                )

        await asyncio.gather(*(one_client(i, d) for i, d in enumerate(plans)))

    async def burst(self, client, long_prompt: list[int]) -> float | None:
        body = {"prompt": long_prompt, "max_tokens": self.cfg.max_tokens, "temperature": 0}
        longs = [asyncio.create_task(self.stream(client, body)) for _ in range(self.cfg.long_prompts)]
        await asyncio.sleep(0.05)  # the short one arrives behind the burst
        short = await self.stream(
            client, {"prompt": SHORT_PROMPTS[0], "max_tokens": self.cfg.max_tokens, "temperature": 0}
        )
        await asyncio.gather(*longs)
        return short


async def _drive(url: str, cfg: ServerBenchConfig, long_prompt: list[int]) -> ServerBenchResult:
    import httpx

    from pregate.engine_loop import IDLE_POLL_S

    run = _Run(url, cfg)
    limits = httpx.Limits(max_connections=cfg.clients + cfg.long_prompts + 8)
    async with httpx.AsyncClient(limits=limits) as client:
        run.result.rss_mb_before = rss_mb()
        await run.load(client)
        for _ in range(cfg.bursts):
            run.result.short_ttft_after_burst_s.append(await run.burst(client, long_prompt))
            run.result.rss_mb_after_bursts.append(rss_mb())
        await asyncio.sleep(3 * IDLE_POLL_S)  # idle: the engine thread gives freed memory back (pregate.heap)
        run.result.rss_mb_idle = rss_mb()
        run.result.healthy_after = (await client.get(f"{url}/health")).status_code == 200
    run.result.ttft_s, run.result.e2e_s = percentiles(run.ttft), percentiles(run.e2e)
    return run.result


def bench_server(
    engine,
    cfg: ServerBenchConfig | None = None,
    json_path: str | Path | None = None,
    model_name: str = "bench",
) -> ServerBenchResult:
    """Serve `engine` on loopback, run the load and fault benchmark against it, stop; results also
    written to json_path when given. The long prompts are the tokenizer's ids of a repeated sentence."""
    import socket

    import uvicorn

    from pregate.launch import uvicorn_config
    from pregate.server import ServerLimits, build_app

    cfg = cfg or ServerBenchConfig()
    if cfg.long_prompt_tokens + cfg.max_tokens > engine.max_context:
        raise PregateError(
            f"long_prompt_tokens {cfg.long_prompt_tokens} + max_tokens {cfg.max_tokens} exceeds the "
            f"model's context of {engine.max_context}; lower --long-prompt-tokens"
        )
    ids = engine.tokenizer(
        "the quick brown fox jumps over the lazy dog. " * cfg.long_prompt_tokens, add_special_tokens=False
    )["input_ids"][: cfg.long_prompt_tokens]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queued = cfg.clients + cfg.long_prompts + 8  # the benchmark measures the engine, not the 429 path
    app = build_app(engine, model_name, ServerLimits(max_queued=queued))
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port))  # as `pregate serve` runs
    thread = threading.Thread(target=server.run, name="pregate-bench-server", daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise PregateError("the benchmark's server did not start within 30 s")
    try:
        result = asyncio.run(_drive(f"http://127.0.0.1:{port}", cfg, ids))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)  # as every --json: never lose a run to it
        Path(json_path).write_text(json.dumps({"config": asdict(cfg), "result": asdict(result)}, indent=2))
    return result


def format_result(r: ServerBenchResult) -> str:
    def ms(d: dict) -> str:
        return " / ".join("-" if v is None else f"{v * 1000:.0f}" for v in d.values())

    shorts = ", ".join("-" if v is None else f"{v:.2f}" for v in r.short_ttft_after_burst_s)
    rss = ", ".join(f"{v:.0f}" for v in r.rss_mb_after_bursts)
    return "\n".join(
        [
            f"completed {r.completed} (bad requests refused properly: {r.refused}), disconnected "
            f"{r.disconnected}, "
            f"failed {r.failed}, lost {r.lost}; healthy after: {r.healthy_after}",
            f"TTFT p50/p95/p99 {ms(r.ttft_s)} ms; end-to-end p50/p95/p99 {ms(r.e2e_s)} ms",
            f"short request behind each burst, TTFT s: {shorts or '-'}",
            f"RSS MiB: before {r.rss_mb_before:.0f}; after each burst {rss or '-'}; idle after "
            f"{r.rss_mb_idle:.0f}",
            *r.failures[:5],
        ]
    )
