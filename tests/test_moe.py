import pytest
import torch

from pregate.errors import PregateError
from pregate.moe import Routing, RoutingPlan, Segment, build_moe_from_dense, load_moe, save_moe
from tests.conftest import build, tiny_hf_model


def test_full_remain_rate_equals_dense(hf_model):
    # remain_rate = 1.0: every domain keeps every channel, so shared = all and routed experts are empty
    n, i = hf_model.config.num_hidden_layers, hf_model.config.intermediate_size
    empty = torch.zeros(0, dtype=torch.long)
    moe = build_moe_from_dense(hf_model, [torch.arange(i)] * n, [[empty] * 4 for _ in range(n)])
    ids = torch.randint(0, 97, (2, 11))
    routing = Routing.top1(torch.randint(0, 4, (22,)))
    torch.testing.assert_close(moe(ids, routing), hf_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_experts_covering_every_channel_equal_dense(hf_model):
    moe = build(hf_model)
    ids = torch.randint(0, 97, (2, 13))
    out = moe(ids, Routing.all_experts(ids.numel(), 3))
    torch.testing.assert_close(out, hf_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_single_expert_routing_differs_from_dense():
    hf = tiny_hf_model()
    moe = build(hf)
    ids = torch.randint(0, 97, (1, 9))
    out = moe(ids, Routing.top1(torch.zeros(9, dtype=torch.long)))
    assert not torch.allclose(out, hf(ids).logits, atol=1e-3)


def test_grouped_path_equals_per_token_loop():
    hf = tiny_hf_model(seed=3)
    moe = build(hf, num_experts=4)
    mlp = moe.layers[1].mlp
    x = torch.randn(17, 48)
    ids = torch.randint(0, 4, (17, 2))
    ids[:, 1] = (ids[:, 0] + 1 + torch.randint(0, 3, (17,))) % 4  # two distinct experts per token
    w = torch.rand(17, 2)
    got = mlp(x, RoutingPlan(Routing(ids, w), 4))
    sd = mlp.state_dict()  # the checkpoint layout, independent of the fused in-memory one
    for t in range(17):
        want = (mlp.act(x[t] @ sd["gate_proj.weight"].T) * (x[t] @ sd["up_proj.weight"].T)) @ sd[
            "down_proj.weight"
        ].T
        for k in range(2):
            e = int(ids[t, k])
            a = mlp.act(x[t] @ sd["w_gate"][e].T) * (x[t] @ sd["w_up"][e].T)
            want = want + w[t, k] * (a @ sd["w_down"][e].T)
        torch.testing.assert_close(got[t], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_cached_decode_equals_full_recompute(model_type):
    hf = tiny_hf_model(model_type, seed=1)
    moe = build(hf)
    ids = torch.randint(0, 97, (1, 14))
    experts = torch.randint(0, 3, (14,))
    full = moe(ids, Routing.top1(experts))[0]
    cache = moe.new_cache(capacity=4)  # small capacity: growth is exercised too
    pieces, start = [], 0
    for n in (5, 3, 1, 1, 2, 1, 1):  # a prompt in chunks, then single decode tokens
        seg = [Segment(n, cache)]
        pieces.append(
            moe.forward_packed(ids[0, start : start + n], seg, Routing.top1(experts[start : start + n]))
        )
        start += n
    torch.testing.assert_close(torch.cat(pieces), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 14


def test_packed_sequences_equal_separate_runs():
    hf = tiny_hf_model(seed=2)
    moe = build(hf)
    a, b = torch.randint(0, 97, (7,)), torch.randint(0, 97, (4,))
    ea, eb = torch.randint(0, 3, (7,)), torch.randint(0, 3, (4,))
    ca, cb = moe.new_cache(), moe.new_cache()
    moe.forward_packed(a[:5], [Segment(5, ca)], Routing.top1(ea[:5]))
    # one step packs a's 2 remaining tokens (with past) and all of b (no past)
    packed = moe.forward_packed(
        torch.cat([a[5:], b]), [Segment(2, ca), Segment(4, cb)], Routing.top1(torch.cat([ea[5:], eb]))
    )
    torch.testing.assert_close(packed[:2], moe(a[None], Routing.top1(ea))[0, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[2:], moe(b[None], Routing.top1(eb))[0], atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip(tmp_path):
    hf = tiny_hf_model("qwen2")
    moe = build(hf)
    save_moe(moe, tmp_path)
    again = load_moe(tmp_path)
    ids = torch.randint(0, 97, (1, 6))
    r = Routing.top1(torch.randint(0, 3, (6,)))
    torch.testing.assert_close(again(ids, r), moe(ids, r))
    assert again.config.expert_channels == moe.config.expert_channels


def test_load_rejects_foreign_and_truncated(tmp_path):
    with pytest.raises(PregateError, match="not a pregate MoE"):
        load_moe(tmp_path)
    hf = tiny_hf_model()
    moe = build(hf)
    save_moe(moe, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PregateError, match="truncated"):
        load_moe(tmp_path)


def test_expert_ids_out_of_range():
    moe = build(tiny_hf_model())
    with pytest.raises(PregateError, match="expert ids"):
        moe(torch.randint(0, 97, (1, 3)), Routing.top1(torch.tensor([0, 1, 3])))


def test_expert_scores_shape_and_mass():
    moe = build(tiny_hf_model())
    scores = moe.expert_scores(torch.randint(0, 97, (2, 5)))
    assert scores.shape == (3, 10, 3)
    assert (scores > 0).all()


def test_fused_layout_keeps_the_checkpoint_layout(tmp_path):
    """In memory q/k/v and gate|up are fused; state_dict and save_moe still give the parent's names,
    and loading them back gives the same model."""
    from pregate.moe import load_moe, save_moe

    hf = tiny_hf_model("qwen2", seed=5)  # biases on q/k/v
    moe = build(hf, num_experts=3)
    sd = moe.state_dict()
    for name in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "v_proj.bias"):
        assert f"layers.0.self_attn.{name}" in sd
    for name in ("gate_proj.weight", "up_proj.weight", "down_proj.weight", "w_gate", "w_up", "w_down"):
        assert f"layers.0.mlp.{name}" in sd
    assert not any("qkv_proj" in k or "gate_up" in k or "w_down_t" in k for k in sd)
    assert sd["layers.0.self_attn.q_proj.weight"].equal(hf.model.layers[0].self_attn.q_proj.weight)
    save_moe(moe, tmp_path)
    again = load_moe(tmp_path)
    ids = torch.randint(0, 97, (2, 9))
    e = torch.randint(0, 3, (18,))
    torch.testing.assert_close(again(ids, Routing.top1(e)), moe(ids, Routing.top1(e)), atol=0, rtol=0)
    assert all(again.state_dict()[k].equal(v) for k, v in sd.items())


@pytest.mark.parametrize("prompt_lens", [(5, 5, 5), (3, 7, 4)])  # equal lengths (no mask) and not
def test_direct_decode_step_equals_the_gathered_path(prompt_lens):
    """A decode step whose rows are in slot order attends through views (AttentionPlan's direct group);
    the same rows in another order go through the gather path; both give each row the same logits."""
    from pregate.moe import AttentionPlan

    moe = build(tiny_hf_model(seed=7), num_experts=3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=g) for n in prompt_lens]
    new = torch.randint(3, 97, (3,), generator=g)
    routing = Routing.top1(torch.tensor([0, 2, 1]))
    logits = {}
    for order in ([0, 1, 2], [2, 0, 1]):
        cache = moe.new_cache(capacity=16, slots=3)
        slots = [cache.acquire(16) for _ in prompts]
        for slot, p in zip(slots, prompts):  # prefill each sequence into its slot
            moe.forward_packed(
                p, [Segment(len(p), cache, slot)], Routing.top1(torch.zeros(len(p), dtype=torch.long))
            )
        segments = [Segment(1, cache, slots[i]) for i in order]
        plan = AttentionPlan(segments, None)
        assert plan.only_direct == (order == [0, 1, 2])
        assert (plan.groups[0].mask is None) == (order == [0, 1, 2] and len(set(prompt_lens)) == 1)
        idx = torch.tensor(order)
        out = moe.forward_packed(new[idx], segments, Routing(routing.expert_ids[idx], routing.weights[idx]))
        logits[tuple(order)] = out[torch.argsort(idx)]  # back to request order
    torch.testing.assert_close(logits[(0, 1, 2)], logits[(2, 0, 1)], atol=1e-5, rtol=1e-5)
