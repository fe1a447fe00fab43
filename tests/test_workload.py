"""Workloads: ShareGPT parsing, sampling, arrivals, synthetic requests, JSONL traces."""

from __future__ import annotations

import math
import statistics
import time

import pytest

from pregate.errors import PregateError
from pregate.workload import (
    WorkloadRequest,
    load_trace,
    poisson_arrivals,
    save_trace,
    sharegpt_conversations,
    sharegpt_workload,
    synthetic_workload,
)


def words(text: str) -> int:
    """A deterministic stand-in tokenizer: whitespace words."""
    return len(text.split())


def test_sharegpt_conversations_limit_is_fast_and_clean():
    t0 = time.perf_counter()
    pairs = sharegpt_conversations(limit=50)
    assert time.perf_counter() - t0 < 2.0  # streams; does not parse the 125 MB file
    assert len(pairs) == 50
    assert all(isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip() for q, a in pairs)
    assert pairs[0][0].startswith("Summarize the main ideas of Jeff Walker's Product Launch Formula")
    assert sharegpt_conversations(limit=0) == []


def test_sharegpt_workload_is_deterministic_and_filtered():
    kw = dict(
        n=20, rate=2.0, seed=3, count_tokens=words, max_prompt_tokens=50, max_output_tokens=64, pool=200
    )
    a, b = sharegpt_workload(**kw), sharegpt_workload(**kw)
    assert a == b
    assert sharegpt_workload(**{**kw, "seed": 4}) != a
    assert [r.request_id for r in a] == [f"sharegpt-{i}" for i in range(20)]
    assert all(1 <= r.prompt_tokens == words(r.prompt) <= 50 for r in a)
    assert all(1 <= r.output_len <= 64 for r in a)
    assert any(r.output_len == 64 for r in a)  # long responses are clipped
    assert a[0].arrival_time == 0.0 and all(x.arrival_time <= y.arrival_time for x, y in zip(a, a[1:]))
    with pytest.raises(PregateError, match="max_prompt_tokens=1"):
        sharegpt_workload(**{**kw, "max_prompt_tokens": 1})


def test_poisson_arrivals():
    t = poisson_arrivals(4000, rate=5.0, seed=1)
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert t[0] == 0.0 and min(gaps) >= 0
    assert statistics.mean(gaps) == pytest.approx(0.2, rel=0.05)
    assert poisson_arrivals(3, math.inf) == [0.0, 0.0, 0.0] == poisson_arrivals(3, None)
    assert t == poisson_arrivals(4000, 5.0, seed=1)
    bursty = poisson_arrivals(9, rate=3.0, seed=2, burst=3)
    assert bursty[0] == bursty[1] == bursty[2] == 0.0 < bursty[3] == bursty[4] == bursty[5] < bursty[6]
    with pytest.raises(PregateError, match="rate=0"):
        poisson_arrivals(3, 0)


def test_synthetic_workload():
    reqs = synthetic_workload(6, prompt_len=12, output_len=7, rate=10.0, burst=2, seed=5)
    assert len(reqs) == 6 and all(
        words(r.prompt) == 12 == r.prompt_tokens and r.output_len == 7 for r in reqs
    )
    assert reqs[0].arrival_time == reqs[1].arrival_time < reqs[2].arrival_time
    assert synthetic_workload(6, 12, 7, rate=10.0, burst=2, seed=5) == reqs
    assert all(r.arrival_time == 0.0 for r in synthetic_workload(3, 4, 4))
    with pytest.raises(PregateError, match="prompt_len=0"):
        synthetic_workload(3, 0, 4)


def test_trace_round_trip_with_optional_routing(tmp_path):
    reqs = synthetic_workload(3, 5, 4, rate=1.0)
    reqs[1].prompt_experts = [0, 1, 2, 3, 4]
    reqs[1].output_experts = [6, 6, 5, 0]
    reqs.append(WorkloadRequest("uni", 'héllo "quoted"\nline', 2, 1.25))
    path = tmp_path / "sub" / "trace.jsonl"
    save_trace(path, reqs)
    back = load_trace(path)
    assert back == reqs
    assert back[0].prompt_experts is None and back[1].output_experts == [6, 6, 5, 0]
    assert len(path.read_text().splitlines()) == 4


def test_broken_trace_line_names_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    good = '{"request_id": "a", "prompt": "hi", "output_len": 3}\n'
    path.write_text(good + "\n" + '{"request_id": "b", "prompt": "x", \n')
    with pytest.raises(PregateError, match=r"t\.jsonl:3: not valid JSON"):
        load_trace(path)
    path.write_text(good + '{"request_id": "b", "prompt": "x"}\n')
    with pytest.raises(PregateError, match=r"t\.jsonl:2: missing field\(s\) output_len"):
        load_trace(path)
    path.write_text(good + '{"request_id": "c", "prompt": "x", "output_len": 2, "prompt_experts": [1, -2]}\n')
    with pytest.raises(PregateError, match=r":2: prompt_experts must be a list"):
        load_trace(path)
    path.write_text(good + good)
    with pytest.raises(PregateError, match=r":2: duplicate request_id 'a'"):
        load_trace(path)
    with pytest.raises(PregateError, match="does not exist"):
        load_trace(tmp_path / "missing.jsonl")
