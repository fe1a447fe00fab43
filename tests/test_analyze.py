"""Tests for pregate.analyze: the statistics against hand-computed references, and `pregate analyze`
end to end on a tiny trained checkpoint (pre-gating router and layer-wise gates)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pregate import analyze as an
from pregate.cli import main
from pregate.errors import PregateError

# ----------------------------------------------------------------------------------------- statistics


def test_independent_layers_have_zero_mutual_information():
    # every (a, b) pair exactly once: the joint is the product of uniform marginals
    a = [x for x in range(4) for _ in range(4)]
    b = [y for _ in range(4) for y in range(4)]
    counts = an.joint_counts(a, b, 4)
    assert (counts == 1).all()
    assert an.mutual_information(counts) == pytest.approx(0.0, abs=1e-12)
    assert an.normalised_mi(counts) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(an.transition_matrix(counts), np.full((4, 4), 0.25))


def test_identical_layers_have_normalised_mi_one():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 1000)
    counts = an.joint_counts(a, a, 5)
    assert an.mutual_information(counts) == pytest.approx(an.entropy(np.bincount(a, minlength=5)))
    assert an.normalised_mi(counts) == pytest.approx(1.0)
    # a relabelling (a permutation of experts) is still fully determined
    perm = np.array([3, 0, 4, 1, 2])
    assert an.normalised_mi(an.joint_counts(a, perm[a], 5)) == pytest.approx(1.0)


def test_mutual_information_by_hand():
    # a = 0 -> b = 0; a = 1 -> b = 0 or 1 evenly. p(0,0)=1/2, p(1,0)=1/4, p(1,1)=1/4
    counts = an.joint_counts([0, 0, 1, 1], [0, 0, 0, 1], 2)
    np.testing.assert_array_equal(counts, [[2, 0], [1, 1]])
    np.testing.assert_allclose(an.transition_matrix(counts), [[1.0, 0.0], [0.5, 0.5]])
    h_b = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    mi = 1.0 + h_b - 1.5  # H(a) = 1, H(a, b) = 1.5
    assert an.mutual_information(counts) == pytest.approx(mi)
    assert an.normalised_mi(counts) == pytest.approx(mi / h_b)
    assert an.entropy([2, 0, 1, 1]) == pytest.approx(1.5)


def test_a_constant_next_layer_is_fully_determined():
    counts = an.joint_counts([0, 1, 2], [1, 1, 1], 3)
    assert an.mutual_information(counts) == 0.0 and an.normalised_mi(counts) == 1.0


def test_layer_pairs_of_choices():
    choices = np.array([[0, 1, 0, 1], [1, 0, 1, 0], [1, 1, 0, 0]])  # [Y=3, T=4]
    pairs = an.layer_pairs(choices, 2)
    assert [p["layers"] for p in pairs] == [[0, 1], [1, 2]]
    assert pairs[0]["normalised_mi"] == pytest.approx(1.0) and pairs[0]["same_expert"] == 0.0
    assert pairs[1]["mi_bits"] == pytest.approx(0.0, abs=1e-12)  # layer 2 independent of layer 1


def test_temporal_locality_of_a_known_sequence():
    same, pairs = an.temporal_locality([[0, 0, 1, 1, 1, 2], [2, 0]])
    assert (same, pairs) == (3, 6)  # 0-0, 1-1, 1-1; pairs never cross blocks
    assert an.chance_locality([2, 2]) == pytest.approx(0.5)
    assert an.chance_locality([4, 0, 0]) == pytest.approx(1.0)


def test_reuse_distances_and_histogram_of_a_known_sequence():
    refs = [0, 0, 1, 0, 2, 1, 1, 0]
    #       c  0  c  1  c  2  0  2   (c: cold; distinct others since the last use)
    assert an.reuse_distances(refs) == [None, 0, None, 1, None, 2, 0, 2]
    hist = an.reuse_histogram(refs, 3)
    assert hist == {"distance": [2, 1, 2], "cold": 3, "references": 8}
    assert an.lru_hit_ratios(hist) == pytest.approx([2 / 8, 3 / 8, 5 / 8])
    assert an.add_histograms([hist, hist])["distance"] == [4, 2, 4]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_lru_hit_ratio_from_reuse_distance_equals_the_cache_simulator(k):
    from pregate.eviction import simulate_cache

    rng = np.random.default_rng(k)
    refs = rng.choice(5, 300, p=[0.4, 0.3, 0.15, 0.1, 0.05]).tolist()
    stats = simulate_cache(refs, k, "lru")
    assert an.lru_hit_ratios(an.reuse_histogram(refs, 5))[k - 1] == pytest.approx(stats.hit_ratio)


def test_agreement_and_usage():
    assert an.agreement([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    usage = an.usage_matrix({"a": [0, 0, 1, 1], "b": [2, 2, 2, 0]}, 3)
    np.testing.assert_allclose(usage, [[0.5, 0.5, 0.0], [0.25, 0.0, 0.75]])
    with pytest.raises(PregateError, match="expert ids must lie in"):
        an.usage_counts([0, 3], 3)
    with pytest.raises(PregateError, match="equally many"):
        an.agreement([0], [0, 1])


def test_bad_config():
    with pytest.raises(PregateError, match="tokens_per_domain >= block_len"):
        an.AnalyzeConfig(tokens_per_domain=8, block_len=16)
    with pytest.raises(PregateError, match="batch_size=0"):
        an.AnalyzeConfig(batch_size=0)


# ----------------------------------------------------------------------------------------- end to end


@pytest.fixture
def trained(tiny_checkpoint, tmp_path):
    """(refactored MoE, pre-gating run, layer-wise run): the tiny checkpoints of tests/test_train.py."""
    from pregate.refactor import RefactorConfig, refactor
    from pregate.train import TrainConfig, train

    cfg = RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=256, block_len=64, dtype="float32")
    moe = refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)
    tcfg = dict(rounds=1, train_control=False)
    pre = train(moe, tmp_path / "pre", TrainConfig.preset("tiny", **tcfg), progress=False)
    lw = train(moe, tmp_path / "lw", TrainConfig.preset("tiny", layerwise=True, **tcfg), progress=False)
    return moe, pre, lw


def test_analyze_from_the_command_line(trained, tmp_path, capsys):
    _, pre, lw = trained
    out = tmp_path / "analysis"
    argv = [
        "analyze",
        str(pre),
        "--out",
        str(out),
        "--layerwise",
        str(lw),
        "--tokens-per-domain",
        "96",
        "--block-len",
        "32",
        "--batch-size",
        "2",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "0 -> 1" in printed and "1 -> 2" in printed and "temporal locality" in printed
    result = json.loads((out / "analysis.json").read_text())
    assert result["experts"] == ["alpha", "beta"] and result["domains"] == ["alpha", "beta"]
    assert result["notes"] == []
    tokens = 2 * 96  # 3 blocks of 32 per domain
    loc = result["router"]["locality"]["all"]
    assert loc["pairs"] == 2 * 3 * 31 and 0 <= loc["same"] <= loc["pairs"]
    assert loc["fraction"] == pytest.approx(loc["same"] / loc["pairs"])
    reuse = result["router"]["reuse_distance"]
    assert reuse["references"] == tokens and sum(reuse["distance"]) + reuse["cold"] == tokens
    assert reuse["cold"] <= 2 * 2  # at most every expert once per domain's string
    for name in ("router", "oracle"):
        usage = np.array(result[name]["usage"])
        assert usage.shape == (2, 2)
        np.testing.assert_allclose(usage.sum(1), 1.0, atol=1e-3)
    gates = result["layerwise_gates"]
    assert [p["layers"] for p in gates["pairs"]] == [[0, 1], [1, 2]]  # the tiny model has 3 layers
    for p in gates["pairs"] + result["oracle_layers"]["pairs"]:
        assert 0 <= p["normalised_mi"] <= 1 + 1e-9 and p["mi_bits"] >= 0
        assert np.array(p["counts"]).sum() == tokens
        rows = np.array(p["transition"]).sum(1)
        assert all(r == pytest.approx(1.0, abs=1e-3) or r == 0 for r in rows)
    assert len(gates["locality_per_layer"]) == 3 and len(gates["router_agreement"]) == 3
    assert all(0 <= a["agreement"] <= 1 for a in gates["router_agreement"])
    assert gates["reuse_distance"]["references"] == 3 * tokens
    assert 0 <= result["router"]["oracle_agreement"] <= 1
    for name in ("usage.png", "locality.png", "transitions_oracle.png", "transitions_layerwise.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(result["figures"]) == sorted(
        ["usage.png", "locality.png", "transitions_oracle.png", "transitions_layerwise.png"]
    )


def test_analyze_without_layerwise_says_how_to_train_it(trained, tmp_path, capsys):
    moe, pre, _ = trained
    out = tmp_path / "a"
    argv = ["analyze", str(pre), "--out", str(out), "--tokens-per-domain", "64", "--block-len", "32"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "--layerwise" in printed and f"pregate train {moe.resolve()} --layerwise" in printed
    result = json.loads((out / "analysis.json").read_text())
    assert "layerwise_gates" not in result and result["notes"]
    assert not (out / "transitions_layerwise.png").exists() and (out / "transitions_oracle.png").exists()


def test_bad_input_is_a_clean_error(trained, tiny_checkpoint, tmp_path, capsys):
    moe, pre, lw = trained
    cases = [
        (["analyze", str(tmp_path / "nothing"), "--out", str(tmp_path / "o1")], "is not a directory"),
        (["analyze", str(tiny_checkpoint), "--out", str(tmp_path / "o2")], "not a pregate MoE checkpoint"),
        (["analyze", str(moe), "--out", str(tmp_path / "o3")], "has no trained router"),
        (["analyze", str(lw), "--out", str(tmp_path / "o4")], "holds layer-wise gates"),
        (
            ["analyze", str(pre), "--out", str(tmp_path / "o5"), "--layerwise", str(moe)],
            "is not a `pregate train --layerwise` output",
        ),
        (
            ["analyze", str(pre), "--out", str(tmp_path / "o6"), "--layerwise", str(pre)],
            "holds a pre-gating router",
        ),
        (
            ["analyze", str(pre), "--out", str(tmp_path / "o7"), "--tokens-per-domain", "16"],
            "tokens_per_domain >= block_len",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    for i in range(1, 8):
        assert not (tmp_path / f"o{i}").exists()
