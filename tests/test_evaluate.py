import math

import pytest
import torch

from pregate import data, hub
from pregate.errors import PregateError
from pregate.evaluate import PplConfig, evaluate_ppl, format_ppl_table, next_token_nll
from pregate.refactor import RefactorConfig, refactor


def test_full_remain_rate_every_variant_equals_dense(tiny_checkpoint, tmp_path):
    cfg = RefactorConfig(
        domains=["alpha", "beta"], tokens_per_domain=128, block_len=64, remain_rate=1.0, dtype="float32"
    )
    moe_dir = refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)
    result = evaluate_ppl(moe_dir, PplConfig(tokens_per_domain=128, block_len=64))
    for row in result["domains"].values():
        assert set(row) == {"dense", "moe_domain", "moe_oracle", "moe_random", "control"}
        for v in row.values():
            assert v == pytest.approx(row["dense"], rel=1e-4)


def test_dense_perplexity_matches_transformers(tiny_checkpoint, tmp_path):
    cfg = RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=128, block_len=64, dtype="float32")
    moe_dir = refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)
    result = evaluate_ppl(
        moe_dir, PplConfig(tokens_per_domain=128, block_len=64, variants=["dense", "moe_oracle"])
    )
    dense, tok = hub.load_dense(str(tiny_checkpoint))
    blocks = data.token_blocks(tok, "beta", "test", 128, 64)
    loss = dense(input_ids=blocks, labels=blocks).loss.item()  # HF's mean next-token loss
    assert result["domains"]["beta"]["dense"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert set(result["domains"]["beta"]) == {"dense", "moe_oracle"}
    assert "beta" in format_ppl_table(result)


def test_next_token_nll_counts_positions():
    logits = torch.zeros(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    loss, n = next_token_nll(logits, ids)
    assert n == 8 and loss == pytest.approx(8 * math.log(7), rel=1e-6)


def test_unknown_variant():
    with pytest.raises(PregateError, match="unknown variant"):
        PplConfig(variants=["moe_magic"])


def test_int8_column_reports_what_quantization_costs(tiny_checkpoint, tmp_path):
    cfg = RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=128, block_len=64, dtype="float32")
    moe_dir = refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)
    ppl = PplConfig(tokens_per_domain=128, block_len=64, variants=["dense", "moe_oracle"], quantize="int8")
    result = evaluate_ppl(moe_dir, ppl)
    for row in result["domains"].values():
        assert set(row) == {"dense", "moe_oracle", "moe_oracle_int8"}
        assert row["moe_oracle_int8"] != row["moe_oracle"]  # really quantized ...
        assert row["moe_oracle_int8"] == pytest.approx(row["moe_oracle"], rel=0.05)  # ... and close
    assert "moe_oracle_int8" in format_ppl_table(result)
    with pytest.raises(PregateError, match="unknown quantization 'int4'"):
        PplConfig(quantize="int4")
