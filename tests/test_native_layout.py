"""The native kernels' tiled weight layout (pregate.native_layout): tiles in place, the rows' bits from
them, and the rows back whenever torch reads the weights."""

import copy

import pytest
import torch

from pregate import native
from pregate.moe import Routing, RoutingPlan, Segment
from pregate.native_layout import CHUNK, TILE_ROWS, TiledEmbedding, gate_up_order, tile, tiled_rows, untile
from tests.conftest import build, tiny_hf_model

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None, reason=str(native.unavailable_reason())
)


@pytest.mark.parametrize("gate_up", [False, True])
@pytest.mark.parametrize("cols", [None, 70])
def test_tiles_hold_each_call_s_rows_in_turn_and_untile_puts_them_back(gate_up, cols):
    """Whole tiles of 8 rows (a chunk of 32 terms of each in turn, then each row's terms past its last
    whole chunk), then the rows past the last whole tile as rows; on a gate|up matrix each channel's
    gate row, then its up row; with `cols`, only the first cols terms (a routed expert's down)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(26, 75, generator=g).to(torch.bfloat16)
    if cols is not None:
        w[:, cols:] = 0  # a routed expert's down: the terms past its width are the padding
    before = w.clone()
    order = gate_up_order(11, 11) if gate_up else None  # 11 channels: gate rows 0-10, up rows 11-21
    rows = (before if order is None else before[order])[:, :cols]
    tile(w, order, cols)
    n, k = rows.shape
    flat, at, kc = w.view(-1), 0, k - k % CHUNK
    for t in range(n // TILE_ROWS):
        for c in range(kc // CHUNK):
            for i in range(TILE_ROWS):
                want = rows[t * TILE_ROWS + i, c * CHUNK : (c + 1) * CHUNK]
                assert torch.equal(flat[at : at + CHUNK], want)
                at += CHUNK
        for i in range(TILE_ROWS):
            rest = rows[t * TILE_ROWS + i, kc:]
            assert torch.equal(flat[at : at + len(rest)], rest)
            at += len(rest)
    assert torch.equal(flat[at : n * k], rows[n - n % TILE_ROWS :].reshape(-1))  # the last rows as rows
    assert torch.equal(flat[n * k :], before.view(-1)[n * k :])  # storage past them untouched
    untile(w, order, cols)
    assert torch.equal(w, before)


def test_a_lookup_reads_the_rows_from_the_tiles():
    """tiled_rows gives the rows a tiled matrix held (those in whole tiles and the rows after them) in
    the shape of the ids, as a lookup of the rows would."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(26, 75, generator=g).to(torch.bfloat16)
    before = w.clone()
    tile(w)
    assert not torch.equal(w, before)
    ids = torch.randint(0, 26, (3, 11), generator=g)
    ids[0, :3] = torch.tensor([0, 23, 25])  # the first row, the last in a tile, the last after them
    assert torch.equal(tiled_rows(w, ids), before[ids])
    assert torch.equal(tiled_rows(w, torch.arange(26)), before)


def tiling_moe(family: str = "llama", hidden: int = 48):
    """A bfloat16 MoE whose tiles end every way: a shared expert of 21 channels (its gate|up ends in a
    short tile, kept as rows) and three routed ones of random widths, and rows of 48 terms (one chunk of
    32 and a rest of 16)."""
    hf = tiny_hf_model(family, seed=0, hidden_size=hidden, intermediate_size=90)
    return build(hf, num_experts=3, shared=21).to(torch.bfloat16).eval()


def decode(model, batch: int = 3):
    """Logits of prompts of a few lengths, then one decode step of all of them, in the model's KV pool."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (n,), generator=g) for n in (5, 40, 3)[:batch]]
    cache = model.new_cache(capacity=64, slots=batch)
    out = []
    for slot, p in enumerate(prompts):
        assert cache.acquire(64) == slot
        route = Routing.top1(torch.tensor([slot % 3] * len(p)))
        out.append(model.forward_packed(p, [Segment(len(p), cache, slot)], route))
    nxt = torch.randint(3, 97, (batch,), generator=g)
    route = Routing.top1(torch.tensor([0, 2, 1][:batch]))
    out.append(model.forward_packed(nxt, [Segment(1, cache, s) for s in range(batch)], route))
    return torch.cat(out)


PAIRS = [False] + [True] * native.cpu_pair_dots()  # AVX2's products, and AVX512-BF16's where it has them


@pytest.mark.parametrize("pairs", PAIRS, ids=str)
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied + no bias; untied + q/k/v bias
def test_a_tiled_model_gives_the_rows_bits_and_torch_gets_the_rows_back(family, pairs):
    """With tiles the decoder weights and the head are tiled at attach (a tied head with its embedding,
    whose lookups then read the tiles); serving steps run on the tiles with the bits of the same kernels
    on rows; a torch forward of a layer or of one projection, or a state_dict, puts the rows back first,
    and the native steps go on with the same bits."""
    plain = tiling_moe(family)
    tiled = native.attach_native(copy.deepcopy(plain), pairs=pairs, tiles=True)
    rows = native.attach_native(copy.deepcopy(plain), pairs=pairs, tiles=True)
    assert tiled.native.tiling is not None and tiled.native.tiling.tiled
    untied = family == "qwen2"
    assert tiled.lm_head.blocked == 1
    assert isinstance(tiled.embed_tokens, TiledEmbedding) != untied  # a tied head is the embedding's table
    head = tiled.lm_head.inner.weight
    assert not torch.equal(head, plain.lm_head.weight if untied else plain.embed_tokens.weight)
    rows.native.tiling.untile()
    assert not rows.native.tiling.tiled
    layer0 = tiled.layers[0].mlp.gate_up_proj.weight
    assert not torch.equal(layer0, plain.layers[0].mlp.gate_up_proj.weight)  # tiled in place
    with torch.inference_mode():
        want = decode(rows)
        assert torch.equal(decode(tiled), want)
        assert tiled.native.tiling.tiled  # serving never read the weights through torch
        x = torch.randn(4, 48, dtype=torch.bfloat16)
        plan = RoutingPlan(Routing.top1(torch.tensor([0, 1, 2, 0])), 3)
        got = tiled.layers[1].mlp(x, plan)  # torch: the rows come back first
        assert not tiled.native.tiling.tiled
        assert torch.equal(got, plain.layers[1].mlp(x, plan))
        assert torch.equal(decode(tiled), want)  # and the kernels read them as rows
    direct = native.attach_native(copy.deepcopy(plain), pairs=pairs, tiles=True)
    with torch.inference_mode():  # a projection called on its own puts the rows back too
        x = torch.randn(2, 48, dtype=torch.bfloat16)
        assert torch.equal(direct.layers[2].self_attn.o_proj(x), plain.layers[2].self_attn.o_proj(x))
    assert not direct.native.tiling.tiled
    again = native.attach_native(copy.deepcopy(plain), pairs=pairs, tiles=True)
    assert again.native.tiling.tiled
    state = again.state_dict()
    assert not again.native.tiling.tiled
    decoder = {name: value for name, value in plain.state_dict().items() if name.startswith("layers.")}
    assert decoder and all(torch.equal(state[name], value) for name, value in decoder.items())
    assert torch.equal(state["embed_tokens.weight"], plain.embed_tokens.weight)
    if untied:
        assert torch.equal(state["lm_head.inner.weight"], plain.lm_head.weight)
    tied = native.attach_native(copy.deepcopy(plain), pairs=pairs, tiles=True)
    with torch.inference_mode():  # a torch read of the head puts the rows back
        x = torch.randn(1, 2, 48, dtype=torch.bfloat16)
        got = tied.lm_head(x)  # NativeHead leaves a 3-d product to torch
        assert not tied.native.tiling.tiled
        assert torch.equal(got, plain.lm_logits(x))


def test_tiles_are_asked_for_and_refused_where_they_cannot_run():
    """Tiles with `tiles` (--native-tiles), for bfloat16 weights on either kernel, and by default where
    every step runs natively (default_tiles: oneDNN cannot pack bfloat16); int8 weights are refused
    with the reason, and never tiled by default."""
    from pregate.errors import PregateError
    from pregate.packed import cpu_packs_bfloat16, serving_layout

    plain = tiling_moe()
    assert native.attach_native(copy.deepcopy(plain), pairs=False, tiles=False).native.tiling is None
    default = native.attach_native(copy.deepcopy(plain), pairs=False).native.tiling
    assert (default is not None) == native.default_tiles(False, False) == (not cpu_packs_bfloat16())
    assert not native.default_tiles(True, False) and not native.default_tiles(False, True)
    int8 = serving_layout(tiling_moe(hidden=64), quantize="int8", native=True, pairs=False)[0]
    assert int8.native.tiling is None
    tiled = serving_layout(copy.deepcopy(plain), native=True, pairs=False, tiles=True)[0]
    assert tiled.native.tiling.tiled
    with pytest.raises(PregateError, match="bfloat16 weights, not int8"):
        serving_layout(tiling_moe(hidden=64), quantize="int8", native=True, pairs=False, tiles=True)
    if native.cpu_pair_dots():
        assert native.attach_native(copy.deepcopy(plain), pairs=True, tiles=True).native.tiling.tiled


def test_serve_s_loader_tiles_and_gives_the_native_rows_tokens(tiny_checkpoint, tmp_path, capsys):
    """`pregate serve --native --native-tiles`: the same tokens as --native --no-native-tiles, the weights
    still tiled after serving; either flag without --native is refused with the reason."""
    from pregate.engine import SamplingParams
    from pregate.errors import PregateError
    from pregate.launch import load_engine
    from tests.conftest import served_checkpoint

    out = str(served_checkpoint(tiny_checkpoint, tmp_path))
    tiled = load_engine(out, dtype="bfloat16", native=True, tiles=True)
    assert "native weights: tiled, each call streams one run of memory" in capsys.readouterr().out
    rows = load_engine(out, dtype="bfloat16", native=True, tiles=False)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = ["hello", "a longer prompt", "x"]
    got, want = tiled.generate(prompts, params), rows.generate(prompts, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert tiled.model.native.tiling.tiled and rows.model.native.tiling is None
    with pytest.raises(PregateError, match="--native-tiles lays out"):
        load_engine(out, dtype="bfloat16", tiles=True)
    with pytest.raises(PregateError, match="--no-native-tiles lays out"):
        load_engine(out, dtype="bfloat16", tiles=False)
