"""The native decode layers (pregate.native), over bfloat16 and int8 weights: the eager path's arithmetic
within rounding, the same bits for a decode row alone, in any batch, beside prompt chunks and at any
thread count, and batched serving equal to serving each request alone."""

import copy

import pytest
import torch

from pregate import native
from pregate.errors import PregateError
from pregate.moe import Routing, RoutingPlan
from pregate.packed import cpu_packs_bfloat16, serving_layout
from pregate.scheduler import SCHEDULING_POLICIES
from tests.conftest import (
    assert_batched_equals_one_by_one,
    build,
    served_checkpoint,
    tiny_hf_model,
    tiny_router,
)

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None, reason=str(native.unavailable_reason())
)


# (quantize, pairs): the kernels a test runs. bfloat16 and int8 on the machine's default products
# (AVX512-BF16's pair dot products where the CPU has them), and there on AVX2's too.
KERNELS = [(None, None), ("int8", None)] + [(None, False), ("int8", False)] * native.pair_dots()
KERNEL_IDS = ["bf16", "int8", "bf16-avx2", "int8-avx2"][: len(KERNELS)]


def bf16_moe(seed: int = 0, family: str = "llama", num_experts: int = 3, hidden: int = 48):
    hf = tiny_hf_model(family, seed=seed, hidden_size=hidden)
    return build(hf, num_experts=num_experts).to(torch.bfloat16).eval()


def native_moe(quantize, seed: int = 0, family: str = "llama", pairs: bool | None = None):
    """(the bfloat16 model, a copy served natively, int8 with `quantize`, its products' kernel picked by
    `pairs`: native.library): int8 needs a hidden size that is a multiple of 32."""
    plain = bf16_moe(seed=seed, family=family, hidden=64 if quantize else 48)
    return plain, serving_layout(copy.deepcopy(plain), quantize=quantize, native=True, pairs=pairs)[0]


def routings(rows: int, experts: int, seed: int):
    """Top-1 to one expert, top-1 spread over experts, and every expert with softmax weights."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.randint(0, experts, (rows,), generator=g)
    weights = torch.rand(rows, experts, generator=g).softmax(-1)
    every = Routing(torch.arange(experts).repeat(rows, 1), weights)
    return {
        "one": Routing.top1(torch.zeros(rows, dtype=torch.long)),
        "spread": Routing.top1(spread),
        "every": every,
    }


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("quantize, pairs", KERNELS, ids=KERNEL_IDS)
def test_native_mlp_is_the_eager_arithmetic_within_rounding(rows, quantize, pairs):
    """Each element equals the eager path's (torch's own products on the same weights, bfloat16 or int8)
    or differs from it by float32 summation order: after bfloat16 rounding, rarely, and then by about one
    unit in the last place."""
    moe = native_moe(quantize, seed=1, pairs=pairs)[1]
    hidden = moe.config.base["hidden_size"]
    torch.manual_seed(rows)
    differing = total = 0
    with torch.no_grad():
        for i, layer in enumerate(moe.layers):
            mlp, run = layer.mlp, moe.native.layers[i].mlp.run
            x = torch.randn(rows, hidden, dtype=torch.bfloat16)
            h = torch.randn(rows, hidden, dtype=torch.bfloat16)
            for name, routing in routings(rows, 3, seed=rows).items():
                plan, args = RoutingPlan(routing, 3), native.PlanArgs(routing, None, 3)
                assert list(args.experts)[: args.groups] == [e for e, _, _ in plan.groups]  # same grouping
                assert list(args.rows_of) == plan.order.tolist()
                got = run(x, args, h)
                want = h + mlp(x, plan)
                torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2, msg=f"routing {name}")
                differing += int((got != want).sum())
                total += got.numel()
    assert differing <= 0.02 * total, f"{differing} of {total} elements differ"


@pytest.mark.parametrize("quantize, pairs", KERNELS, ids=KERNEL_IDS)
def test_a_row_gives_the_same_bits_alone_in_any_batch_and_at_any_thread_count(quantize, pairs):
    """Every batch from 1 to 11 rows (each tile width of native.h, and more rows than one tile holds)."""
    hidden = 64 if quantize else 48  # int8 rows are padded to a multiple of 32
    moe = bf16_moe(seed=2, num_experts=4, hidden=hidden)
    moe = serving_layout(moe, quantize=quantize, native=True, pairs=pairs)[0]
    run = moe.native.layers[1].mlp.run
    torch.manual_seed(0)
    x, h = torch.randn(11, hidden, dtype=torch.bfloat16), torch.randn(11, hidden, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    with torch.no_grad():
        for name, routing in routings(11, 4, seed=3).items():
            alone = []
            for i in range(11):
                one = Routing(routing.expert_ids[i : i + 1], routing.weights[i : i + 1])
                alone.append(run(x[i : i + 1], native.PlanArgs(one, None, 4), h[i : i + 1]))
            for n in range(2, 12):
                first = Routing(routing.expert_ids[:n], routing.weights[:n])
                assert torch.equal(run(x[:n], native.PlanArgs(first, None, 4), h[:n]), torch.cat(alone[:n]))
            batch = torch.cat(alone)
            try:
                torch.set_num_threads(1)
                assert torch.equal(run(x, native.PlanArgs(routing, None, 4), h), batch), name
            finally:
                torch.set_num_threads(threads)


def test_how_a_step_divides_between_native_calls_and_torch():
    """A step of at most WHOLE_ROWS tokens in one cache runs wholly natively, in calls of at most
    `call_rows` rows (in stream order, or past one call its one-token rows first, grouped by expert); in
    a larger one the decode rows run natively (in such calls, however many) and the prompt chunks through
    torch, unless the limit is off (bfloat16 on a CPU whose oneDNN cannot pack it: `native.whole_rows`);
    a step with a gradient runs through torch."""
    from pregate.moe import AttentionPlan, Segment

    moe = native.attach_native(bf16_moe(seed=3))
    n = moe.native.call_rows
    assert moe.native.whole_rows == (native.WHOLE_ROWS if cpu_packs_bfloat16() else None)
    assert native.whole_rows(quantized=True) == native.WHOLE_ROWS
    moe.native.whole_rows = native.WHOLE_ROWS  # the limit as a CPU that packs bfloat16 has it
    cache = moe.new_cache(capacity=8, slots=2 * n + 1)
    h = torch.zeros(native.WHOLE_ROWS + 8, 48, dtype=torch.bfloat16)
    rows = [Segment(1, cache, s) for s in range(2 * n + 1)]

    def calls(step):
        return [(c.start, c.end) for c in step.calls]

    with torch.no_grad():
        step = moe.native.step(AttentionPlan(rows[: n + 1], None), None, h[: n + 1])
        assert calls(step) == [(0, n), (n, n + 1)] and step.rows is None
        chunked = AttentionPlan([Segment(n + 2, cache, 0), Segment(1, cache, 1)], None)  # cut in two calls
        assert calls(moe.native.step(chunked, None, h[: n + 3])) == [(0, n), (n, n + 3)]
        big = native.WHOLE_ROWS + 1  # past WHOLE_ROWS: the chunk through torch, the decode rows natively
        mixed = AttentionPlan([Segment(big, cache, 0), *rows[1 : 2 * n + 1]], None)
        step = moe.native.step(mixed, None, h[: big + 2 * n])
        assert step.rows.tolist() == list(range(big, big + 2 * n)) and step.rest_rows.tolist() == list(
            range(big)
        )
        assert calls(step) == [(0, n), (n, 2 * n)]
        assert moe.native.step(AttentionPlan([Segment(big, cache, 0)], None), None, h[:big]) is None
        moe.native.whole_rows = None  # no limit: the whole mixed step natively, in stream order
        step = moe.native.step(mixed, None, h[: big + 2 * n])
        assert step.rows is None and step.rest_rows is None
        assert calls(step) == [(a, min(a + n, big + 2 * n)) for a in range(0, big + 2 * n, n)]
        # past one call, the one-token rows go first, grouped by expert, each chunk's rows in order
        interleaved = Routing.top1(torch.tensor([r % 3 for r in range(2 * n + 3)]))
        decodes = AttentionPlan([*rows[1 : 2 * n + 1], Segment(3, cache, 0)], None)
        step = moe.native.step(decodes, interleaved, h[: 2 * n + 3])
        want = sorted(range(2 * n), key=lambda r: r % 3) + [2 * n, 2 * n + 1, 2 * n + 2]
        assert step.rows.tolist() == want and calls(step) == [(0, n), (n, 2 * n), (2 * n, 2 * n + 3)]
        assert [c.plan_args.groups for c in step.calls] == [2, 2, 3]  # stream order: 3, 3, 3
        assert native.by_expert([1, 1, 2, 1], [[1], [0], [0], [0], [1]]) == [1, 0, 4, 2, 3]
    assert moe.native.step(AttentionPlan(rows[:1], None), None, h[:1]) is None  # gradients on: training


def one_by_one_engine_tokens(
    model, router, policy: str, token_budget: int = 8, max_running: int = 5, many=False
):
    """Six requests (`many`: twelve) through one engine, and each alone through an engine of its own
    (same budgets)."""
    from pregate.engine import Engine, SamplingParams
    from pregate.scheduler import SchedulerConfig
    from tests.conftest import prompts

    cfg = SchedulerConfig(
        policy=policy,
        token_budget=token_budget,
        max_running=max_running,
        kv_capacity_tokens=300 if many else 150,
        prefill_chunk=6,
    )
    ps, lens = prompts(6), [6, 3, 9, 1, 7, 4]
    if many:
        ps, lens = ps + prompts(6, seed=1), lens + [8, 5, 2, 9, 6, 3]

    def run(pairs):
        engine = Engine(model, router=router, scheduler_config=cfg)
        rids = [engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in pairs]
        while engine.has_work():
            engine.step()
        return [engine.result(r).token_ids for r in rids]

    return run(list(zip(ps, lens))), [run([pair])[0] for pair in zip(ps, lens)]


@pytest.mark.parametrize("budget", [native.NATIVE_ROWS, native.WHOLE_ROWS])
@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("policy", SCHEDULING_POLICIES)
def test_native_batched_serving_equals_one_by_one_serving(policy, quantize, budget, monkeypatch):
    """At a token budget of at most WHOLE_ROWS every step runs natively, decode rows and prompt chunks
    alike (past NATIVE_ROWS in several calls), so batched, chunked and cached serving gives each request
    exactly the tokens it gets served alone, in bfloat16 and in int8 (at most five token-producing rows
    here: the int8 head's native limit is HEAD_ROWS)."""
    _, served = native_moe(quantize, seed=4)
    torch_layers = []
    real = type(served)._layer
    monkeypatch.setattr(
        type(served), "_layer", lambda self, *a, **k: torch_layers.append(1) or real(self, *a, **k)
    )
    batched, alone = one_by_one_engine_tokens(served, tiny_router(), policy, budget)
    assert batched == alone
    assert not torch_layers


@pytest.mark.parametrize("policy", SCHEDULING_POLICIES)
def test_native_serving_past_one_call_equals_one_by_one_serving(policy):
    """Twelve requests running at once: their decode steps take two native calls of at most NATIVE_ROWS
    (set so: twelve fit one call of PAIR_ROWS), the one-token rows reordered by expert between them
    (`by_expert`), and each request still gets exactly the tokens it gets served alone (bfloat16: its
    native head has no row limit)."""
    _, served = native_moe(None, seed=4)
    served.native.call_rows = native.NATIVE_ROWS
    calls = []
    real = native.NativeDecoder.run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            native.NativeDecoder,
            "run",
            lambda self, h, c, s, step: calls.append(step.rows) or real(self, h, c, s, step),
        )
        batched, alone = one_by_one_engine_tokens(
            served, tiny_router(), policy, native.WHOLE_ROWS, max_running=12, many=True
        )
    assert batched == alone
    assert any(rows is not None and rows.tolist() != sorted(rows.tolist()) for rows in calls)  # reordered


def test_native_serving_gives_the_eager_tokens():
    """Served natively (decode rows native, prompt chunks through torch), each request gets the tokens of
    the plain eager model computing it alone by full recompute (within rounding in general; equal here)."""
    moe, router = bf16_moe(seed=5), tiny_router()
    served, _ = serving_layout(copy.deepcopy(moe), native=True)
    assert served.native is not None and served.packed == cpu_packs_bfloat16()
    assert isinstance(served.lm_head, native.NativeHead) != served.packed  # a plain head runs natively
    assert_batched_equals_one_by_one(served, router, "expert-aware", reference=moe)


def test_what_native_refuses():
    f32 = build(tiny_hf_model(seed=6), num_experts=2)
    assert "bfloat16" in native.can_run_native(f32)
    with pytest.raises(PregateError, match="bfloat16"):
        native.attach_native(f32)
    with pytest.raises(PregateError, match="multiple of 32"):  # int8 rows padded past 48 columns
        serving_layout(bf16_moe(seed=6), quantize="int8", native=True)
    if cpu_packs_bfloat16():
        packed, _ = serving_layout(bf16_moe(seed=6))
        assert "packed" in native.can_run_native(packed)
    gelu = build(tiny_hf_model(seed=6, hidden_act="gelu"), num_experts=2).to(torch.bfloat16)
    assert "SiLU" in native.can_run_native(gelu)


def test_serve_loads_the_native_layout_and_answers_with_the_plain_tokens(tiny_checkpoint, tmp_path, capsys):
    """`pregate serve --native`'s loader: the checkpoint's MoE with native MLPs behind its router, giving
    the tokens of the plain bfloat16 engine, and saying which products its kernels run; with an expert
    store it is refused with the reason."""
    from transformers import AutoTokenizer

    from pregate.engine import Engine, SamplingParams
    from pregate.launch import load_engine
    from pregate.moe import load_moe
    from pregate.router import load_router

    out = served_checkpoint(tiny_checkpoint, tmp_path)
    engine = load_engine(str(out), dtype="bfloat16", native=True)
    assert engine.model.native is not None
    assert native.products() == ("AVX512-BF16's pair dot products" if native.pair_dots() else "AVX2")
    assert (
        f"native decode layers: bfloat16 and int8 products on {native.products()}" in capsys.readouterr().out
    )
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    got = engine.generate(["hello", "a longer prompt"], params)
    plain = Engine(load_moe(out, torch.bfloat16), AutoTokenizer.from_pretrained(out), load_router(out))
    want = plain.generate(["hello", "a longer prompt"], params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    with pytest.raises(PregateError, match="--native"):  # the store computes in float32 here
        load_engine(str(out), dtype="bfloat16", resident_experts=1, native=True)


@pytest.mark.parametrize("batch", [4, 11])
@pytest.mark.parametrize("quantize, pairs", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied + no bias; untied + q/k/v bias
def test_a_decode_step_runs_natively_the_same_alone_or_batched(family, quantize, pairs, batch, monkeypatch):
    """A decode step of B sequences in the KV pool goes through the native decoder (one call per
    `call_rows` rows), gives each row the bits it gets decoding alone and on one thread, and stays within
    rounding of the torch path on the same weights (bfloat16, or int8 through torch's int8 kernel)."""
    from pregate.moe import Segment

    plain, model = native_moe(quantize, seed=7, family=family, pairs=pairs)
    if quantize:
        plain = serving_layout(plain, quantize=quantize)[0]
    calls = []
    real = native.NativeDecoder.run
    monkeypatch.setattr(
        native.NativeDecoder,
        "run",
        lambda self, h, c, s, step: (
            calls.append([b.end - b.start for b in step.calls]) or real(self, h, c, s, step)
        ),
    )
    g = torch.Generator().manual_seed(0)
    # contexts of one to five of the attention's 32-position chunks (merged across chunks in order)
    lengths = [(5, 40, 3, 150)[i % 4] for i in range(batch)]
    prompts = [torch.randint(3, 97, (n,), generator=g) for n in lengths]
    nxt = torch.randint(3, 97, (batch,), generator=g)
    route = Routing.top1(torch.tensor([0, 2, 1, 2] * 3)[:batch])

    def decode(m, rows):
        cache = m.new_cache(capacity=160, slots=batch)
        for slot, p in enumerate(prompts):
            assert cache.acquire(160) == slot
            m.forward_packed(
                p, [Segment(len(p), cache, slot)], Routing.top1(torch.zeros(len(p), dtype=torch.long))
            )
        if rows is None:  # every row in one step
            return m.forward_packed(nxt, [Segment(1, cache, s) for s in range(batch)], route)
        return torch.cat(
            [
                m.forward_packed(
                    nxt[s : s + 1],
                    [Segment(1, cache, s)],
                    Routing(route.expert_ids[s : s + 1], route.weights[s : s + 1]),
                )
                for s in rows
            ]
        )

    with torch.inference_mode():
        batched = decode(model, None)

        # the prompts of at most whole_rows tokens natively, then one decode step: its rows through every
        # layer in native calls of at most call_rows rows (NATIVE_ROWS, or PAIR_ROWS on the pair products)
        def cut(n):
            return [min(model.native.call_rows, n - a) for a in range(0, n, model.native.call_rows)]

        limit = model.native.whole_rows  # None: any prompt natively (bfloat16 where oneDNN cannot pack)
        assert calls == [cut(n) for n in lengths if limit is None or n <= limit] + [cut(batch)]
        alone = decode(model, range(batch))
        want = decode(plain, None)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)  # the chunks and heads split otherwise among the threads
            one_thread = decode(model, None)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(batched, alone) and torch.equal(batched, one_thread)
    torch.testing.assert_close(batched, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("last_chunk", [3, 9])  # a step of 8 tokens (one call), of 14 (two, the chunk cut)
@pytest.mark.parametrize("quantize, pairs", KERNELS, ids=KERNEL_IDS)
def test_a_small_step_with_prompt_chunks_runs_natively_and_gives_the_bits_of_decoding_token_by_token(
    quantize, pairs, last_chunk, monkeypatch
):
    """A step of at most WHOLE_ROWS tokens in one KV cache, prompt chunks and decode rows together, runs
    natively: each chunk token attends to its chunk's earlier tokens (in an earlier call too), so the
    logits and the cache are the bits of feeding the same tokens one at a time, and within rounding of
    the torch path."""
    from pregate.moe import Segment

    plain, model = native_moe(quantize, seed=8, pairs=pairs)
    if quantize:
        plain = serving_layout(plain, quantize=quantize)[0]
    torch_layers = []
    real = type(model)._layer
    monkeypatch.setattr(
        type(model), "_layer", lambda self, *a, **k: torch_layers.append(1) or real(self, *a, **k)
    )
    g = torch.Generator().manual_seed(1)
    first = torch.randint(3, 97, (9,), generator=g)  # slot 0: 9 tokens cached, then 1 decode row
    chunk = torch.randint(3, 97, (4,), generator=g)  # slot 1: a first chunk of 4 tokens
    later = torch.randint(3, 97, (2 + last_chunk,), generator=g)  # slot 2: 2 tokens cached, then a chunk
    experts = torch.randint(0, 3, (5 + last_chunk,), generator=g)
    tokens = torch.cat([first[8:], chunk, later[2:]])

    def prime(m):
        cache = m.new_cache(capacity=16, slots=3)
        assert [cache.acquire(16) for _ in range(3)] == [0, 1, 2]
        for slot, ids in ((0, first[:8]), (2, later[:2])):
            m.forward_packed(
                ids, [Segment(len(ids), cache, slot)], Routing.top1(torch.zeros(len(ids), dtype=torch.long))
            )
        return cache

    def one_step(m):
        cache = prime(m)
        segments = [Segment(1, cache, 0), Segment(4, cache, 1), Segment(last_chunk, cache, 2)]
        return m.forward_packed(tokens, segments, Routing.top1(experts)), cache

    def token_by_token(m):
        cache = prime(m)
        slots = [0, 1, 1, 1, 1] + [2] * last_chunk
        rows = [
            m.forward_packed(tokens[i : i + 1], [Segment(1, cache, s)], Routing.top1(experts[i : i + 1]))
            for i, s in enumerate(slots)
        ]
        return torch.cat(rows), cache

    with torch.inference_mode():
        torch_layers.clear()
        step, cache = one_step(model)
        assert not torch_layers  # every row of the step went through the native decoder
        alone, alone_cache = token_by_token(model)
        want, _ = one_step(plain)
    assert torch.equal(step, alone)
    for layer in range(len(cache.k)):
        assert torch.equal(cache.k[layer][:3, :, :11], alone_cache.k[layer][:3, :, :11])
        assert torch.equal(cache.v[layer][:3, :, :11], alone_cache.v[layer][:3, :, :11])
    assert cache.lengths[:3] == [9, 4, 2 + last_chunk]
    torch.testing.assert_close(step, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("quantize, pairs", KERNELS, ids=KERNEL_IDS)
def test_the_native_head_is_torchs_head_within_rounding_and_the_same_bits_in_any_batch(quantize, pairs):
    """An LM head over a step's token-producing rows runs natively (pregate.native.NativeHead): an int8
    one, or a plain bfloat16 one (tied to the embedding, the same table: what a CPU that cannot pack
    bfloat16 serves). Torch's product within one bfloat16 step of each logit, a row's logits the same bits
    alone or in a batch; with a gradient, and in int8 past its `max_rows` (HEAD_ROWS, or PAIR_HEAD_ROWS
    on the pair dot products), it is the wrapped layer itself (bfloat16 stays native there)."""
    plain, model = native_moe(quantize, seed=8, pairs=pairs)
    if quantize is None:  # attach_native on the plain weights: the packed head a packing CPU serves stays
        model = native.attach_native(copy.deepcopy(plain), pairs)
    head = model.lm_head
    assert isinstance(head, native.NativeHead) and head.int8 == (quantize == "int8")
    on_pairs = native.pair_dots() if pairs is None else pairs
    assert head.max_rows == (
        None if not quantize else native.PAIR_HEAD_ROWS if on_pairs else native.HEAD_ROWS
    )
    if quantize is None:
        assert head.inner.weight is model.embed_tokens.weight  # tied: no copy
    width = head.inner.in_features
    x = torch.randn(5, width, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    with torch.no_grad():
        got, want = head(x), head.inner(x)
        alone = torch.cat([head(x[i : i + 1]) for i in range(5)])
        many = torch.randn((head.max_rows or native.HEAD_ROWS) + 1, width).to(torch.bfloat16)
        if quantize:
            assert torch.equal(head(many), head.inner(many))
            assert torch.equal(head(many[:-1])[:1], head(many[:1]))  # up to max_rows: native, batched
        else:
            assert torch.equal(head(many)[:1], head(many[:1]))
    assert torch.equal(alone, got)
    step = want.float().abs() * 2**-7 + 1e-6  # one bfloat16 step, relative
    assert ((got.float() - want.float()).abs() <= step).all()
    assert torch.equal(head(x), head.inner(x))  # gradients on: torch


@pytest.mark.parametrize("pairs", [False] + [True] * native.cpu_pair_dots(), ids=str)
@pytest.mark.parametrize("width", [75, 64, 1280])  # a short rest past the chunks; none; inputs past L1_FLOATS
def test_every_tile_shape_gives_a_row_its_bits_alone_on_rows_and_on_tiles(width, pairs):
    """The bfloat16 products (pregate/native/native.h, through the native head's kernel), AVX2's and,
    where the CPU has them, AVX512-BF16's pair dot products, over 1 to 17 rows (every tile shape, and
    past one tile of 8 vectors), and at 1280 terms AVX2's tiles of 4 vectors where 5 to 8 would overflow
    L1: each row gets the bits it gets alone, from the rows' layout and from the tiled one
    (pregate.native_layout), within one bfloat16 step of torch's product."""
    from pregate.native_layout import tile

    g = torch.Generator().manual_seed(3)
    # 43 rows: 5 whole tiles, then 3 rows kept as rows
    linear = torch.nn.Linear(width, 43, bias=False).to(torch.bfloat16).requires_grad_(False)
    rows = native.NativeHead(linear, pairs=pairs)
    tiled = native.NativeHead(copy.deepcopy(linear), pairs=pairs)
    tile(tiled.inner.weight)
    tiled.blocked = 1
    x = torch.randn(17, width, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        alone = torch.cat([rows(x[i : i + 1]) for i in range(17)])
        want = linear(x)
        for m in range(1, 18):
            assert torch.equal(rows(x[:m]), alone[:m]), m
            assert torch.equal(tiled(x[:m]), alone[:m]), m
    step = want.float().abs() * 2**-7 + 1e-6
    assert ((alone.float() - want.float()).abs() <= step).all()


def test_loading_marks_the_build_used_and_prunes_builds_unused_for_long(tmp_path):
    """Each version of the sources leaves a build in the cache; one no checkout has loaded for
    STALE_DAYS goes when another loads, a recently used one stays."""
    import os
    import time

    current, recent, stale = (tmp_path / f"pregate-native-{n}.so" for n in ("cur", "recent", "stale"))
    other = tmp_path / "unrelated.so"
    day = 86400
    for f, age in (
        (current, 90),
        (recent, native.STALE_DAYS - 1),
        (stale, native.STALE_DAYS + 1),
        (other, 90),
    ):
        f.write_bytes(b"")
        os.utime(f, (time.time() - age * day,) * 2)
    native._mark_used_and_prune(current)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([current.name, recent.name, other.name])
    assert time.time() - current.stat().st_mtime < day


def test_which_products_run_and_how_to_keep_avx2s(monkeypatch):
    """By default a CPU with AVX512-BF16 runs its pair dot products (in calls of PAIR_ROWS);
    $PREGATE_NATIVE_ISA=avx2 keeps AVX2's, anything but auto or avx2 is refused, and so is asking for the
    pair products where the CPU has none."""
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    assert native.pair_dots() == native.cpu_pair_dots()
    monkeypatch.setenv(native.ISA_ENV, "avx2")
    assert not native.pair_dots()
    monkeypatch.setenv(native.ISA_ENV, "avx512")
    with pytest.raises(PregateError, match="must be auto or avx2"):
        native.pair_dots()
    monkeypatch.delenv(native.ISA_ENV)
    # calls of PAIR_ROWS where the pair products run bfloat16 weights, else (AVX2, int8) of NATIVE_ROWS
    assert native.attach_native(bf16_moe(), False).native.call_rows == native.NATIVE_ROWS
    int8 = serving_layout(bf16_moe(hidden=64), quantize="int8", native=True)[0]
    assert int8.native.call_rows == native.NATIVE_ROWS
    if native.cpu_pair_dots():
        assert native.library(True) is not native.library(False)
        assert native.attach_native(bf16_moe(), True).native.call_rows == native.PAIR_ROWS
    else:
        with pytest.raises(PregateError, match="avx512_bf16"):
            native.library(True)


def test_the_native_option_s_help_states_the_limits_native_defines():
    """cli/options.py stays torch-free for a fast `pregate --help`, so its --native text writes the row
    limits out: they must be the ones pregate.native runs."""
    import argparse

    from pregate.cli.options import add_native

    parser = argparse.ArgumentParser()
    add_native(parser)
    text = " ".join(parser._option_string_actions["--native"].help.split())
    assert f"steps of at most {native.WHOLE_ROWS} tokens" in text
    assert f"of at most {native.NATIVE_ROWS} rows ({native.PAIR_ROWS} on AVX512-BF16" in text
