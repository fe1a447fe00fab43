"""Router distillation targets, the one loss bench and train share, and the oracle routing."""

from __future__ import annotations

import pytest
import torch

from pregate.distill import DistillConfig, distill_targets, layer_inputs, normalised_scores, router_loss
from pregate.errors import PregateError
from pregate.router import LayerwiseGate, distill_graded, distill_kl, oracle_experts, router_accuracy
from tests.conftest import build, tiny_hf_model, tiny_router


def test_normalised_scores_are_log_shares_over_routed_experts():
    mass = torch.tensor([[[1.0, 3.0, 0.0]], [[2.0, 2.0, 4.0]]])  # [Y=2, T=1, E=3]
    scores = normalised_scores(mass, temperature=2.0)
    assert scores.shape == (1, 2, 3)  # [T, Y, E]
    torch.testing.assert_close(scores[0, 1], torch.tensor([0.25, 0.25, 0.5]).log() / 2)
    assert scores[0, 0, 2] == pytest.approx(torch.tensor(1e-6).log().item() / 2)  # empty share clamped


def test_oracle_sums_the_scores_over_layers():
    scores = torch.tensor([[[0.0, -1.0], [-5.0, -0.1]], [[-0.2, -3.0], [-0.1, -4.0]]])  # [T=2, Y=2, E=2]
    assert oracle_experts(scores).tolist() == [1, 0]  # token 0: -5.0 vs -1.1; token 1: -0.3 vs -7.0
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert router_accuracy(logits, scores) == 0.5


def test_router_loss_fits_the_log_share_targets_with_the_chosen_loss():
    moe = build(tiny_hf_model())
    router = tiny_router(num_experts=3)
    ids = torch.randint(0, 97, (2, 7))
    scores = normalised_scores(moe.expert_scores(ids))
    torch.testing.assert_close(distill_targets(moe, ids), scores)
    logits = router(ids).reshape(-1, 3)
    loss, acc = router_loss(DistillConfig(), router, moe, ids)
    torch.testing.assert_close(loss, distill_graded(logits, scores, 0.1))
    assert acc == router_accuracy(logits, scores)
    kl, _ = router_loss(DistillConfig(loss="kl", temperature=0.5), router, moe, ids)
    torch.testing.assert_close(kl, distill_kl(logits, normalised_scores(moe.expert_scores(ids), 0.5)))


def test_layer_inputs_match_the_dense_run_for_a_layerwise_gate():
    moe = build(tiny_hf_model())
    ids = torch.randint(0, 97, (1, 5))
    hidden, scores = layer_inputs(moe, ids)
    assert hidden.shape[:2] == (len(moe.layers), 5)
    torch.testing.assert_close(scores, distill_targets(moe, ids))
    gate = LayerwiseGate(len(moe.layers), hidden.shape[-1], 3)
    loss, acc = router_loss(DistillConfig(), gate, moe, ids)
    assert loss.ndim == 0 and 0.0 <= acc <= 1.0


def test_distill_config_names_the_bad_field():
    with pytest.raises(PregateError, match="DistillConfig.loss='mse'"):
        DistillConfig(loss="mse")
    with pytest.raises(PregateError, match="DistillConfig.smoothing=1"):
        DistillConfig(smoothing=1)
