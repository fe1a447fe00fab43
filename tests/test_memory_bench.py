"""`pregate bench memory`: every setting in its own process, on a tiny MoE with a router and a tokenizer."""

import json

import pytest
import torch

from pregate.cli import main
from pregate.errors import PregateError
from pregate.memory_bench import MemoryBenchConfig, run_memory_bench
from pregate.moe import save_moe
from pregate.router import PreGatingRouter, RouterConfig, save_router
from tests.conftest import build


@pytest.fixture
def served_dir(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    moe = build(hf)
    out = tmp_path / "served"
    out.mkdir()
    save_moe(moe, out)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(out)
    save_router(
        PreGatingRouter(RouterConfig.preset("tiny", vocab_size=hf.config.vocab_size, num_experts=3)), out
    )
    return out


@pytest.mark.subprocess
def test_each_setting_runs_in_its_own_process(served_dir, tmp_path, capsys):
    path = tmp_path / "memory.json"
    args = ["bench", "memory", str(served_dir), "--resident-experts", "1", "2", "--requests", "2"]
    assert main([*args, "--max-tokens", "3", "--prompt-len", "5", "--json", str(path)]) == 0
    assert "routed-expert weights of the whole model" in capsys.readouterr().out
    result = json.loads(path.read_text())
    rows = {r["setting"]: r for r in result["rows"]}
    assert list(rows) == ["imports only", "all resident", "k = 1", "k = 2"]
    assert all(r["after_serving_mb"] >= r["after_load_mb"] > 0 for r in rows.values())
    # the store holds k slots (plus one staging and one raw slice) at the widest expert's width; all
    # resident, the packed bfloat16 experts hold their true widths only, so of this tiny model's 3 experts
    # of uneven widths the store's k + 2 slices may hold more: a sanity bound, not the saving
    assert rows["all resident"]["routed_bytes"] == result["routed_bytes_all"] > 0
    assert 0 < rows["k = 1"]["routed_bytes"] < rows["k = 2"]["routed_bytes"] < 4 * result["routed_bytes_all"]
    assert rows["imports only"]["routed_bytes"] == 0


def test_bad_input_is_refused_before_any_process(served_dir, tmp_path):
    with pytest.raises(PregateError, match="the model has 3 experts"):
        run_memory_bench(served_dir, MemoryBenchConfig(resident_experts=[4]))
    with pytest.raises(PregateError, match="integer >= 1"):
        MemoryBenchConfig(resident_experts=[0])
    with pytest.raises(PregateError):
        run_memory_bench(tmp_path, MemoryBenchConfig())  # not a checkpoint
    (served_dir / "router_config.json").unlink()  # a refactored MoE, never trained
    with pytest.raises(PregateError, match="no trained router"):
        run_memory_bench(served_dir, MemoryBenchConfig())
