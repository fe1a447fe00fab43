"""Prepacked bfloat16 weights (pregate.packed): bit-for-bit the products of the plain weights, in the
linear maps, in the whole model, and through the engine."""

import copy

import pytest
import torch
import torch.nn.functional as F

from pregate.engine import Engine, SamplingParams
from pregate.errors import PregateError
from pregate.moe import Routing
from pregate.packed import PackedLinear, can_pack, cpu_packs_bfloat16, pack_model, pack_router
from pregate.quantize import quantize_model
from pregate.scheduler import SCHEDULING_POLICIES
from tests.conftest import (
    assert_batched_equals_one_by_one,
    build,
    served_checkpoint,
    tiny_hf_model,
    tiny_router,
)

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
packs_bfloat16 = pytest.mark.skipif(
    not cpu_packs_bfloat16(),
    reason="this CPU's oneDNN cannot pack bfloat16 (needs avx_ne_convert or AVX-512)",
)


def bf16_moe(seed: int = 0, family: str = "llama"):
    return build(tiny_hf_model(family, seed=seed), num_experts=3).to(torch.bfloat16).eval()


@packs_bfloat16
@pytest.mark.parametrize("rows", [1, 5, 200])  # decode rows and a prefill chunk
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_bit_for_bit(rows, bias):
    w = torch.randn(40, 48, dtype=torch.bfloat16)
    b = torch.randn(40, dtype=torch.bfloat16) if bias else None
    x = torch.randn(rows, 48, dtype=torch.bfloat16)
    layer = PackedLinear(w, b)
    assert torch.equal(layer(x), F.linear(x, w, b))
    assert torch.equal(layer(x.view(1, rows, 48)), F.linear(x, w, b)[None])  # [B, L, K] inputs too


@packs_bfloat16
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied + no bias; untied + q/k/v bias
def test_packed_model_equals_the_plain_model_bit_for_bit(family):
    moe = bf16_moe(seed=1, family=family)
    packed = pack_model(copy.deepcopy(moe))
    assert packed.packed and all(layer.mlp.w_gate_up.numel() == 0 for layer in packed.layers)
    ids = torch.randint(0, 97, (2, 12))
    routing = Routing.top1(torch.randint(0, 3, (24,)))
    with torch.inference_mode():
        assert torch.equal(packed(ids, routing), moe(ids, routing))
        every = Routing.all_experts(24, 3)  # each token through every expert, weighted
        assert torch.equal(packed(ids, every), moe(ids, every))


@packs_bfloat16
@pytest.mark.parametrize("policy", SCHEDULING_POLICIES)
def test_packed_batched_serving_equals_one_by_one(policy):
    """Batched, chunked and cached on packed weights == one request alone, recomputed on plain ones."""
    moe, router = bf16_moe(seed=4), tiny_router()
    assert_batched_equals_one_by_one(pack_model(copy.deepcopy(moe)), router, policy, reference=moe)


def test_packed_router_stays_within_its_contract_of_the_plain_one():
    """The float32 router packed is not bit-exact (oneDNN against MKL), but within the router's own
    tolerance (1e-5) of the plain router, in a full recompute and in a batched decode step, and routes
    the same."""
    plain = tiny_router(num_experts=4, seed=5)
    packed = pack_router(copy.deepcopy(plain))
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), plain(ids), rtol=1e-5, atol=1e-5)
        assert torch.equal(packed.route(packed(ids))[0], plain.route(plain(ids))[0])
        caches = {r: [r.new_cache(1) for _ in range(2)] for r in (plain, packed)}
        for r, cs in caches.items():
            for c, row in zip(cs, ids):
                r.step(row[None, :20], c)
        steps = [r.step_tokens(ids[:, 20], cs) for r, cs in caches.items()]
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(PregateError, match="already packed"):
        pack_router(packed)
    with pytest.raises(PregateError, match="float32 router"):
        pack_router(copy.deepcopy(plain).to(torch.bfloat16))


def test_only_plain_bfloat16_cpu_models_are_packed():
    f32 = build(tiny_hf_model(seed=2), num_experts=2)
    assert not can_pack(f32)  # float32: oneDNN's packed product would not equal F.linear's
    with pytest.raises(PregateError, match="bfloat16 model on CPU"):
        pack_model(f32)
    assert not can_pack(quantize_model(bf16_moe(seed=2)))
    if not cpu_packs_bfloat16():  # refused with the reason, and serving keeps the plain weights
        assert not can_pack(bf16_moe(seed=2))
        with pytest.raises(PregateError, match="this CPU packs bfloat16: False"):
            pack_model(bf16_moe(seed=2))
        return
    packed = pack_model(bf16_moe(seed=2))
    with pytest.raises(PregateError, match="packed=True"):
        pack_model(packed)
    packed.to("cpu")  # what the engine does: allowed, nothing changes
    with pytest.raises(PregateError, match="stays bfloat16 on CPU"):
        packed.float()
    assert packed.norm.weight.dtype == torch.bfloat16  # refused before anything changed


def test_load_engine_packs_a_bfloat16_checkpoint(tiny_checkpoint, tmp_path, capsys):
    """What `pregate serve` loads in bfloat16: the checkpoint's MoE packed (where this CPU can pack
    bfloat16; plain weights elsewhere), behind its router, giving the tokens of the plain weights."""
    from transformers import AutoTokenizer

    from pregate.launch import load_engine
    from pregate.moe import load_moe
    from pregate.router import load_router

    out = served_checkpoint(tiny_checkpoint, tmp_path)
    engine = load_engine(str(out), dtype="bfloat16")
    assert engine.model.packed == cpu_packs_bfloat16()
    # where it cannot pack, the user hears so, and what serves faster
    assert ("cannot pack bfloat16" in capsys.readouterr().out) == (not cpu_packs_bfloat16())
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    got = engine.generate(["hello", "a longer prompt"], params)
    plain = Engine(load_moe(out, torch.bfloat16), AutoTokenizer.from_pretrained(out), load_router(out))
    assert not plain.model.packed
    want = plain.generate(["hello", "a longer prompt"], params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert not load_engine(str(out), dtype="float32").model.packed  # float32: nothing to pack
