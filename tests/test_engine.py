"""The serving engine on tiny float32 models: batched == one-by-one, dense == HF generate, sampling,
errors."""

import pytest
import torch

from pregate.engine import Engine, EngineError, RequestError, SamplingParams, sample_token
from pregate.errors import PregateError
from pregate.moe import Routing, build_moe_from_dense
from pregate.router import PreGatingRouter, RouterConfig
from pregate.scheduler import SCHEDULING_POLICIES, SchedulerConfig
from tests.conftest import build, prompts, reference_greedy, tiny_hf_model, tiny_router, tiny_tokenizer


@pytest.fixture(scope="module")
def moe_and_router():
    return build(tiny_hf_model(seed=4), num_experts=3), tiny_router()


@pytest.mark.parametrize("policy", SCHEDULING_POLICIES)
def test_batched_equals_one_by_one_greedy(moe_and_router, policy):
    moe, router = moe_and_router
    # a small token budget forces prefill chunking and expert-aware queue selection; 5 running at most
    cfg = SchedulerConfig(
        policy=policy, token_budget=8, max_running=5, kv_capacity_tokens=150, prefill_chunk=6
    )
    engine = Engine(moe, router=router, scheduler_config=cfg)
    ps, lens = prompts(8), [6, 3, 9, 1, 7, 4, 8, 5]
    rids = {}
    for i in range(4):  # half at t=0 ...
        rids[i] = engine.add_request(ps[i], SamplingParams(max_tokens=lens[i], ignore_eos=True))
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        if steps in (2, 3, 5, 9):  # ... the rest arrive mid-run
            i = len(rids)
            rids[i] = engine.add_request(ps[i], SamplingParams(max_tokens=lens[i], ignore_eos=True))
    assert len(rids) == 8
    for i, rid in rids.items():
        got = engine.result(rid)
        assert got.finish_reason == "length"
        assert got.token_ids == reference_greedy(moe, router, ps[i], lens[i]), f"request {i}"
        # pre-gating: each fed generated token's expert is the router's choice for it
        assert len(got.expert_ids) == lens[i] - 1
    summary = engine.metrics.summary()
    assert summary["num_requests"] == 8
    assert summary["generated_tokens"] == sum(lens)
    assert max(s.num_tokens for s in engine.metrics.steps) <= 8
    assert all(1 <= s.unique_experts <= 3 for s in engine.metrics.steps)
    # the LM head's rows, as steps record them for the simulator's fit: one per token produced
    assert sum(s.num_token_rows for s in engine.metrics.steps) == sum(lens)
    assert sum(s.num_decode_tokens for s in engine.metrics.steps) == sum(lens) - len(lens)


def test_a_small_request_passes_a_big_one_that_waits_for_kv(moe_and_router):
    """Admission backfill in the real engine: the big request waits for KV, the small one behind it runs
    at once, and every output still equals the request run alone."""
    moe, router = moe_and_router
    ps = prompts(8)
    engine = Engine(moe, router=router, scheduler_config=SchedulerConfig(kv_capacity_tokens=60))
    first = engine.add_request(ps[4], SamplingParams(max_tokens=10, ignore_eos=True))  # 40 + 10 tokens
    big = engine.add_request(ps[7], SamplingParams(max_tokens=10, ignore_eos=True))  # 23 + 10: waits
    small = engine.add_request(ps[0], SamplingParams(max_tokens=4, ignore_eos=True))  # 1 + 4: fits
    ended, started = {}, {}
    step = 0
    while engine.has_work():
        step += 1
        for ev in engine.step():
            started.setdefault(ev.request_id, step)
            if ev.finished:
                ended[ev.request_id] = step
    assert ended[small] < ended[first] < started[big]
    for rid, (p, n) in {first: (ps[4], 10), big: (ps[7], 10), small: (ps[0], 4)}.items():
        assert engine.result(rid).token_ids == reference_greedy(moe, router, p, n)


def test_waiting_requests_hold_no_kv_slot(moe_and_router):
    """The KV pool holds the admitted requests only: a queue of waiting ones costs no cache memory (the
    pool is slots x the longest request, so a slot per queued request would grow it without bound)."""
    moe, router = moe_and_router
    engine = Engine(moe, router=router, scheduler_config=SchedulerConfig(max_running=2))
    ps = prompts(8)
    rids = [engine.add_request(ps[i % 8], SamplingParams(max_tokens=3, ignore_eos=True)) for i in range(12)]
    assert engine.kv.num_slots == 8 and not any(engine.kv.lengths)  # nothing admitted yet
    engine.step()
    assert sum(1 for n in engine.kv.lengths if n) == 2 and engine.kv.num_slots == 8
    while engine.has_work():
        engine.step()
    for i, rid in enumerate(rids):
        assert engine.result(rid).token_ids == reference_greedy(moe, router, ps[i % 8], 3)


def test_top2_routing_batched_equals_reference():
    moe, router = build(tiny_hf_model(seed=5), num_experts=4), tiny_router(4, seed=1, top_k=2)
    engine = Engine(
        moe, router=router, scheduler_config=SchedulerConfig(token_budget=16, policy="expert-aware")
    )
    ps = prompts(4, seed=3)
    outs = engine.generate(ps, SamplingParams(max_tokens=5, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.token_ids == reference_greedy(moe, router, p, 5)


def test_dense_parent_equals_hf_generate():
    hf = tiny_hf_model(seed=6)
    n, i = hf.config.num_hidden_layers, hf.config.intermediate_size
    dense = build_moe_from_dense(hf, [torch.arange(i)] * n, [[] for _ in range(n)])
    engine = Engine(dense, scheduler_config=SchedulerConfig(policy="fcfs", token_budget=32))
    ps = prompts(5, seed=7)
    outs = engine.generate(ps, SamplingParams(max_tokens=12))
    for p, o in zip(ps, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert o.token_ids == ref[0, len(p) :].tolist()
        assert o.finish_reason == ("eos" if o.token_ids[-1] == 2 else "length")
    assert all(s.unique_experts == 0 for s in engine.metrics.steps)


def test_stop_strings_and_max_tokens(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    hf = tiny_hf_model(seed=11, vocab_size=len(tok))  # a seed whose greedy text is not all special tokens
    moe = build(hf)
    router = PreGatingRouter(RouterConfig.preset("tiny", vocab_size=len(tok), num_experts=3)).eval()
    engine = Engine(moe, tok, router, SchedulerConfig(token_budget=64))
    free = engine.generate(["the quick brown fox"], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    text = free.text
    assert len(text) >= 4
    stop = text[-2:]  # a stop string that the unconstrained run produces late
    streamed = []
    rid = engine.add_request(
        "the quick brown fox",
        SamplingParams(max_tokens=12, stop=[stop], ignore_eos=True),
        callback=streamed.append,
    )
    while engine.has_work():
        engine.step()
    assert engine.result(rid) is None  # streamed: the events are the result
    got = engine.generate(
        ["the quick brown fox"], SamplingParams(max_tokens=12, stop=[stop], ignore_eos=True)
    )[0]
    assert got.finish_reason == "stop"
    assert got.text == text[: text.find(stop)] and got.text
    assert got.token_ids == free.token_ids[: len(got.token_ids)] and len(got.token_ids) < 12
    assert "".join(ev.new_text for ev in streamed) == got.text  # the stop string never streams
    assert streamed[-1].finished and sum(len(ev.new_token_ids) for ev in streamed) == len(got.token_ids)


def test_seeded_sampling_reproducible_and_batch_independent(moe_and_router):
    moe, router = moe_and_router
    params = SamplingParams(max_tokens=10, temperature=1.3, top_p=0.9, seed=1234, ignore_eos=True)
    p = prompts(3)[2]
    alone = Engine(moe, router=router).generate([p], params)[0].token_ids
    again = Engine(moe, router=router).generate([p], params)[0].token_ids
    others = prompts(6, seed=9)
    mixed = Engine(
        moe, router=router, scheduler_config=SchedulerConfig(token_budget=12, policy="expert-aware")
    )
    outs = mixed.generate(
        others[:3] + [p] + others[3:],
        [SamplingParams(max_tokens=7, temperature=1.0, seed=s) for s in range(3)]
        + [params]
        + [SamplingParams(max_tokens=4) for _ in range(3)],
    )
    assert alone == again == outs[3].token_ids
    other_seed = Engine(moe, router=router).generate(
        [p], SamplingParams(max_tokens=10, temperature=1.3, top_p=0.9, seed=99, ignore_eos=True)
    )
    assert other_seed[0].token_ids != alone


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.7), g) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; the tail is cut
    draws = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.1), g) for _ in range(50)}
    assert draws == {0}
    assert sample_token(logits, SamplingParams(), None) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed=-1), "seed"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kwargs)


def test_bad_requests_fail_alone(moe_and_router):
    moe, router = moe_and_router
    cfg = SchedulerConfig(token_budget=16, kv_capacity_tokens=100)
    engine = Engine(moe, router=router, scheduler_config=cfg)
    good = prompts(2)
    outs = engine.generate(
        [good[0], [], [7] * 255, good[1], [5, 500], [7] * 97],
        SamplingParams(max_tokens=4, ignore_eos=True),
    )
    reasons = [o.finish_reason for o in outs]
    assert reasons == ["length", "error", "error", "length", "error", "error"]
    assert "empty prompt" in outs[1].error
    assert "context" in outs[2].error  # 255 + 4 tokens > the tiny router's 256 positions (+1)
    assert "vocabulary" in outs[4].error
    assert "kv_capacity_tokens" in outs[5].error  # 97 + 4 can never fit 100 KV tokens
    assert outs[0].token_ids == reference_greedy(moe, router, good[0], 4)
    assert outs[3].token_ids == reference_greedy(moe, router, good[1], 4)
    with pytest.raises(RequestError, match="text prompt needs"):
        engine.add_request("hello")


def test_broken_callback_aborts_only_its_request(moe_and_router):
    moe, router = moe_and_router
    engine = Engine(moe, router=router)
    ps = prompts(2)

    def broken(ev):
        raise ValueError("client went away")

    bad = engine.add_request(ps[0], SamplingParams(max_tokens=5, ignore_eos=True), callback=broken)
    good = engine.add_request(ps[1], SamplingParams(max_tokens=5, ignore_eos=True))
    while engine.has_work():
        engine.step()
    assert engine.result(bad) is None and "client went away" in engine.failed[bad]
    assert engine.result(good).token_ids == reference_greedy(moe, router, ps[1], 5)
    assert [m.request_id for m in engine.metrics.requests] == [good]


def test_stream_yields_tokens_as_they_come(moe_and_router):
    moe, router = moe_and_router
    engine = Engine(moe, router=router)
    p = prompts(3)[1]
    events = list(engine.stream(p, SamplingParams(max_tokens=6, ignore_eos=True)))
    assert [len(e.new_token_ids) for e in events] == [1] * 6
    assert [e.finished for e in events] == [False] * 5 + [True]
    assert [t for e in events for t in e.new_token_ids] == reference_greedy(moe, router, p, 6)


def test_engine_needs_a_fitting_router(moe_and_router):
    moe, _ = moe_and_router
    with pytest.raises(EngineError, match="needs a router"):
        Engine(moe)
    with pytest.raises(EngineError, match="does not fit"):
        Engine(moe, router=tiny_router(num_experts=4))


@pytest.mark.parametrize("prefetch", [False, True])
def test_offloaded_engine_gives_the_same_tokens(moe_and_router, tmp_path, prefetch):
    """Serving with k=1 of 3 experts resident (the rest read from the checkpoint file) changes nothing."""
    from pregate.moe import load_moe, release_routed_experts, save_moe
    from pregate.store import ExpertStore, StoreConfig

    moe, router = moe_and_router
    save_moe(moe, tmp_path)
    cfg = SchedulerConfig(token_budget=8, max_running=5, prefill_chunk=6)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = [
        o.token_ids for o in Engine(moe, router=router, scheduler_config=cfg).generate(prompts(6), params)
    ]
    offloaded = load_moe(tmp_path)
    assert release_routed_experts(offloaded) > 0
    with ExpertStore(tmp_path, StoreConfig(capacity=1, prefetch=prefetch)) as store:
        engine = Engine(offloaded, router=router, scheduler_config=cfg, expert_store=store)
        assert [o.token_ids for o in engine.generate(prompts(6), params)] == want
        assert store.stats.misses > 0 and store.stats.hits > 0
    with pytest.raises(PregateError, match="released to an expert store"):
        offloaded(torch.tensor([[5, 6]]), Routing.top1(torch.tensor([0, 1])))
    never_loaded = load_moe(tmp_path, routed_experts=False)  # what `serve --resident-experts` loads
    assert all(
        layer.mlp.w_gate_up.numel() == 0 == layer.mlp.w_down_t.numel() for layer in never_loaded.layers
    )
    with ExpertStore(tmp_path, StoreConfig(capacity=2, prefetch=prefetch)) as store:
        engine = Engine(never_loaded, router=router, scheduler_config=cfg, expert_store=store)
        assert [o.token_ids for o in engine.generate(prompts(6), params)] == want


def test_expert_store_must_match_the_model(moe_and_router, tmp_path):
    from pregate.moe import save_moe
    from pregate.store import ExpertStore, StoreConfig

    moe, router = moe_and_router
    save_moe(moe, tmp_path)
    half = build(tiny_hf_model(seed=4), num_experts=3).to(torch.bfloat16)
    with ExpertStore(tmp_path, StoreConfig(capacity=2)) as store:
        with pytest.raises(EngineError, match="load the model in torch.float32"):
            Engine(half, router=router, expert_store=store)
        with pytest.raises(EngineError, match="does not belong to this model"):
            Engine(build(tiny_hf_model(seed=4), num_experts=2), router=tiny_router(2), expert_store=store)


def test_a_decode_step_makes_one_attention_call_per_layer(moe_and_router, monkeypatch):
    """B decoding requests share the engine's KV cache, so each layer attends to all of them at once."""
    import pregate.moe

    moe, router = moe_and_router
    engine = Engine(
        moe, router=router, scheduler_config=SchedulerConfig(policy="decode-first", token_budget=64)
    )
    ps = prompts(6)
    for p in ps:
        engine.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True))
    engine.step()  # admits all six and starts their prompts
    while any(r.in_prefill for r in engine.scheduler.running):
        engine.step()
    calls, inside = [], []
    real_attention, real_forward = pregate.moe.F.scaled_dot_product_attention, engine.model.forward_packed

    def attention(*args, **kwargs):  # the router attends too: count only the backbone's calls
        calls.extend(inside)
        return real_attention(*args, **kwargs)

    def forward(*args, **kwargs):
        inside.append(1)
        try:
            return real_forward(*args, **kwargs)
        finally:
            inside.clear()

    monkeypatch.setattr(pregate.moe.F, "scaled_dot_product_attention", attention)
    monkeypatch.setattr(engine.model, "forward_packed", forward)
    out = engine.step()
    assert len(out) == 6  # six decode rows in this step ...
    assert len(calls) == len(moe.layers)  # ... and one attention call per layer


def test_kv_slots_are_reused_across_bursts(moe_and_router):
    moe, router = moe_and_router
    engine = Engine(moe, router=router, scheduler_config=SchedulerConfig(token_budget=64, max_running=4))
    shapes = []
    for burst in range(3):
        outs = engine.generate(prompts(8, seed=burst), SamplingParams(max_tokens=3, ignore_eos=True))
        assert all(o.finish_reason == "length" for o in outs)
        shapes.append(tuple(engine.kv.k[0].shape))
    assert shapes[0] == shapes[-1] and shapes[0][0] <= 8  # no growth after the first burst
    assert sorted(engine.kv._free) == list(range(engine.kv.num_slots))  # every slot returned


def test_a_long_running_engine_remembers_a_bounded_history(moe_and_router):
    """A server's engine keeps only its last `history` finished requests, steps and failures."""
    moe, router = moe_and_router
    engine = Engine(moe, None, router, SchedulerConfig(max_running=4), history=3)
    for round_ in range(4):
        outs = engine.generate(prompts(6, seed=round_) + [[]], SamplingParams(max_tokens=3))  # [] is refused
        assert [o.finish_reason for o in outs] == ["length"] * 6 + ["error"]
    assert len(engine.metrics.requests) == 3 and len(engine.metrics.steps) == 3 and len(engine.failed) == 3
    unbounded = Engine(moe, None, router, SchedulerConfig(max_running=4))
    unbounded.generate(prompts(6), SamplingParams(max_tokens=3))
    assert len(unbounded.metrics.requests) == 6 and len(unbounded.metrics.steps) > 5
