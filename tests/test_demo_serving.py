"""The serving half of `make demo` on a tiny trained checkpoint: every system runs, the table prints."""

from pregate.bench import DENSE, HF, BenchConfig
from pregate.demo_serving import SERVE, STEP_SYSTEMS, format_serving, native_load, serving_summary
from pregate.native import NATIVE_ROWS, unavailable_reason
from pregate.refactor import RefactorConfig, refactor
from pregate.train import TrainConfig, train


def test_serving_summary_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path):
    cfg = RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=128, block_len=64, dtype="float32")
    moe_dir = refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)
    trained = train(
        moe_dir, tmp_path / "trained", TrainConfig.preset("tiny", train_control=False), progress=False
    )
    small = BenchConfig(
        policies=["expert-aware", "decode-first"],
        requests=4,
        rate=None,
        max_prompt_tokens=32,
        max_output_tokens=4,
        max_running=4,
        repeats=3,
        dtype="float32",
    )
    summary = serving_summary(trained, progress=lambda msg: None, cfg=small)
    assert set(summary["batch1"]) == set(STEP_SYSTEMS.values())
    assert all(0 < m["min_ms"] <= m["median_ms"] <= m["max_ms"] for m in summary["batch1"].values())
    assert set(summary["batch1_vs_dense"]) == {"MoE bf16", "MoE int8"}  # float32: no native copies
    assert all(0 < q["min"] <= q["median"] <= q["max"] for q in summary["batch1_vs_dense"].values())
    assert set(summary["load"]) == {"expert-aware", "decode-first", DENSE, HF}
    for name, m in summary["load"].items():
        assert m["throughput"] > 0 and m["range_ms"][0] <= m["norm_mean_ms"] <= m["range_ms"][1]
        assert (m["decode_step_ms"] is None) == (name == HF)
    assert set(summary["hit_ratio"]) == {"belady", "lru"}
    for k in (1, 2, 3):  # Belady is optimal: never below LRU; more room, more hits
        assert summary["hit_ratio"]["belady"][k] >= summary["hit_ratio"]["lru"][k]
    assert summary["hit_ratio"]["belady"][1] <= summary["hit_ratio"]["belady"][2]
    table = format_serving(summary)
    assert "expert-aware" in table and "hit ratio" in table and "pregate bench serve" in table
    assert "batch-1 decode step" in table and "MoE int8" in table and "paired within each repeat" in table


def test_the_load_runs_natively_at_a_budget_of_native_rows_where_it_can():
    """Every step of the demo's load run is then native (tests/test_native.py), or it keeps the default."""
    assert native_load(BenchConfig(dtype="float32")) == BenchConfig(dtype="float32")
    got = native_load(SERVE)
    if unavailable_reason() is None:
        assert got.native and got.token_budget == NATIVE_ROWS
        assert got.policies == SERVE.policies and got.requests == SERVE.requests
    else:
        assert got == SERVE
