"""Weight-only int8 (pregate.quantize): the kernel against a dequantized reference, the quantized model
against its float self, and the serving equivalences under int8."""

import copy

import pytest
import torch

from pregate.engine import Engine, SamplingParams
from pregate.errors import PregateError
from pregate.moe import Routing, build_moe_from_dense
from pregate.quantize import (
    ALIGN,
    DEQUANT_ROWS,
    Int8Linear,
    int8_matmul,
    quantize_model,
    quantize_router,
    quantize_rows,
)
from pregate.scheduler import SCHEDULING_POLICIES, SchedulerConfig
from tests.conftest import (
    assert_batched_equals_one_by_one,
    build,
    prompts,
    served_checkpoint,
    tiny_hf_model,
    tiny_router,
)

torch.manual_seed(0)


def weight_bytes(model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t.dtype != torch.long}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_quantize_rows_round_trips_within_half_a_step():
    w = torch.randn(37, 50) * torch.linspace(0.01, 3, 37)[:, None]  # rows of very different ranges
    w[5] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (q[5] == 0).all()


@pytest.mark.parametrize("k", [ALIGN, 48, 80, 100])  # multiples of 32 and not (padded)
@pytest.mark.parametrize("m", [1, 3, 8, DEQUANT_ROWS])  # the int8 kernel, and the prefill path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_equals_dequantized_reference(k, m, dtype):
    w, x = torch.randn(24, k), torch.randn(m, k).to(dtype)
    layer = Int8Linear(w, None, dtype)
    assert layer.qweight.shape == (24, -(-k // ALIGN) * ALIGN)  # zero-padded to the kernel's alignment
    reference = x.float() @ (layer.qweight[:, :k].float() * layer.scales.float()[:, None]).T
    tol = 1e-4 if dtype == torch.float32 and m >= DEQUANT_ROWS else 2e-2  # the CPU kernel runs in bf16
    torch.testing.assert_close(layer(x).float(), reference, rtol=tol, atol=tol * reference.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_activation_dtypes_cross_the_cpu_kernel_in_bfloat16(dtype):
    """torch's CPU int8 kernel is vectorized only for bfloat16: other dtypes get the same result as a
    bfloat16 call, in the caller's dtype."""
    q, s = quantize_rows(torch.randn(40, 64))
    x = torch.randn(3, 64).to(dtype)
    scales = s.to(dtype)  # as a model of that dtype holds them
    y = int8_matmul(x, q, scales)
    bf16 = torch._weight_int8pack_mm(x.to(torch.bfloat16), q, scales.to(torch.bfloat16))
    assert y.dtype == dtype and torch.equal(y, bf16.to(dtype))


def test_int8_rows_do_not_depend_on_the_batch():
    """What makes batched == one-by-one hold bit-exactly under int8: a row's result is its own."""
    q, s = quantize_rows(torch.randn(40, 64))
    x = torch.randn(9, 64)
    one_by_one = torch.cat([int8_matmul(x[i : i + 1], q, s) for i in range(9)])
    assert torch.equal(int8_matmul(x, q, s), one_by_one)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied embeddings + no bias; untied + q/k/v bias
def test_quantized_moe_stays_close_to_the_float_model(family):
    moe = build(tiny_hf_model(family, seed=1), num_experts=3)
    q = quantize_model(copy.deepcopy(moe))
    ids = torch.randint(0, 97, (2, 12))
    routing = Routing.top1(torch.randint(0, 3, (24,)))
    with torch.no_grad():
        ref, got = moe(ids, routing), q(ids, routing)
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.03, rel  # int8 weights, and on CPU the kernel's bfloat16 activations (~2 % here)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert q.quantized == "int8" and not any(p.requires_grad for p in q.parameters())
    assert all(layer.mlp.w_gate_up.numel() == 0 for layer in q.layers)  # the float experts are freed
    # int8 + scales: under half of float32's bytes, even with this tiny model's padding (48 -> 64 columns)
    # and, untied, its input embedding kept in float32
    assert weight_bytes(q) < 0.45 * weight_bytes(moe)


def test_int8_experts_views_follow_their_buffers():
    """The per-expert views are made once; moving or converting the module must not leave them reading
    the old buffers."""
    moe = quantize_model(build(tiny_hf_model(seed=2), num_experts=3))
    experts = moe.layers[0].mlp.inference_experts
    w = moe.layers[0].mlp.widths[1]
    x = torch.randn(3, moe.config.base["hidden_size"])
    silu = torch.nn.functional.silu
    before = experts.run(1, w, x, silu)[1]
    experts.down_scales.mul_(2)  # in place: the views see it
    assert torch.allclose(experts.run(1, w, x, silu)[1], 2 * before, rtol=1e-2)
    experts.to(torch.float64)  # replaces the float buffers; the views must follow
    experts.down_scales.mul_(2)
    assert torch.allclose(experts.run(1, w, x, silu)[1], 4 * before, rtol=1e-2)


def test_tied_embedding_reads_the_int8_head():
    moe = build(tiny_hf_model("llama", seed=2), num_experts=2)
    q = quantize_model(copy.deepcopy(moe))
    ids = torch.tensor([0, 5, 96])
    rows = q.embed_tokens(ids)
    head = q.lm_head
    assert q.embed_tokens.table is head  # one int8 table for both, no float copy kept
    torch.testing.assert_close(rows, head.qweight[ids, :48].float() * head.scales[ids, None])
    err = (rows - moe.embed_tokens(ids)).abs().max()
    assert err <= head.scales.max() / 2 + 1e-6


@pytest.mark.parametrize("policy", SCHEDULING_POLICIES)
def test_int8_batched_serving_equals_one_by_one(policy):
    """The engine's equivalence under int8: batched, chunked, cached == one request alone, recomputed."""
    moe, router = quantize_model(build(tiny_hf_model(seed=4), num_experts=3)), quantize_router(tiny_router())
    assert_batched_equals_one_by_one(moe, router, policy)


def test_quantized_router_steps_equal_its_recompute_and_stay_near_the_float_router():
    """The int8 router keeps the router's contract (a step over the cache equals the full recompute,
    the decode rows of many requests equal one each), reads under a third of the float bytes, and routes
    nearly every token as the float router does."""
    float_router = tiny_router(num_experts=4, seed=3)
    router = quantize_router(copy.deepcopy(float_router))
    assert router.quantized == "int8" and not any(p.requires_grad for p in router.parameters())
    for part in ("embed", "layers"):  # int8 + one float32 scale per row of 32 (this tiny router's width)
        assert weight_bytes(getattr(router, part)) < 0.35 * weight_bytes(getattr(float_router, part))
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        full = router(ids)[0]  # [40, E]
        cache = router.new_cache(1)
        assert cache.keys[0].dtype == torch.float32
        chunked = torch.cat([router.step(ids[:, :25], cache)[0], router.step(ids[:, 25:30], cache)[0]])
        caches = [router.new_cache(1) for _ in range(3)]
        for c, row in zip(caches, torch.randint(0, 97, (3, 6))):
            router.step(row[None], c)
        alone = torch.cat([router.step(torch.tensor([[t]]), c.clone())[0] for t, c in zip([7, 8, 9], caches)])
        batched = router.step_tokens(torch.tensor([7, 8, 9]), caches)
        ref = float_router(ids)[0]
    torch.testing.assert_close(chunked, full[:30], rtol=1e-2, atol=1e-2)  # bf16 activations in the kernel
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)  # as the float router (its contract)
    assert (full.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    with pytest.raises(PregateError, match="already quantized"):
        quantize_router(router)


def test_int8_dense_parent_in_the_engine():
    """A dense parent (no routed experts) quantizes too: the baseline of `bench step --quantize`."""
    hf = tiny_hf_model(seed=5)
    n, width = hf.config.num_hidden_layers, hf.config.intermediate_size
    dense = quantize_model(build_moe_from_dense(hf, [torch.arange(width)] * n, [[] for _ in range(n)]))
    engine = Engine(dense, scheduler_config=SchedulerConfig(kv_capacity_tokens=200))
    out = engine.generate([prompts(2)[1]], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    seq = list(prompts(2)[1])
    for tok in out.token_ids:  # full recompute, no cache
        with torch.no_grad():
            assert int(dense(torch.tensor([seq]))[0, -1].argmax()) == tok
        seq.append(tok)


def test_bad_uses_are_refused_clearly():
    moe = build(tiny_hf_model(seed=6), num_experts=2)
    with pytest.raises(PregateError, match="unknown quantization 'int4'"):
        quantize_model(moe, "int4")
    quantize_model(moe)
    with pytest.raises(PregateError, match="already quantized"):
        quantize_model(moe)


@pytest.mark.parametrize("prefetch", [False, True])
def test_int8_with_an_expert_store_equals_resident_int8(tmp_path, prefetch):
    """`serve --resident-experts k --quantize int8`: the store serves the routed experts in the checkpoint's
    dtype, the rest is int8; the tokens equal a resident model quantized the same way."""
    from pregate.moe import load_moe, save_moe
    from pregate.store import ExpertStore, StoreConfig

    router = tiny_router()
    save_moe(build(tiny_hf_model(seed=4), num_experts=3), tmp_path)
    cfg = SchedulerConfig(token_budget=8, max_running=5, prefill_chunk=6)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    resident = quantize_model(load_moe(tmp_path), experts=False)
    assert all(layer.mlp.inference_experts is None for layer in resident.layers)
    want = [
        o.token_ids
        for o in Engine(resident, router=router, scheduler_config=cfg).generate(prompts(6), params)
    ]
    offloaded = quantize_model(load_moe(tmp_path, routed_experts=False))  # what load_engine does
    assert isinstance(offloaded.layers[0].self_attn.qkv_proj, Int8Linear)
    with ExpertStore(tmp_path, StoreConfig(capacity=1, prefetch=prefetch)) as store:
        engine = Engine(offloaded, router=router, scheduler_config=cfg, expert_store=store)
        assert [o.token_ids for o in engine.generate(prompts(6), params)] == want
        assert store.stats.misses > 0


def test_load_engine_serves_int8(tiny_checkpoint, tmp_path):
    """What `pregate serve --quantize int8` loads: the checkpoint's MoE, quantized, behind its router."""
    from pregate.launch import load_engine

    out = served_checkpoint(tiny_checkpoint, tmp_path)
    engine = load_engine(str(out), dtype="float32", quantize="int8")
    assert engine.model.quantized == "int8"
    got = engine.generate(["hello"], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert got.finish_reason == "length" and len(got.token_ids) == 4
