"""Tests for pregate.router: tiny float32 routers on CPU, numerics against full recompute."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pregate.errors import PregateError
from pregate.router import (
    LayerwiseGate,
    PreGatingRouter,
    RouterCache,
    RouterConfig,
    RouterError,
    distill_graded,
    distill_kl,
    dselect_entropy,
    dselect_selector_probs,
    num_parameters,
    router_accuracy,
    select_experts,
    smooth_step,
)

VOCAB = 97


def make_router(
    head: str = "softmax", num_experts: int = 5, top_k: int = 1, seed: int = 0, **kw: object
) -> PreGatingRouter:
    torch.manual_seed(seed)
    cfg = RouterConfig.preset("tiny", vocab_size=VOCAB, num_experts=num_experts, head=head, top_k=top_k, **kw)
    return PreGatingRouter(cfg).eval()


HEADS = [("softmax", 1), ("softmax", 2), ("dselect", 2)]


# --------------------------------------------------------------------------------------------------
# Shapes, causality, incremental routing


@pytest.mark.parametrize("head,top_k", HEADS)
def test_shapes(head: str, top_k: int) -> None:
    router = make_router(head, top_k=top_k)
    ids = torch.randint(0, VOCAB, (3, 11))
    logits = router(ids)
    assert logits.shape == (3, 11, 5) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    expert_ids, weights = router.route(logits)
    assert expert_ids.shape == (3, 11, top_k) and expert_ids.dtype == torch.long
    assert weights.shape == (3, 11, top_k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 11))
    cache = router.new_cache(3)
    assert router.step(ids[:, :4], cache).shape == (3, 4, 5)
    assert cache.length == 4


@pytest.mark.parametrize("head,top_k", HEADS)
def test_causal(head: str, top_k: int) -> None:
    router = make_router(head, top_k=top_k, n_layers=2)
    ids = torch.randint(0, VOCAB, (2, 12))
    base = router(ids)
    for t in (0, 5, 10):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(0, VOCAB, (2, 12 - t - 1))
        out = router(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
    # and the future is not ignored: changing a token does change its own position
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % VOCAB
    assert not torch.allclose(router(changed)[:, 6], base[:, 6])


@pytest.mark.parametrize("head,top_k", HEADS)
@pytest.mark.parametrize("chunks", [[7, 1, 1, 1, 1, 1], [1] * 12, [3, 5, 1, 2, 1], [12]])
def test_incremental_equals_full(head: str, top_k: int, chunks: list[int]) -> None:
    router = make_router(head, top_k=top_k, n_layers=2)
    ids = torch.randint(0, VOCAB, (2, sum(chunks)))
    full = router(ids)
    cache = router.new_cache(2)
    outs, start = [], 0
    for n in chunks:
        outs.append(router.step(ids[:, start : start + n], cache))
        start += n
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-5)


def test_cache_clone_and_truncate() -> None:
    router = make_router(n_layers=2)
    prompt = torch.randint(0, VOCAB, (1, 6))
    a_tail, b_tail = torch.randint(0, VOCAB, (1, 3)), torch.randint(0, VOCAB, (1, 3))
    cache = router.new_cache(1)
    router.step(prompt, cache)
    fork = cache.clone()
    assert isinstance(fork, RouterCache) and fork.length == 6 and fork.capacity == 6
    out_a = router.step(a_tail, cache)
    out_b = router.step(b_tail, fork)  # the fork must not see a_tail
    torch.testing.assert_close(out_a, router(torch.cat([prompt, a_tail], 1))[:, 6:], rtol=0, atol=1e-5)
    torch.testing.assert_close(out_b, router(torch.cat([prompt, b_tail], 1))[:, 6:], rtol=0, atol=1e-5)
    cache.truncate(6)  # roll back a_tail and route b_tail instead
    torch.testing.assert_close(router.step(b_tail, cache), out_b, rtol=0, atol=1e-5)
    with pytest.raises(RouterError, match="truncate length=10"):
        cache.truncate(10)


def test_step_tokens_equals_one_step_per_sequence() -> None:
    """The engine's batched decode routing: sequences of different lengths, one token each, at once."""
    router = make_router(n_layers=2)
    prompts = [torch.randint(0, VOCAB, (1, n)) for n in (1, 7, 3, 12)]
    alone, together = [router.new_cache(1) for _ in prompts], [router.new_cache(1) for _ in prompts]
    for p, a, b in zip(prompts, alone, together):
        router.step(p, a)
        router.step(p, b)
    for _ in range(3):  # three decode steps: caches grow at different offsets
        tokens = torch.randint(0, VOCAB, (len(prompts),))
        want = torch.cat([router.step(t.view(1, 1), c)[:, 0] for t, c in zip(tokens, alone)])
        got = router.step_tokens(tokens, together)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert [c.length for c in together] == [c.length for c in alone]
    with pytest.raises(RouterError, match="one each"):
        router.step_tokens(tokens[:2], together)


def test_cache_grows_and_respects_max_seq_len() -> None:
    router = make_router(max_seq_len=40)
    ids = torch.randint(0, VOCAB, (1, 40))
    cache = router.new_cache(1)
    outs = [router.step(ids[:, t : t + 1], cache) for t in range(40)]
    assert cache.capacity == 40  # doubling stops at max_seq_len
    torch.testing.assert_close(torch.cat(outs, 1), router(ids), rtol=0, atol=1e-5)
    with pytest.raises(RouterError, match="max_seq_len=40"):
        router.step(ids[:, :1], cache)
    with pytest.raises(RouterError, match="max_seq_len"):
        router(torch.randint(0, VOCAB, (1, 41)))


def test_zero_layer_router_and_empty_step() -> None:
    router = make_router(n_layers=0)
    ids = torch.randint(0, VOCAB, (2, 5))
    cache = router.new_cache(2)
    torch.testing.assert_close(router.step(ids, cache), router(ids))
    assert router.step(ids[:, :0], cache).shape == (2, 0, 5) and cache.length == 5


def test_input_validation() -> None:
    router = make_router()
    with pytest.raises(RouterError, match="2-D"):
        router(torch.tensor([1, 2, 3]))
    with pytest.raises(RouterError, match="dtype"):
        router(torch.zeros(1, 3))
    with pytest.raises(RouterError, match="batch size 2"):
        router.step(torch.zeros(2, 3, dtype=torch.long), router.new_cache(1))
    with pytest.raises(RouterError, match="batch_size=0"):
        router.new_cache(0)


# --------------------------------------------------------------------------------------------------
# Routing


def test_route_softmax_top1_is_argmax_with_weight_one() -> None:
    router = make_router()
    logits = router(torch.randint(0, VOCAB, (2, 9)))
    ids, weights = router.route(logits)
    assert torch.equal(ids[..., 0], logits.argmax(-1))
    assert torch.equal(weights, torch.ones_like(weights))  # exactly 1.0, not approximately


def test_route_topk_renormalises_softmax() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    ids, weights = select_experts(logits, 2)
    assert ids.tolist() == [[0, 2]]
    p = logits.softmax(-1)[0]
    torch.testing.assert_close(weights[0], torch.stack([p[0], p[2]]) / (p[0] + p[2]))
    with pytest.raises(RouterError, match="k=5"):
        select_experts(logits, 5)


def test_layerwise_gate() -> None:
    torch.manual_seed(0)
    gate = LayerwiseGate(num_layers=3, hidden_size=16, num_experts=4, top_k=2)
    hidden = torch.randn(2, 5, 16)
    logits = gate(1, hidden)
    assert logits.shape == (2, 5, 4)
    torch.testing.assert_close(logits, hidden @ gate.gates[1].weight.T)
    ids, weights = gate.route(logits)
    assert torch.equal(ids, select_experts(logits, 2)[0]) and weights.shape == (2, 5, 2)
    assert num_parameters(gate) == 3 * 16 * 4
    with pytest.raises(RouterError, match="layer=3"):
        gate(3, hidden)
    with pytest.raises(RouterError, match="top_k=5"):
        LayerwiseGate(2, 16, 4, top_k=5)


# --------------------------------------------------------------------------------------------------
# DSelect-k


def test_smooth_step_values() -> None:
    for gamma in (1.0, 0.5, 3.0):
        t = torch.tensor([-10.0, -gamma / 2, 0.0, gamma / 2, 10.0, -gamma / 4, gamma / 4])
        s = smooth_step(t, gamma)
        torch.testing.assert_close(s[:5], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
        # symmetric: S(-t) = 1 - S(t), and monotone inside the band
        torch.testing.assert_close(s[5], 1 - s[6])
        assert 0 < s[5] < 0.5 < s[6] < 1
        # the cubic meets the constant pieces (continuity at the edges)
        eps = 1e-4
        edge = torch.tensor([-gamma / 2 + eps, gamma / 2 - eps])
        assert smooth_step(edge, gamma)[0] < 1e-6 and smooth_step(edge, gamma)[1] > 1 - 1e-6


def test_selector_probs_valid_distribution_non_power_of_two() -> None:
    torch.manual_seed(0)
    z = torch.randn(64, 3, 3) * 0.4  # E = 5 -> M = 3 bits, codes 5..7 invalid
    r = dselect_selector_probs(z, num_experts=5, gamma=1.0)
    assert r.shape == (64, 3, 5) and (r >= 0).all()
    torch.testing.assert_close(r.sum(-1), torch.ones(64, 3))
    # power of two needs no renormalisation: the product over bits already sums to one
    r8 = dselect_selector_probs(z, num_experts=8, gamma=1.0)
    torch.testing.assert_close(r8.sum(-1), torch.ones(64, 3))
    valid_mass = r8[..., :5].sum(-1, keepdim=True)
    ok = (valid_mass > 0).expand_as(r)
    assert ok.any() and (~ok).any()  # both branches exercised
    torch.testing.assert_close(r[ok], (r8[..., :5] / valid_mass)[ok])
    assert torch.equal(r[~ok], torch.full_like(r[~ok], 0.2))  # all mass on codes >= 5: uniform
    # saturated on code 3 (bits 1,1,0, LSB first) -> exact one-hot
    one_hot = dselect_selector_probs(torch.tensor([[2.0, 2.0, -2.0]]), 5, 1.0)
    assert torch.equal(one_hot, F.one_hot(torch.tensor([[3]]), 5).float()[0])
    # saturated on invalid code 7 -> uniform fallback, never NaN
    stray = dselect_selector_probs(torch.tensor([[2.0, 2.0, 2.0]]), 5, 1.0)
    torch.testing.assert_close(stray, torch.full((1, 5), 0.2))


def _saturate(router: PreGatingRouter, codes: list[int], alpha: list[float]) -> None:
    """Make selector i output expert codes[i] for every token, mixed by softmax(alpha)."""
    head = router.head
    m = head.code_bits
    with torch.no_grad():
        head.z_proj.weight.zero_()
        head.alpha_proj.weight.zero_()
        bias = [(5.0 if (c >> j) & 1 else -5.0) for c in codes for j in range(m)]
        head.z_proj.bias.copy_(torch.tensor(bias))
        head.alpha_proj.bias.copy_(torch.tensor(alpha))


def test_dselect_route_selects_exactly_k_when_saturated() -> None:
    router = make_router("dselect", num_experts=5, top_k=3)
    _saturate(router, codes=[4, 1, 2], alpha=[0.5, 0.0, 1.0])
    logits, r = router.forward_with_selectors(torch.randint(0, VOCAB, (2, 7)))
    assert r.shape == (2, 7, 3, 5)
    assert dselect_entropy(r).item() == 0.0  # converged selectors are one-hot
    q = logits.softmax(-1)
    mix = torch.tensor([0.5, 0.0, 1.0]).softmax(-1)
    torch.testing.assert_close(q[0, 0], torch.tensor([0.0, mix[1], mix[2], 0.0, mix[0]]))
    ids, weights = router.route(logits)
    assert ids.shape == (2, 7, 3)
    assert all(set(row) == {1, 2, 4} for row in ids.reshape(-1, 3).tolist())
    # weights are the selectors' mixing weights, highest first
    torch.testing.assert_close(weights[0, 0], torch.stack([mix[2], mix[0], mix[1]]))


def test_dselect_route_duplicate_selectors_still_k_distinct() -> None:
    router = make_router("dselect", num_experts=5, top_k=2)
    _saturate(router, codes=[3, 3], alpha=[0.0, 0.0])
    ids, weights = router.route(router(torch.randint(0, VOCAB, (1, 4))))
    assert (ids[..., 0] == 3).all() and (ids[..., 0] != ids[..., 1]).all()
    torch.testing.assert_close(weights[..., 0], torch.ones(1, 4))  # the filler expert has ~0 weight


def test_dselect_gradients_reach_every_parameter() -> None:
    router = make_router("dselect", num_experts=5, top_k=2).train()
    ids = torch.randint(0, VOCAB, (2, 8))
    targets = torch.randn(2, 8, 3, 5)
    logits, r = router.forward_with_selectors(ids)
    loss = distill_kl(logits, targets) + 0.1 * dselect_entropy(r)
    loss.backward()
    for name, p in router.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    head = router.head
    for p in (head.z_proj.weight, head.z_proj.bias, head.alpha_proj.weight, head.alpha_proj.bias):
        assert p.grad.abs().sum() > 0


def test_dselect_entropy_values() -> None:
    uniform = torch.full((4, 2, 5), 0.2)
    torch.testing.assert_close(dselect_entropy(uniform), torch.tensor(2 * math.log(5)))
    one_hot = F.one_hot(torch.tensor([[1, 4]]), 5).float()
    assert dselect_entropy(one_hot).item() == 0.0
    r = uniform.clone().requires_grad_()
    dselect_entropy(torch.cat([r, one_hot.expand(4, 2, 5)], 0)).backward()
    assert torch.isfinite(r.grad).all()


def test_forward_with_selectors_needs_dselect() -> None:
    with pytest.raises(RouterError, match="dselect"):
        make_router("softmax").forward_with_selectors(torch.zeros(1, 2, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# Losses and metric


def test_distill_kl_zero_when_matching_and_matches_definition() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    targets = logits[:, None, :].expand(6, 3, 5)  # every layer agrees with the router
    assert distill_kl(logits, targets).abs().item() < 1e-6
    targets = torch.randn(6, 3, 5)
    expected = sum(
        F.kl_div(
            logits.log_softmax(-1), targets[:, y].log_softmax(-1), log_target=True, reduction="batchmean"
        )
        for y in range(3)
    )
    torch.testing.assert_close(distill_kl(logits, targets), expected)
    hot = distill_kl(logits, targets, temperature=2.0)
    expected_hot = sum(
        F.kl_div(
            logits.log_softmax(-1),
            (targets[:, y] / 2).log_softmax(-1),
            log_target=True,
            reduction="batchmean",
        )
        for y in range(3)
    )
    torch.testing.assert_close(hot, expected_hot)
    # leading token axes are flattened: [B, L, E] works like [N, E]
    torch.testing.assert_close(distill_kl(logits.view(2, 3, 5), targets.view(2, 3, 3, 5)), expected)
    with pytest.raises(RouterError, match="target_scores shape"):
        distill_kl(logits, targets[:, 0])


def test_distill_graded_definition() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(8, 4), torch.randn(8, 2, 4)
    expected = sum(
        0.75 * F.cross_entropy(logits, targets[:, y].argmax(-1), label_smoothing=0.1)
        + 0.25 * F.cross_entropy(logits, targets[:, y].softmax(-1))
        for y in range(2)
    )
    torch.testing.assert_close(distill_graded(logits, targets), expected)


def test_distill_graded_decreases_after_one_step() -> None:
    router = make_router(num_experts=5).train()
    ids = torch.randint(0, VOCAB, (4, 16))
    targets = torch.randn(4, 16, 3, 5) * 3
    opt = torch.optim.AdamW(router.parameters(), lr=1e-2, weight_decay=0.01)
    before = distill_graded(router(ids), targets)
    opt.zero_grad()
    before.backward()
    opt.step()
    after = distill_graded(router(ids), targets)
    assert after.item() < before.item()


def test_router_accuracy_constructed() -> None:
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    targets = torch.zeros(4, 2, 3)
    targets[0, 0, 0] = 1  # token 0: expert 0 -> hit
    targets[1, :, 1] = 1  # token 1: expert 1 in both layers -> hit
    targets[2, 0, 0], targets[2, 1, 2] = 3, 1  # token 2: summed argmax 0, router says 2 -> miss
    targets[3, 0, 2], targets[3, 1, 0] = 1, 2  # token 3: summed argmax 0 though layer 0 says 2 -> hit
    assert router_accuracy(logits, targets) == 0.75


# --------------------------------------------------------------------------------------------------
# Config, presets, parameters, embedding init


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=6), "top_k=6"),
        (dict(dim=30, n_heads=4), "dim=30"),
        (dict(head="sigmoid"), "head='sigmoid'"),
        (dict(n_layers=-1), "n_layers=-1"),
        (dict(vocab_size=0), "vocab_size=0"),
        (dict(dselect_gamma=0.0), "dselect_gamma=0.0"),
        (dict(dim=12, n_heads=4), "odd"),
        (dict(num_experts=1, head="dselect"), "num_experts=1"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    base = dict(vocab_size=VOCAB, num_experts=5, dim=32, n_heads=2)
    with pytest.raises(PregateError, match=match):
        RouterConfig(**{**base, **kwargs})


def test_presets_and_dict_roundtrip() -> None:
    cfg = RouterConfig.preset("readme", vocab_size=100, num_experts=7)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.head) == (512, 1, 4, "softmax")
    assert RouterConfig.from_dict(cfg.to_dict()) == cfg
    assert RouterConfig(vocab_size=10, num_experts=3, top_k=2).top_k == 2  # softmax top-k > 1 is allowed
    with pytest.raises(RouterError, match="'huge'"):
        RouterConfig.preset("huge", vocab_size=100, num_experts=7)
    with pytest.raises(RouterError, match="unknown keys"):
        RouterConfig.from_dict({**cfg.to_dict(), "n_kv_heads": 2})


def test_readme_parameter_count() -> None:
    """The paper's router on a 32k vocabulary, counted by hand from its layers (no biases anywhere)."""
    vocab, dim, hidden, experts = 32000, 512, 1408, 7
    router = PreGatingRouter(RouterConfig.preset("readme", vocab_size=vocab, num_experts=experts))
    n = router.num_parameters()
    print(
        f"readme router, vocab 32000, 7 experts: {n / 1e6:.2f}M parameters "
        f"({router.num_parameters(exclude_embedding=True) / 1e6:.2f}M without the embedding)"
    )
    block = 2 * dim + 4 * dim * dim + 3 * dim * hidden  # 2 RMSNorms, qkv + out, SwiGLU gate/up/down
    want = vocab * dim + block + dim + dim * experts  # embedding, 1 layer, final RMSNorm, softmax head
    assert n == want == num_parameters(router)
    assert router.num_parameters(exclude_embedding=True) == want - vocab * dim
    assert 15e6 < n < 30e6


def test_init_embedding_from_backbone() -> None:
    router = make_router()  # dim 32
    wide = torch.randn(VOCAB, 48)
    router.init_embedding_from(wide)
    assert torch.equal(router.embed.weight, wide[:, :32])
    narrow = torch.randn(VOCAB, 20)
    router.init_embedding_from(narrow, generator=torch.Generator().manual_seed(0))
    assert torch.equal(router.embed.weight[:, :20], narrow)
    rest = router.embed.weight[:, 20:]
    assert rest.abs().sum() > 0 and rest.std() < 0.05  # small random, not zero
    with pytest.raises(RouterError, match="vocab_size=97"):
        router.init_embedding_from(torch.randn(50, 32))
