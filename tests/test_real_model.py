"""The real packaged SmolLM2-135M: the equivalence contract (default tier, ~30 s including the one-time GGUF
conversion) and refactoring + perplexity end to end (slow: ~2-4 minutes on 2 cores)."""

import pytest
import torch

from pregate import hub
from pregate.evaluate import PplConfig, evaluate_ppl
from pregate.moe import Routing, load_moe
from pregate.refactor import RefactorConfig, refactor


@pytest.mark.slow
def test_smollm2_refactor_and_perplexity(tmp_path):
    cfg = RefactorConfig(tokens_per_domain=1024, block_len=256, dtype="float32")
    out = refactor("smollm2-135m", tmp_path / "moe", cfg)
    moe = load_moe(out)
    assert moe.num_experts == 7 and len(moe.layers) == 30
    assert 0 < moe.config.activated_channels() < 1536
    result = evaluate_ppl(out, PplConfig(domains=["github", "book"], tokens_per_domain=512, block_len=256))
    for row in result["domains"].values():
        # a real model (uniform over 49,152 tokens would be 49,152): ~14 on code, ~67 on these Shakespeare
        # blocks
        assert row["dense"] < 100
        # the oracle routing carries real information
        assert row["dense"] < row["moe_oracle"] < row["moe_random"]


def test_full_channel_moe_matches_packaged_model():
    dense, _ = hub.load_dense("smollm2-135m", torch.float32)
    from pregate.moe import build_moe_from_dense

    n, i = dense.config.num_hidden_layers, dense.config.intermediate_size
    moe = build_moe_from_dense(dense, [torch.arange(i)] * n, [[torch.zeros(0, dtype=torch.long)]] * n)
    ids = torch.randint(0, dense.config.vocab_size, (1, 32))
    torch.testing.assert_close(
        moe(ids, Routing.top1(torch.zeros(32, dtype=torch.long))), dense(ids).logits, atol=2e-4, rtol=2e-4
    )
