"""`pregate bench step` on a tiny MoE checkpoint: end to end, controlled routing, byte accounting, bad input.

No timing assertions: timings are noise at this size; only structure and counts are checked.
"""

import json

import pytest
import torch

from pregate.bench import BenchError
from pregate.bench_step import (
    FixedRouter,
    StepBenchConfig,
    check_model,
    format_step_table,
    model_config,
    run_bench_step,
    step_bytes,
    time_engine,
    time_layerwise,
)
from pregate.cli import main
from pregate.errors import PregateError
from pregate.moe import load_moe, save_moe
from pregate.native import pair_dots as native_pair_dots
from pregate.native import products as native_products
from pregate.native import unavailable_reason as native_unavailable
from pregate.packed import cpu_packs_bfloat16
from pregate.quantize import quantize_model
from pregate.router import LayerwiseGate, PreGatingRouter, RouterConfig, save_router
from tests.conftest import build, tiny_hf_model, tiny_tokenizer

TINY = dict(batch_sizes=[1, 3], expert_batch=3, prompt_len=4, warmup_steps=1, decode_steps=3, floor_mb=1)


def saved_moe(checkpoint, out):
    """A saved 3-expert MoE of `checkpoint` at `out`, with its tokenizer and a tiny pre-gating router."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    moe = build(hf)
    moe.config.provenance = {"base": str(checkpoint)}
    out.mkdir()
    save_moe(moe, out)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    router = PreGatingRouter(RouterConfig.preset("tiny", vocab_size=hf.config.vocab_size, num_experts=3))
    save_router(router, out)
    return out


@pytest.fixture
def moe_dir(tiny_checkpoint, tmp_path):
    return saved_moe(tiny_checkpoint, tmp_path / "moe")


@pytest.fixture
def moe_dir_64(tmp_path):
    """moe_dir's MoE at hidden size 64: int8's native kernels need a multiple of 32 (the tiny one has 48)."""
    tokenizer = tiny_tokenizer(tmp_path)
    checkpoint = tmp_path / "tiny-llama-64"
    tiny_hf_model("llama", vocab_size=len(tokenizer), hidden_size=64).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return saved_moe(checkpoint, tmp_path / "moe-64")


@pytest.fixture
def layerwise_dir(tmp_path):
    out = tmp_path / "layerwise"
    out.mkdir()
    save_router(LayerwiseGate(3, 48, 3), out)
    return out


def test_cli_end_to_end_writes_every_section(moe_dir, layerwise_dir, tmp_path, capsys):
    path = tmp_path / "out" / "step.json"
    rc = main(
        [
            "bench",
            "step",
            str(moe_dir),
            "--json",
            str(path),
            "--batch-sizes",
            "1",
            "3",
            "--expert-batch",
            "3",
            "--prompt-len",
            "4",
            "--warmup",
            "1",
            "--steps",
            "3",
            "--floor-mb",
            "1",
            "--layerwise",
            str(layerwise_dir),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "decode step by batch size" in printed and "distinct experts" in printed and "llama.cpp" in printed
    data = json.loads(path.read_text())
    for key in ("bandwidth", "batch_sizes", "distinct_experts", "breakdown", "llama_cpp", "notes", "config"):
        assert key in data
    assert data["bandwidth"]["read"] > 0 and data["bandwidth"]["gemv"] > 0
    systems = {(r["system"], r["batch"]) for r in data["batch_sizes"]}
    assert systems == {(s, b) for s in ("moe", "dense", "hf-generate") for b in (1, 3)}
    assert [r["experts"] for r in data["distinct_experts"]] == [1, 2, 3]
    for r in data["batch_sizes"] + data["distinct_experts"]:
        assert len(r["decode_ms"]["repeats"]) == 3 and r["floor_read_ms"] > 0 and r["ratio_gemv"] > 0
        assert r["decode_ms"]["min"] <= r["decode_ms"]["median"] <= r["decode_ms"]["max"]
    for r in data["distinct_experts"]:
        assert r["unique_experts_seen"] == [r["experts"]]
    # MoE over its dense parent, paired within each repeat: one ratio per repeat, from the same timings
    by = {(r["system"], r["batch"]): r["decode_ms"]["repeats"] for r in data["batch_sizes"]}
    assert [(r["system"], r["dense"], r["batch"]) for r in data["moe_vs_dense"]] == [
        ("moe", "dense", 1),
        ("moe", "dense", 3),
    ]
    for r in data["moe_vs_dense"]:
        moe, dense = by[("moe", r["batch"])], by[("dense", r["batch"])]
        assert r["decode_ratio"]["repeats"] == pytest.approx([m / d for m, d in zip(moe, dense)])
    assert "paired within each repeat" in printed
    for variant in ("pregating", "layerwise"):
        rows = data["breakdown"][variant]
        assert [r["batch"] for r in rows] == [1, 3]
        parts = {"router", "attention", "shared", "routed", "lm_head", "rest", "step"}
        assert all(set(r) >= parts for r in rows)
        assert all(r["attention"] > 0 and r["router"] > 0 for r in rows)
    assert all(r["torch_calls"] > 3 * 10 for r in data["breakdown"]["pregating"])  # 3 layers, ~10+ calls each
    # the tiny base has no GGUF (and llama_cpp is optional): a clean note, no failure
    assert "skipped" in data["llama_cpp"] and data["llama_cpp"]["runs"] == []
    assert (tmp_path / "out" / "step_step_vs_experts.png").stat().st_size > 1000


@pytest.mark.parametrize("distinct", [1, 2, 3])
def test_controlled_routing_gives_d_distinct_experts(moe_dir, distinct):
    moe = load_moe(moe_dir, torch.float32)
    from pregate.router import load_router

    router = load_router(moe_dir)
    cfg = StepBenchConfig(**TINY)
    res = time_engine(moe, None, router, 6, distinct, cfg)
    assert res["unique_experts"] == [distinct]
    assert len(res["decode_steps"]) == cfg.decode_steps


def test_fixed_router_assigns_request_n_expert_n_mod_d(moe_dir):
    from pregate.router import load_router

    fixed = FixedRouter(load_router(moe_dir), 2)
    got = []
    for _ in range(5):
        cache = fixed.new_cache(1)
        e, w = fixed.route(fixed.step(torch.tensor([[5, 6, 7]]), cache))
        got.append(e[0, :, 0].tolist())
        assert torch.all(w == 1)
    assert got == [[0] * 3, [1] * 3, [0] * 3, [1] * 3, [0] * 3]
    # the engine routes every sampled token of a step at once (step_tokens): same assignment
    fixed = FixedRouter(load_router(moe_dir), 3)
    caches = [fixed.new_cache(1) for _ in range(4)]
    for c in caches:
        fixed.step(torch.tensor([[5, 6]]), c)
    e, _ = fixed.route(fixed.step_tokens(torch.tensor([8, 9, 10, 11]), caches))
    assert e[:, 0].tolist() == [0, 1, 2, 0]


def test_byte_accounting_by_hand(moe_dir):
    moe = load_moe(moe_dir, torch.float32)
    from pregate.router import load_router

    router = load_router(moe_dir)
    cfg = json.loads((moe_dir / "pregate_config.json").read_text())
    # tiny model: H 48, 3 layers, 4 heads / 2 KV heads of 12, vocab V, tied embeddings, float32 weights
    h, layers, v = 48, 3, cfg["base"]["vocab_size"]
    b, experts, context = 4, [0, 2], 10
    got = step_bytes(moe, b, experts, context, router)
    attention = (48 * 48 + 2 * 48 * 24 + 48 * 48) * 4  # q, k, v, o (no bias)
    assert got["attention"] == layers * attention
    assert got["norms"] == (2 * layers + 1) * h * 4
    shared = cfg["shared_channels"]
    assert got["shared"] == sum(3 * s * h * 4 for s in shared)
    assert got["routed"] == sum(3 * (row[0] + row[2]) * h * 4 for row in cfg["expert_channels"])
    assert got["embed_rows"] == b * h * 4
    assert got["lm_head"] == v * h * 4
    assert got["kv"] == layers * b * 2 * 2 * 12 * context * 4  # float32 K and V on CPU
    r = router.cfg  # tiny preset: dim 32, 1 layer, SwiGLU hidden 64, 3 experts
    router_weights = sum(p.numel() for p in router.parameters()) - v * r.dim
    assert got["router"] == (router_weights + b * r.dim) * 4
    parts = sum(x for k, x in got.items() if k != "total")
    assert got["total"] == parts
    dense_like = step_bytes(moe, b, [], context)
    assert dense_like["routed"] == 0 and dense_like["router"] == 0
    # int8: one byte per weight, rows padded to 32 columns (48 -> 64), one float32 scale per row
    q = step_bytes(quantize_model(moe), b, experts, context, router)
    assert q["attention"] == layers * (96 + 48) * (64 + 4)
    assert q["routed"] == sum(3 * (row[0] + row[2]) * h for row in cfg["expert_channels"])
    assert q["lm_head"] == v * (64 + 4)
    assert q["kv"] == got["kv"] and q["router"] == got["router"]  # both stay float32


def test_int8_systems_run_beside_the_float_ones(moe_dir):
    result = run_bench_step(moe_dir, StepBenchConfig(**TINY, quantize="int8"), progress=lambda _: None)
    systems = {(r["system"], r["batch"]) for r in result["batch_sizes"]}
    expected = ("moe", "dense", "hf-generate", "moe-int8", "dense-int8")
    assert systems == {(s, b) for s in expected for b in (1, 3)}
    assert {r["system"] for r in result["distinct_experts"]} == {"moe", "moe-int8"}
    pairs = {(r["system"], r["dense"]) for r in result["moe_vs_dense"]}
    assert pairs == {("moe", "dense"), ("moe-int8", "dense-int8")}  # each MoE against its own layout
    assert [r["batch"] for r in result["breakdown"]["pregating_int8"]] == [1, 3]
    assert result["bandwidth_int8"]["gemv"] > 0 and result["bandwidth_int8"]["dtype"] == "int8 weights"
    by = {(r["system"], r["batch"]): r for r in result["batch_sizes"]}
    # exact int8 bytes: test_byte_accounting_by_hand (the tiny shared experts, 20 wide, pad to 32)
    parts = ("attention", "routed", "lm_head")
    assert all(by[("moe-int8", 1)]["bytes"][k] < by[("moe", 1)]["bytes"][k] for k in parts)
    for r in result["distinct_experts"]:
        assert r["unique_experts_seen"] == [r["experts"]]
    products = result["products"]  # one product per MLP shape, for each kind this model runs
    width = model_config(moe_dir).expert_channels[0][0]
    assert products["shapes"]["expert down"] == [48, width]  # [hidden, layer 0's first expert's width]
    assert {"plain", "int8"} <= set(products) and all(
        v["us"] > 0 and v["gbps"] > 0 for k in ("plain", "int8") for v in products[k].values()
    )
    assert "one matrix-vector product per MLP shape" in format_step_table(result)


def test_bf16_engine_systems_are_packed_and_unpacked_beside_them(moe_dir):
    cfg = StepBenchConfig(**{**TINY, "dtype": "bfloat16"}, unpacked=True, hf=False)
    result = run_bench_step(moe_dir, cfg, progress=lambda _: None)
    systems = {r["system"] for r in result["batch_sizes"]}
    if cpu_packs_bfloat16():
        assert systems == {"moe", "dense", "moe-unpacked", "dense-unpacked"}
        assert "packed" in result["products"]
    else:  # nothing packed to compare with, and the note says why
        assert systems == {"moe", "dense"} and "packed" not in result["products"]
        assert any("cannot pack bfloat16" in n for n in result["notes"])


@pytest.mark.skipif(native_unavailable() is not None, reason=str(native_unavailable()))
def test_native_systems_run_beside_the_packed_ones(moe_dir):
    """--native, and with --avx2-products the native copies on AVX2's products where the CPU runs
    AVX512-BF16's pair dot products by default (elsewhere a note says there is nothing to compare)."""
    cfg = StepBenchConfig(**{**TINY, "dtype": "bfloat16"}, native=True, avx2_products=True, hf=False)
    result = run_bench_step(moe_dir, cfg, progress=lambda _: None)
    rows = {r["system"]: r for r in result["batch_sizes"] if r["batch"] == 3}
    avx2 = {"moe-native-avx2", "dense-native-avx2"} if native_pair_dots() else set()
    assert set(rows) == {"moe", "dense", "moe-native", "dense-native"} | avx2
    assert rows["moe-native"]["bytes"] == rows["moe"]["bytes"]  # the same bytes, another kernel
    products = "AVX512-BF16's pair dot products" if native_pair_dots() else "AVX2"
    assert products == native_products()
    assert f"--native: bfloat16 and int8 products on {products} (pregate.native.pair_dots)" in result["notes"]
    if not avx2:
        assert any(n.startswith("--avx2-products: nothing to compare") for n in result["notes"])
    # the native step's breakdown: its layers one native call, the torch hooks never fire on decode rows
    native_parts = result["breakdown"]["pregating_native"]
    assert [r["batch"] for r in native_parts] == [1, 3]
    assert all(
        r["native"] > 0 and r["attention"] == r["shared"] == 0 and r["router"] > 0 for r in native_parts
    )
    assert all(r["native"] == 0 for r in result["breakdown"]["pregating"])
    assert not any("read as rows, not tiles" in n for n in result["notes"])  # tiled or not, still so
    table = format_step_table(result)
    assert "pregating_native router" in table and "native" in table.split("pregating_native router")[1]
    with pytest.raises(BenchError, match="--native runs bfloat16"):
        StepBenchConfig(dtype="float32", native=True)
    with pytest.raises(BenchError, match="add --native"):
        StepBenchConfig(avx2_products=True)
    with pytest.raises(BenchError, match="add --native"):
        StepBenchConfig(native_layouts=True)


@pytest.mark.skipif(native_unavailable() is not None, reason=str(native_unavailable()))
def test_native_layouts_run_the_other_layout_beside_the_default(moe_dir):
    """--native --native-layouts: beside the native copies in the layout the native path picks here
    (pregate.native.default_tiles), copies in the other one: rows where it tiles, tiles where it keeps
    rows; the same bytes; the tiled ones still tiled after every timed step (a torch read would have put
    the rows back, and the notes would say so)."""
    from pregate.native import default_tiles, pair_dots

    cfg = StepBenchConfig(**{**TINY, "dtype": "bfloat16"}, native=True, native_layouts=True, hf=False)
    result = run_bench_step(moe_dir, cfg, progress=lambda _: None)
    rows = {r["system"]: r for r in result["batch_sizes"] if r["batch"] == 3}
    tiled = default_tiles(False, pair_dots())
    other = "rows" if tiled else "tiles"
    assert {f"moe-native-{other}", f"dense-native-{other}"} <= set(rows)
    assert rows[f"moe-native-{other}"]["bytes"] == rows["moe-native"]["bytes"]
    assert rows[f"dense-native-{other}"]["decode_ms"]["median"] > 0
    notes = result["notes"]
    assert f"--native: bfloat16 weights in {'tiles' if tiled else 'rows'} (pregate.native_layout)" in notes
    assert not any("read as rows, not tiles" in n for n in notes)


@pytest.mark.skipif(native_unavailable() is not None, reason=str(native_unavailable()))
def test_native_int8_systems_run_and_a_width_native_cannot_take_is_refused(moe_dir_64, moe_dir):
    """--native --quantize int8: the int8 copies through the native layers beside the others, their bytes
    int8's; on a hidden size int8's kernels cannot take, a clean error that says why."""
    cfg = StepBenchConfig(**{**TINY, "dtype": "bfloat16"}, native=True, quantize="int8", hf=False)
    result = run_bench_step(moe_dir_64, cfg, progress=lambda _: None)
    rows = {r["system"]: r for r in result["batch_sizes"] if r["batch"] == 3}
    int8 = {"moe-int8", "dense-int8", "moe-int8-native", "dense-int8-native"}
    assert set(rows) == {"moe", "dense", "moe-native", "dense-native"} | int8
    assert rows["moe-int8-native"]["bytes"] == rows["moe-int8"]["bytes"]
    assert rows["moe-int8"]["bytes"]["total"] < rows["moe-native"]["bytes"]["total"]
    assert all(rows[name]["decode_ms"]["median"] > 0 for name in int8)
    parts = result["breakdown"]["pregating_int8_native"]
    assert [r["batch"] for r in parts] == [1, 3] and all(r["native"] > 0 for r in parts)
    with pytest.raises(PregateError, match="multiple of 32"):
        run_bench_step(moe_dir, cfg, progress=lambda _: None)


def test_layerwise_direct_path_runs(moe_dir):
    moe = load_moe(moe_dir, torch.float32)
    res = time_layerwise(moe, LayerwiseGate(3, 48, 3), 3, StepBenchConfig(**TINY))
    assert 1 <= res["experts_per_layer"] <= 3 and res["breakdown"]["router"] > 0


def test_bad_input_is_a_clean_error(moe_dir, tmp_path, capsys):
    with pytest.raises(BenchError, match="batch sizes"):
        StepBenchConfig(batch_sizes=[2, 0])
    with pytest.raises(BenchError, match="odd"):
        StepBenchConfig(repeats=2)
    with pytest.raises(BenchError, match="unknown GGUF types.*q8_0"):
        StepBenchConfig(gguf_types=("q9",))
    with pytest.raises(BenchError, match="has 3 routed experts"):
        check_model(model_config(moe_dir), StepBenchConfig(experts=[4], expert_batch=8))
    with pytest.raises(BenchError, match="not a pregate MoE checkpoint"):
        model_config(tmp_path)
    orphan = model_config(moe_dir)
    orphan.provenance = {}
    with pytest.raises(BenchError, match="dense parent"):
        check_model(orphan, StepBenchConfig())
    check_model(orphan, StepBenchConfig(dense=False, hf=False))
    args = ["bench", "step", str(moe_dir), "--json", str(tmp_path / "x.json")]
    cases = [
        (["--batch-sizes", "0"], "batch sizes"),
        (["--experts", "1", "4", "--expert-batch", "8"], "has 3 routed experts"),
        (["--batch-experts", "5"], "has 3 routed experts"),
        (["--layerwise", str(moe_dir)], "no layer-wise gate"),
    ]
    for extra, message in cases:
        assert main(args + extra) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert main(["bench", "step", str(tmp_path), "--json", str(tmp_path / "x.json")]) != 0
    assert "not a pregate MoE checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_llama_cpp_times_the_packaged_gguf_and_a_requantized_copy(tmp_path, monkeypatch):
    """Only where `make llama-cpp` was run: the Q8_0 copy is made once (cached), and both files decode."""
    pytest.importorskip("llama_cpp")
    from pregate import llama_reference

    monkeypatch.setenv("PREGATE_CACHE", str(tmp_path))
    src, _ = llama_reference.source_gguf(None, "smollm2-135m")
    copy = llama_reference.requantized(src, "q8_0")
    assert copy.parent == tmp_path / "gguf" and copy.stat().st_size > src.stat().st_size  # 8 bits > 4.5
    made = copy.stat().st_mtime_ns
    assert llama_reference.requantized(src, "q8_0").stat().st_mtime_ns == made  # reused, not remade
    timed = llama_reference.time_files([src, copy], 4, 1, 2, 1, 1, lambda rep: [1, 2, 3, 4])
    assert [len(t["decode"]) for t in timed] == [1, 1] and all(t["decode"][0] > 0 for t in timed)
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a gguf")
    with pytest.raises(PregateError, match="requantize"):
        llama_reference.requantized(junk, "q8_0")
    with pytest.raises(PregateError, match="cannot load"):
        llama_reference.time_files([junk], 4, 1, 2, 1, 1, lambda rep: [1, 2, 3, 4])
