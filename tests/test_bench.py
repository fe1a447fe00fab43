"""The serving benchmark's parts on a tiny model: real-time replay, HF static batches, table, JSON, plots."""

import json

import pytest

from pregate.bench import (
    HF,
    BenchConfig,
    BenchError,
    format_serve_table,
    replay_engine,
    replay_hf_static,
    write_serve_outputs,
)
from pregate.cli import build_parser
from pregate.engine import Engine
from pregate.router import PreGatingRouter, RouterConfig
from pregate.scheduler import SchedulerConfig
from pregate.workload import WorkloadRequest, synthetic_workload
from tests.conftest import build, tiny_hf_model, tiny_tokenizer


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    hf = tiny_hf_model(seed=3, vocab_size=len(tok))
    router = PreGatingRouter(RouterConfig.preset("tiny", vocab_size=len(tok), num_experts=3)).eval()
    return build(hf), tok, router, hf


def test_replay_respects_arrivals_and_serves_everyone(parts):
    moe, tok, router, _ = parts
    trace = synthetic_workload(5, prompt_len=6, output_len=3, rate=40.0, seed=1)
    trace.append(WorkloadRequest("too-long", "fox " * 400, 3, arrival_time=0.01))  # fails alone
    engine = Engine(moe, tok, router, SchedulerConfig(policy="expert-aware", token_budget=8, max_running=3))
    t0 = engine.metrics.clock()
    res = replay_engine(engine, trace)
    assert sorted(m.request_id for m in res.requests) == sorted(r.request_id for r in trace[:5])
    assert list(res.failed) == ["too-long"] and "context" in res.failed["too-long"]
    by_id = {m.request_id: m for m in res.requests}
    for r in trace[:5]:
        assert by_id[r.request_id].arrival == pytest.approx(t0 + r.arrival_time, abs=0.05)
        assert by_id[r.request_id].num_generated == 3
    # nobody is served before it arrives: the first step starts no earlier than the first arrival
    assert res.steps[0].start >= t0
    assert max(s.num_tokens for s in res.steps) <= 8


def test_hf_static_batches(parts):
    _, tok, _, hf = parts
    trace = synthetic_workload(5, prompt_len=4, output_len=2, rate=None)
    trace[1].output_len = 4
    res = replay_hf_static(hf, tok, trace, batch_size=2)
    assert len(res.steps) == 3  # 5 requests all at t=0 in batches of 2
    ends = sorted({m.finish_time for m in res.requests})
    assert len(ends) == 3 and all(m.ttft == m.e2e for m in res.requests)
    assert {m.request_id: m.num_generated for m in res.requests}["synthetic-1"] == 4


def test_table_json_and_plots(parts, tmp_path):
    moe, tok, router, hf = parts
    trace = synthetic_workload(3, prompt_len=5, output_len=5, rate=None)
    runs = {
        "fcfs": [
            replay_engine(Engine(moe, tok, router, SchedulerConfig(policy="fcfs")), trace) for _ in "ab"
        ],
        HF: [replay_hf_static(hf, tok, trace, 2)],
    }
    from pregate.bench import flat_metrics, step_records
    from pregate.sim import fit_check

    check = fit_check([step_records(r) for r in runs["fcfs"]], len(moe.layers))
    result = {
        "policies": {n: flat_metrics(rs[0].summary()) for n, rs in runs.items()},
        "workload": {"requests": 3},
        "cost_model_check": check,
        "runs": runs,
    }
    table = format_serve_table(result)
    assert "fcfs" in table and HF in table and "experts/step" in table
    assert "simulator cost model" in table and check["steps"] == sum(len(r.steps) for r in runs["fcfs"])
    paths = write_serve_outputs(result, tmp_path / "serve.json")
    data = json.loads(paths[0].read_text())
    assert set(data["policies"]) == {"fcfs", HF} and data["workload"] == {"requests": 3}
    assert data["cost_model_check"] == check and len(data["engine_steps"]) == check["steps"]
    by_run = {}
    for rec in data["engine_steps"]:
        by_run.setdefault(rec.pop("run"), []).append(rec)
    assert list(by_run) == ["fcfs 1", "fcfs 2"] and fit_check(list(by_run.values()), len(moe.layers)) == check
    assert len(data["normalized_latency_samples"]["fcfs"]) == 3
    assert all(p.suffix == ".png" and p.stat().st_size > 1000 for p in paths[1:]) and len(paths) == 3


def test_bench_config_errors():
    with pytest.raises(BenchError, match="policies"):
        BenchConfig(policies=["lifo"])
    with pytest.raises(BenchError, match="token_budget"):
        BenchConfig(token_budget=0)
    with pytest.raises(BenchError, match="rate"):
        BenchConfig(rate=-1.0)


def test_native_at_a_budget_past_whole_rows_says_what_runs_through_torch():
    from pregate.bench import native_budget_note
    from pregate.native import WHOLE_ROWS
    from pregate.packed import cpu_packs_bfloat16

    assert native_budget_note(BenchConfig()) is None  # not native
    assert native_budget_note(BenchConfig(native=True)) is None  # the default budget: every step native
    for quantize in (None, "int8"):
        assert (
            native_budget_note(BenchConfig(native=True, token_budget=WHOLE_ROWS, quantize=quantize)) is None
        )
    note = native_budget_note(BenchConfig(native=True, token_budget=WHOLE_ROWS + 1, quantize="int8"))
    assert f"--token-budget {WHOLE_ROWS + 1}" in note and f"--token-budget {WHOLE_ROWS} keeps every" in note
    # bfloat16 where oneDNN cannot pack it: every step native at any budget, nothing to note
    bf16 = native_budget_note(BenchConfig(native=True, token_budget=WHOLE_ROWS + 1))
    assert (bf16 is None) == (not cpu_packs_bfloat16())


def test_cli_has_bench_serve():
    args = build_parser().parse_args(
        ["bench", "serve", "some/dir", "--json", "x.json", "--policies", "fcfs", "--rate", "0"]
    )
    assert args.policies == ["fcfs"] and args.rate == 0 and args.func.__name__ == "cmd_bench_serve"


def test_a_disturbed_repeat_is_flagged():
    from pregate.bench import FAR_OFF
    from pregate.metrics import repeat_spread

    def far_off(values):
        return repeat_spread(values, FAR_OFF)["flagged"]

    assert far_off([16.0, 17.5, 15.2]) == []
    assert far_off([439.0, 16.0, 17.0]) == [0]  # the disturbed repeat once seen here
    assert far_off([16.0, 5.0, 17.0]) == [1]
