"""`pregate bench server` on a tiny model: every request accounted for, bad ones refused, none lost."""

import json

import pytest

from pregate.errors import PregateError
from pregate.loadtest import ServerBenchConfig, bench_server, format_result
from tests.conftest import tiny_engine


def test_bench_server_loses_nothing(tmp_path):
    cfg = ServerBenchConfig(
        clients=6,
        requests_per_client=3,
        max_tokens=4,
        disconnect_share=0.2,
        bad_share=0.3,
        bursts=2,
        long_prompts=3,
        long_prompt_tokens=48,
        timeout_s=60,
        seed=1,
    )
    r = bench_server(tiny_engine(tmp_path), cfg, tmp_path / "bench.json")
    assert r.failed == 0 and r.lost == 0, r.failures
    normal = cfg.bursts * (cfg.long_prompts + 1)
    assert r.completed + r.disconnected == cfg.clients * cfg.requests_per_client + normal
    assert r.refused > 0 and r.disconnected > 0 and r.healthy_after
    assert len(r.short_ttft_after_burst_s) == 2 and all(t is not None for t in r.short_ttft_after_burst_s)
    assert r.ttft_s["p50"] is not None and len(r.rss_mb_after_bursts) == 2 and r.rss_mb_idle > 0
    assert json.loads((tmp_path / "bench.json").read_text())["result"]["lost"] == 0
    assert "lost 0" in format_result(r)


def test_bench_server_config_is_checked():
    with pytest.raises(PregateError, match="bad_share"):
        ServerBenchConfig(bad_share=1.5)


def test_pregate_bench_server_command(tiny_checkpoint, tmp_path, capsys):
    from pregate.cli import main
    from pregate.refactor import RefactorConfig, refactor
    from pregate.train import TrainConfig, train

    cfg = RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=128, block_len=64, dtype="float32")
    moe_dir = refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)
    trained = train(
        moe_dir, tmp_path / "trained", TrainConfig.preset("tiny", train_control=False), progress=False
    )
    args = [
        "bench",
        "server",
        str(trained),
        "--clients",
        "3",
        "--requests-per-client",
        "2",
        "--max-tokens",
        "3",
        "--bursts",
        "1",
        "--long-prompts",
        "2",
        "--long-prompt-tokens",
        "32",
        "--dtype",
        "float32",
        "--json",
        str(tmp_path / "new" / "b.json"),  # a folder that does not exist yet
    ]
    assert main(args) in (0, None)
    out = capsys.readouterr().out
    assert "lost 0" in out and "failed 0" in out
    assert json.loads((tmp_path / "new" / "b.json").read_text())["result"]["healthy_after"]
