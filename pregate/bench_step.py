"""`pregate bench step`: one engine step, decode and prefill, timed under control and set against its floor.

What this module owns: its options (`StepBenchConfig`, checked before any model loads), controlled
routing (`FixedRouter`: request n gets expert n mod d), one measurement per system (the engine, HF
`generate`, llama.cpp, the layer-wise gate by direct forward calls), the interleaved repeats, and the
report (table, JSON, PNG). The bytes a step must read, the bandwidth floors and the per-component
breakdown are `pregate.roofline`'s.

Method. Every engine measurement builds a fresh `Engine` and drives only its public API: B requests of
`prompt_len` random token ids are added (`ignore_eos`), the first step is their prefill (one step: the
token budget holds every prompt), then `warmup_steps` decode steps are dropped and the median of the next
`decode_steps` decode steps (`engine.metrics.steps`, rows with B decode tokens and no prefill) is the
measurement. Every measurement runs once per repeat, the order rotating each repeat so that machine
noise spreads over all of them (odd number of repeats, >= 3); the report is the median over repeats, with
min/max, and a repeat more than `flag_spread` away from that median is flagged. Each MoE is also set
against its dense parent in the same layout as the ratio of their steps within each repeat
(`moe_vs_dense`), whose spread is the host's noise that the two did not share.

HF `generate` (dense parent, greedy, its default dynamic cache): per-token decode time is
(t(generate 1 + N new tokens) - t(generate 1 new token)) / N on the same prompts; t(generate 1) is its
prefill. llama.cpp (dense parent, batch 1: the source GGUF and copies of it at `gguf_types`) runs only
when `llama_cpp` is importable (`make llama-cpp`); `pregate.llama_reference` says which files and how.

Bytes a decode step must read: the embedding rows of its B tokens, every layer's attention and norms,
the shared experts, the routed experts the step uses (true widths, not the zero padding), the final
norm and LM head, the router (its weights, once per step, plus B embedding rows), and the KV cache of
the B sequences at the mean context of the timed steps. floor = bytes / bandwidth, for both bandwidths.
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from pregate import llama_reference
from pregate.bench import BenchConfig, BenchError, load_dense_parent, load_parts
from pregate.checkpoint import CONFIG_FILE, ROUTER_CONFIG, has_router
from pregate.engine import Engine, SamplingParams
from pregate.errors import PregateError, check_int
from pregate.llama_reference import GGUF_TYPES
from pregate.metrics import repeat_spread
from pregate.moe import MoEConfig, MoEForCausalLM, Routing, Segment, load_config
from pregate.native import pair_dots
from pregate.native import products as native_products
from pregate.packed import can_pack, cpu_packs_bfloat16, serving_layout
from pregate.quantize import check_mode, padded
from pregate.roofline import (
    PARTS,
    Breakdown,
    count_torch_calls,
    measure_bandwidth,
    step_bytes,
    summarize_breakdown,
)
from pregate.router import PreGatingRouter, RouterConfig, load_router
from pregate.scheduler import SchedulerConfig

STEP_MOE = "moe"  # the MoE in the engine, controlled routing
STEP_DENSE = "dense"  # the dense parent in the same engine
STEP_HF = "hf-generate"  # HF generate on the dense parent
STEP_MOE_INT8 = "moe-int8"  # with --quantize int8: the MoE and the dense parent with int8 weights,
STEP_DENSE_INT8 = "dense-int8"  # measured beside the float ones in the same run
STEP_MOE_UNPACKED = "moe-unpacked"  # with --unpacked: the bfloat16 MoE and dense parent as plain weights,
STEP_DENSE_UNPACKED = "dense-unpacked"  # beside the packed ones that the engine serves (pregate.packed)
STEP_MOE_NATIVE = "moe-native"  # with --native: the bfloat16 MoE and dense parent with their decode rows
STEP_DENSE_NATIVE = "dense-native"  # and the router's step native (pregate.native, native_router)
STEP_MOE_INT8_NATIVE = "moe-int8-native"  # with --native and --quantize int8: the int8 copies through
STEP_DENSE_INT8_NATIVE = "dense-int8-native"  # the native decode layers
STEP_MOE_NATIVE_AVX2 = "moe-native-avx2"  # with --native --avx2-products on a CPU with AVX512-BF16: the
STEP_DENSE_NATIVE_AVX2 = "dense-native-avx2"  # native copies on AVX2's products (pregate.native.pair_dots),
STEP_MOE_INT8_NATIVE_AVX2 = "moe-int8-native-avx2"  # with --quantize int8 the int8 ones too
STEP_DENSE_INT8_NATIVE_AVX2 = "dense-int8-native-avx2"
# with --native --native-layouts: the bfloat16 native copies in the weight layout the default does not use
STEP_MOE_NATIVE_TILES = "moe-native-tiles"  # tiled, where the default keeps rows
STEP_DENSE_NATIVE_TILES = "dense-native-tiles"
STEP_MOE_NATIVE_ROWS = "moe-native-rows"  # rows, where the default tiles (pregate.native.default_tiles)
STEP_DENSE_NATIVE_ROWS = "dense-native-rows"
MOE_SYSTEMS = (
    STEP_MOE,
    STEP_MOE_INT8,
    STEP_MOE_UNPACKED,
    STEP_MOE_NATIVE,
    STEP_MOE_NATIVE_AVX2,
    STEP_MOE_NATIVE_TILES,
    STEP_MOE_NATIVE_ROWS,
    STEP_MOE_INT8_NATIVE,
    STEP_MOE_INT8_NATIVE_AVX2,
)


@dataclass
class StepBenchConfig:
    """What `bench step` measures. Checked before any model loads (`check_model` for model limits)."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    expert_batch: int = 8  # batch of the distinct-experts sweep
    experts: list[int] | None = None  # distinct experts in that sweep; None = 1..E
    batch_experts: int = 1  # distinct experts in the batch-size sweep (capped at the batch)
    prompt_len: int = 32
    warmup_steps: int = 4
    decode_steps: int = 16  # timed decode steps per measurement
    repeats: int = 3
    dtype: str = "bfloat16"
    quantize: str | None = None  # "int8": also the MoE and the dense parent with int8 weights
    unpacked: bool = False  # also the bfloat16 models with plain (not prepacked) weights
    native: bool = False  # also the models through the native decode layers (pregate.native)
    avx2_products: bool = False  # with native: also its copies on AVX2's products, where pairs run
    native_layouts: bool = False  # with native: also its bfloat16 copies in the other weight layout
    dense: bool = True
    hf: bool = True
    llama_cpp: bool = True
    breakdown: bool = True
    layerwise: str | None = None  # a `pregate train --layerwise` output directory
    gguf: str | None = None  # llama.cpp weights; default: the base's packaged GGUF
    gguf_types: tuple[str, ...] = ("q8_0", "bf16")  # copies of it llama.cpp also runs (llama_reference)
    floor_mb: int = 256  # buffer of the bandwidth measurements (well above the caches)
    flag_spread: float = 0.2  # flag a repeat further than this fraction from the median
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = list(self.batch_sizes)
        if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
            raise BenchError(f"batch sizes {sizes!r} must be integers >= 1 (e.g. --batch-sizes 1 2 4 8)")
        for name in ("expert_batch", "batch_experts", "prompt_len", "decode_steps", "floor_mb"):
            v = getattr(self, name)
            check_int(f"StepBenchConfig.{name}", v, error=BenchError)
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise BenchError(f"StepBenchConfig.warmup_steps={self.warmup_steps!r} must be an integer >= 0")
        if not isinstance(self.repeats, int) or self.repeats < 3 or self.repeats % 2 == 0:
            raise BenchError(
                f"repeats={self.repeats!r} must be an odd integer >= 3 "
                "(the median is then one of the repeats)"
            )
        if self.experts is not None:
            bad = [d for d in self.experts if not isinstance(d, int) or d < 1 or d > self.expert_batch]
            if not self.experts or bad:
                raise BenchError(
                    f"distinct experts {self.experts!r} must lie in 1..expert batch "
                    f"{self.expert_batch} (each request has one primary expert)"
                )
        if self.dtype not in ("float32", "bfloat16"):
            raise BenchError(f"dtype={self.dtype!r} must be float32 or bfloat16")
        check_mode(self.quantize, error=BenchError)
        if self.native and self.dtype != "bfloat16":
            raise BenchError("--native runs bfloat16 weights; drop --dtype float32")
        if self.avx2_products and not self.native:
            raise BenchError("--avx2-products compares the native layers' products; add --native")
        if self.native_layouts and not self.native:
            raise BenchError("--native-layouts compares the native layers' weight layouts; add --native")
        if not self.flag_spread > 0:
            raise BenchError(f"flag_spread={self.flag_spread!r} must be > 0")
        if self.gguf is not None and not Path(self.gguf).is_file():
            raise BenchError(f"--gguf {self.gguf} is not a file; give a .gguf of the dense parent")
        bad = [t for t in self.gguf_types if t not in GGUF_TYPES]
        if bad:
            raise BenchError(f"unknown GGUF types {bad}; choose from {', '.join(GGUF_TYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype == "float32" else torch.bfloat16

    def expert_counts(self, num_experts: int) -> list[int]:
        if self.experts is not None:
            return list(self.experts)
        return list(range(1, min(num_experts, self.expert_batch) + 1))


def model_config(model_dir: str | Path) -> MoEConfig:
    """The MoE config of a checkpoint directory, without loading weights (`moe.load_config`), with its
    error as a BenchError."""
    try:
        return load_config(model_dir)
    except PregateError as err:
        raise BenchError(str(err)) from None


def check_model(config: MoEConfig, cfg: StepBenchConfig, top_k: int = 1) -> None:
    """Options that depend on the model: distinct experts within 1..E (and >= top_k), a layer-wise gate."""
    e = config.num_experts
    if e == 0:
        raise BenchError(
            "the checkpoint has no routed experts; give a MoE checkpoint from "
            "`pregate refactor` or `pregate train`"
        )
    wanted = cfg.expert_counts(e) + [cfg.batch_experts]
    if max(wanted) > e:
        raise BenchError(f"{max(wanted)} distinct experts asked for, but the model has {e} routed experts")
    if min(wanted) < top_k:
        raise BenchError(
            f"the router picks top-{top_k} experts per token, so a step has at least {top_k} distinct experts"
        )
    if (cfg.dense or cfg.hf) and not config.provenance.get("base"):
        raise BenchError(
            "the checkpoint does not name its dense parent (provenance.base in its "
            f"{CONFIG_FILE}); pass --no-dense --no-hf to time the MoE alone"
        )
    if cfg.layerwise is not None:
        meta = Path(cfg.layerwise) / ROUTER_CONFIG
        kind = json.loads(meta.read_text()).get("kind") if meta.is_file() else None
        if kind != "layerwise":
            raise BenchError(
                f"--layerwise {cfg.layerwise} holds no layer-wise gate ({ROUTER_CONFIG} kind "
                f"{kind!r}); give a `pregate train --layerwise` output directory"
            )


# ----------------------------------------------------------------------------------------- routing


class FixedRouter(PreGatingRouter):
    """Controlled routing with the PreGatingRouter interface the engine calls (cfg, new_cache, step,
    step_tokens, route).

    The n-th request whose cache is made gets primary expert n mod `distinct` (and the next top_k - 1
    experts mod `distinct` after it), for every token, prompt and generated. The wrapped router still runs
    on every token, so a step costs what a real one does; only its decision is replaced.
    """

    def __init__(self, inner: PreGatingRouter, distinct: int) -> None:
        nn.Module.__init__(self)
        if not inner.cfg.top_k <= distinct <= inner.cfg.num_experts:
            raise BenchError(
                f"distinct={distinct} must lie in top_k..E = {inner.cfg.top_k}..{inner.cfg.num_experts}"
            )
        self.inner = inner
        self.cfg = inner.cfg
        self.distinct = distinct
        self.assigned = 0  # requests seen so far

    def new_cache(self, batch_size: int = 1):
        cache = self.inner.new_cache(batch_size)
        cache.bench_expert = self.assigned % self.distinct
        self.assigned += 1
        return cache

    def step(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        logits = self.inner.step(input_ids, cache)  # [B, L, E]: the real router's work
        return self._forced(logits, [cache.bench_expert])

    def step_tokens(self, tokens: torch.Tensor, caches: list) -> torch.Tensor:
        logits = self.inner.step_tokens(tokens, caches)  # [B, E]: one token of each of B requests
        return self._forced(logits, [c.bench_expert for c in caches])

    def _forced(self, logits: torch.Tensor, primary: list) -> torch.Tensor:
        """Logits [.., E] that select `primary` (one expert per request, broadcast over the other dims)
        first, then the next top_k - 1 experts mod `distinct`."""
        first = torch.tensor(primary, device=logits.device).expand(logits.shape[:-1])
        forced = torch.full_like(logits, -1e4)
        for j in range(self.cfg.top_k):
            forced.scatter_(-1, ((first + j) % self.distinct)[..., None], -float(j))
        return forced


def stand_in_router(config: MoEConfig) -> PreGatingRouter:
    """An untrained router of the paper's shape: with controlled routing only its cost matters."""
    vocab = config.base["vocab_size"]
    cfg = RouterConfig.preset("readme", vocab_size=vocab, num_experts=config.num_experts)
    return PreGatingRouter(cfg).eval()


# ----------------------------------------------------------------------------------------- one measurement


def prompts(vocab: int, batch: int, length: int, seed: int, avoid: Sequence[int] = ()) -> list[list[int]]:
    """`batch` prompts of `length` random token ids (seeded; special ids avoided)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    for a in avoid:
        ids[ids == a] = (a + 1) % vocab if (a + 1) % vocab not in avoid else 3 % vocab
    return ids.tolist()


def time_engine(
    model: MoEForCausalLM,
    tokenizer,
    router: PreGatingRouter | None,
    batch: int,
    distinct: int,
    cfg: StepBenchConfig,
    breakdown: bool = False,
) -> dict:
    """One measurement through the engine's public API: prefill step, decode steps, experts per step.

    Returns prefill (s), decode (median s over the timed decode steps), decode_steps (all timed
    durations), unique_experts (of the timed steps), context (mean KV length they read), and with
    `breakdown` the median parts (ms) of the timed steps."""
    fixed = FixedRouter(router, distinct) if router is not None else None
    max_tokens = cfg.warmup_steps + cfg.decode_steps + 1  # the first token comes from the prefill
    sched = SchedulerConfig(
        policy="fcfs",
        token_budget=batch * cfg.prompt_len,
        max_running=batch,
        kv_capacity_tokens=batch * (cfg.prompt_len + max_tokens),
        prefill_chunk=cfg.prompt_len,
    )
    engine = Engine(model, tokenizer, fixed, sched)
    avoid = list(getattr(tokenizer, "all_special_ids", None) or [])
    for ids in prompts(model.config.base["vocab_size"], batch, cfg.prompt_len, cfg.seed + batch, avoid):
        engine.add_request(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    parts: list[dict[str, float]] = []
    calls = None
    with Breakdown(model, fixed) if breakdown else contextlib.nullcontext() as bd:
        while engine.has_work():
            if bd is not None and len(parts) == cfg.warmup_steps >= 1:  # the last untimed decode step
                calls = count_torch_calls(engine.step)
            else:
                engine.step()
            if bd is not None:
                parts.append(bd.take())
    if engine.failed:
        raise BenchError(f"the engine failed requests: {next(iter(engine.failed.values()))}")
    steps = engine.metrics.steps
    prefill = [i for i, s in enumerate(steps) if s.num_prefill_tokens > 0]
    decode = [i for i, s in enumerate(steps) if s.num_prefill_tokens == 0 and s.num_decode_tokens == batch]
    timed = decode[cfg.warmup_steps :]
    if prefill != [0] or len(timed) != cfg.decode_steps:
        raise BenchError(
            f"batch {batch}: expected 1 prefill step and {cfg.decode_steps} timed decode steps, "
            f"got {len(prefill)} and {len(timed)} (scheduler budgets?)"
        )
    out = {
        "prefill": steps[0].duration,
        "decode": statistics.median(steps[i].duration for i in timed),
        "decode_steps": [steps[i].duration for i in timed],
        "unique_experts": sorted({steps[i].unique_experts for i in timed}),
        "context": cfg.prompt_len + cfg.warmup_steps + (cfg.decode_steps + 1) / 2,
    }
    if breakdown:
        out["breakdown"] = summarize_breakdown([(steps[i].duration, parts[i]) for i in timed])
        out["breakdown"]["torch_calls"] = calls  # None without a warm-up step to count
    return out


@torch.inference_mode()
def time_hf(hf, batch: int, cfg: StepBenchConfig) -> dict:
    """HF generate on the dense parent: prefill = t(1 new token); decode = (t(1 + N) - t(1)) / N."""
    vocab = hf.config.vocab_size
    x = torch.tensor(prompts(vocab, batch, cfg.prompt_len, cfg.seed + batch))
    pad = hf.generation_config.pad_token_id
    pad = pad if pad is not None else hf.config.eos_token_id
    n = cfg.decode_steps

    def gen(new: int) -> float:
        t = time.perf_counter()
        hf.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
        )
        return time.perf_counter() - t

    one = gen(1)
    many = gen(1 + n)
    return {"prefill": one, "decode": max(0.0, many - one) / n}


def measure_llama_cpp(
    cfg: StepBenchConfig, config: MoEConfig, dense: MoEForCausalLM | None, progress: Callable[[str], None]
) -> dict:
    """llama.cpp on the dense parent at batch 1: the source GGUF and its copies at `cfg.gguf_types`."""
    out: dict = {"system": "llama.cpp (dense parent, batch 1)", "runs": []}
    src, note = llama_reference.source_gguf(cfg.gguf, config.provenance.get("base"))
    out["source"] = {"gguf": str(src) if src else None, "note": note}
    if not cfg.llama_cpp:
        out["skipped"] = "not asked for (--no-llama-cpp)"
    elif not llama_reference.available():
        out["skipped"] = "llama_cpp is not importable; `make llama-cpp` builds llama-cpp-python from source"
    elif src is None:
        out["skipped"] = note
    if "skipped" in out:
        return out
    files = [("source", src)]
    for kind in cfg.gguf_types:
        progress(f"llama.cpp: a {kind} copy of {src.name} (made once, cached)")
        files.append((kind, llama_reference.requantized(src, kind)))
    progress(f"llama.cpp on {', '.join(f'{k} ({p.stat().st_size / 1e6:.0f} MB)' for k, p in files)}")
    vocab = config.base["vocab_size"]
    timed = llama_reference.time_files(
        [p for _, p in files],
        cfg.prompt_len,
        cfg.warmup_steps,
        cfg.decode_steps,
        cfg.repeats,
        torch.get_num_threads(),
        lambda rep: prompts(vocab, 1, cfg.prompt_len, cfg.seed + rep)[0],
    )
    for (kind, path), t in zip(files, timed):
        out["runs"].append(
            {
                "weights": kind,
                "gguf": str(path),
                "gguf_bytes": path.stat().st_size,
                "decode_ms": spread(t["decode"], cfg.flag_spread),
                "prefill_ms": spread(t["prefill"], cfg.flag_spread),
            }
        )
    if dense is not None:
        context = cfg.prompt_len + cfg.warmup_steps + (cfg.decode_steps + 1) / 2
        out["bytes_engine_equivalent"] = step_bytes(dense, 1, [], context)["total"]
    return out


@torch.inference_mode()
def time_layerwise(model: MoEForCausalLM, gate, batch: int, cfg: StepBenchConfig) -> dict:
    """The layer-wise gate by direct `forward_packed` calls (the engine serves pre-gating only): a greedy
    batched decode, one segment and KV cache per sequence, with the breakdown hooks on."""
    dtype = next(model.parameters()).dtype
    gate = copy.deepcopy(gate).to(dtype).eval()
    bd = Breakdown(model)
    seen: list[int] = []

    def layer_router(layer: int, h: torch.Tensor) -> Routing:
        bd.gate_start = time.perf_counter()
        eids, w = gate.route(gate(layer, h))  # [T, K]
        seen.append(len(torch.unique(eids[:, 0])))
        return Routing(eids, w)

    ids = torch.tensor(prompts(model.config.base["vocab_size"], batch, cfg.prompt_len, cfg.seed + batch))
    n = cfg.warmup_steps + cfg.decode_steps
    kv = model.new_cache(capacity=cfg.prompt_len + n + 1, slots=batch)  # one pool, a slot each (the engine's)
    rows = torch.arange(1, batch + 1) * cfg.prompt_len - 1
    steps = []
    with bd:
        t = time.perf_counter()
        segments = [Segment(cfg.prompt_len, kv, b) for b in range(batch)]
        logits = model.forward_packed(
            ids.reshape(-1), segments, None, layer_router=layer_router, logits_at=rows
        )
        prefill = time.perf_counter() - t
        bd.take()
        tok = logits.argmax(-1)  # [B]
        for _ in range(n):
            seen.clear()
            t = time.perf_counter()
            segments = [Segment(1, kv, b) for b in range(batch)]
            logits = model.forward_packed(tok, segments, None, layer_router=layer_router)
            tok = logits.argmax(-1)
            steps.append((time.perf_counter() - t, bd.take(), sum(seen) / len(seen)))
    timed = steps[cfg.warmup_steps :]
    out = {
        "prefill": prefill,
        "decode": statistics.median(s[0] for s in timed),
        "experts_per_layer": statistics.mean(s[2] for s in timed),
    }
    out["breakdown"] = summarize_breakdown([(d, p) for d, p, _ in timed])
    return out


# ----------------------------------------------------------------------------------------- the benchmark


def product_shapes(config: MoEConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of each matrix-vector product of one MLP (layer 0): the dense parent's two, and the
    MoE's shared and first routed expert's two each."""
    h, i = config.base["hidden_size"], config.base["intermediate_size"]
    s, w = config.shared_channels[0], config.expert_channels[0][0]
    return {
        "dense gate|up": (2 * i, h),
        "dense down": (h, i),
        "shared gate|up": (2 * s, h),
        "shared down": (h, s),
        "expert gate|up": (2 * w, h),
        "expert down": (h, w),
    }


def measure_products(config: MoEConfig, cfg: StepBenchConfig) -> dict:
    """One matrix-vector product at each of `product_shapes`, cold (weights far above the caches), for
    every kind the engine can run here: the plain product, the packed one (bfloat16 on CPU) and int8
    (with --quantize): {"shapes": {role: [out, in]}, kind: {role: {"us": per call, "gbps": rate}}}."""
    shapes = product_shapes(config)
    kinds = {"plain": {}}
    if cfg.torch_dtype == torch.bfloat16 and cpu_packs_bfloat16():
        kinds["packed"] = {"packed": True}
    if cfg.quantize:
        kinds["int8"] = {"int8": True}
    out: dict = {"shapes": {role: list(shape) for role, shape in shapes.items()}}
    for kind, options in kinds.items():
        bw = measure_bandwidth(cfg.torch_dtype, cfg.floor_mb, list(shapes.values()), **options)
        out[kind] = {}
        for role, (o, i) in shapes.items():
            key = f"{o}x{padded(i) if kind == 'int8' else i}"
            out[kind][role] = {"us": bw["gemv_us_per_shape"][key], "gbps": bw["gemv_per_shape"][key] / 1e9}
    return out


def spread(values: list[float], flag: float) -> dict:
    """`metrics.repeat_spread` of seconds, in ms."""
    return repeat_spread([v * 1e3 for v in values], flag)


def _floors(row: dict, nbytes: dict, bw: dict) -> dict:
    row["bytes"] = nbytes
    for kind in ("read", "gemv"):
        floor = nbytes["total"] / bw[kind] * 1e3
        row[f"floor_{kind}_ms"] = floor
        row[f"ratio_{kind}"] = row["decode_ms"]["median"] / floor if floor > 0 else None
    return row


def run_bench_step(
    model_dir: str | Path, cfg: StepBenchConfig, progress: Callable[[str], None] = print
) -> dict:
    """Run every measurement; returns the result dict that `write_step_outputs` saves (see module doc)."""
    config = model_config(model_dir)
    check_model(config, cfg)
    gate = None
    if cfg.layerwise is not None:
        gate = load_router(cfg.layerwise)
        shape = (len(gate.gates), gate.gates[0].in_features, gate.gates[0].out_features)
        if shape != (config.num_layers, config.base["hidden_size"], config.num_experts):
            raise BenchError(
                f"--layerwise gate (layers, hidden, experts) = {shape} does not fit the model "
                f"{(config.num_layers, config.base['hidden_size'], config.num_experts)}"
            )
    notes: list[str] = []
    if has_router(model_dir):
        moe, tokenizer, router, router_note = load_parts(model_dir, BenchConfig(dtype=cfg.dtype), progress)
    else:
        from transformers import AutoTokenizer

        from pregate.moe import load_moe

        moe, tokenizer = load_moe(model_dir, cfg.torch_dtype), AutoTokenizer.from_pretrained(model_dir)
        router = stand_in_router(config)
        router_note = "untrained, paper-shaped (readme preset): routing is controlled"
    check_model(config, cfg, router.cfg.top_k)
    hf = dense = None
    if cfg.dense or cfg.hf:
        progress(f"loading the dense parent {config.provenance.get('base')}")
        hf, dense = load_dense_parent(moe)
    h, i = config.base["hidden_size"], config.base["intermediate_size"]
    progress(f"measuring bandwidth ({cfg.floor_mb} MB buffers, {cfg.dtype})")
    bw = measure_bandwidth(cfg.torch_dtype, cfg.floor_mb, [(i, h), (h, i)])
    progress(f"  plain read {bw['read'] / 1e9:.2f} GB/s, GEMV {bw['gemv'] / 1e9:.2f} GB/s")
    models = {STEP_MOE: moe, STEP_DENSE: dense}
    routers = {STEP_MOE: router}
    bandwidths = {STEP_MOE: bw, STEP_DENSE: bw}

    def layout_copies(
        moe_name: str,
        dense_name: str,
        quantize: str | None,
        native: bool,
        rates: dict,
        pairs=None,
        tiles=None,
    ) -> None:
        """Copies of the MoE (with its router) and the dense parent in another serving layout."""
        models[moe_name], routers[moe_name] = serving_layout(
            copy.deepcopy(moe), copy.deepcopy(router), quantize, native, pairs, tiles
        )
        if dense is not None:
            models[dense_name] = serving_layout(copy.deepcopy(dense), None, quantize, native, pairs, tiles)[0]
        bandwidths[moe_name] = bandwidths[dense_name] = rates

    if cfg.quantize:
        progress(f"quantizing copies of the MoE{' and the dense parent' * (dense is not None)} to int8")
        bw_int8 = measure_bandwidth(cfg.torch_dtype, cfg.floor_mb, [(i, h), (h, i)], int8=True)
        layout_copies(STEP_MOE_INT8, STEP_DENSE_INT8, cfg.quantize, False, bw_int8)
        progress(f"  int8 GEMV {bw_int8['gemv'] / 1e9:.2f} GB/s (int8 bytes)")
    if cfg.unpacked and can_pack(moe):
        models[STEP_MOE_UNPACKED], routers[STEP_MOE_UNPACKED] = copy.deepcopy(moe), copy.deepcopy(router)
        models[STEP_DENSE_UNPACKED] = copy.deepcopy(dense) if dense is not None else None
        bandwidths[STEP_MOE_UNPACKED] = bandwidths[STEP_DENSE_UNPACKED] = bw
    elif cfg.unpacked:
        why = (
            "this CPU's oneDNN cannot pack bfloat16"
            if cfg.dtype == "bfloat16"
            else f"{cfg.dtype} is not packed"
        )
        notes.append(f"--unpacked: nothing to compare, the weights stay plain ({why}; pregate.packed)")
    if cfg.native:  # serving_layout refuses a model native cannot run, with the reason
        progress("native-layer copies of the MoE" + " and the dense parent" * (dense is not None))
        layout_copies(STEP_MOE_NATIVE, STEP_DENSE_NATIVE, None, True, bw)
        notes.append(
            f"--native: bfloat16 and int8 products on {native_products()} (pregate.native.pair_dots)"
        )
        avx2 = cfg.avx2_products and pair_dots()  # elsewhere the native layers run AVX2's already
        if avx2:
            layout_copies(STEP_MOE_NATIVE_AVX2, STEP_DENSE_NATIVE_AVX2, None, True, bw, pairs=False)
        elif cfg.avx2_products:
            notes.append("--avx2-products: nothing to compare, the native layers run AVX2's products here")
        tiled = models[STEP_MOE_NATIVE].native.tiling is not None
        notes.append(f"--native: bfloat16 weights in {'tiles' if tiled else 'rows'} (pregate.native_layout)")
        if cfg.native_layouts and tiled:
            layout_copies(STEP_MOE_NATIVE_ROWS, STEP_DENSE_NATIVE_ROWS, None, True, bw, tiles=False)
        elif cfg.native_layouts:
            layout_copies(STEP_MOE_NATIVE_TILES, STEP_DENSE_NATIVE_TILES, None, True, bw, tiles=True)
        if cfg.quantize:
            layout_copies(STEP_MOE_INT8_NATIVE, STEP_DENSE_INT8_NATIVE, cfg.quantize, True, bw_int8)
        if cfg.quantize and avx2:
            names = STEP_MOE_INT8_NATIVE_AVX2, STEP_DENSE_INT8_NATIVE_AVX2
            layout_copies(*names, cfg.quantize, True, bw_int8, pairs=False)
    serving_layout(moe, router)  # as the engine serves them (serve, bench serve): packed in bf16
    if dense is not None:
        serving_layout(dense)
    dcounts = cfg.expert_counts(config.num_experts)

    jobs: dict[tuple[str, int, int], Callable[[], dict]] = {}
    moes = [name for name in MOE_SYSTEMS if name in models]
    denses = [
        name
        for name in (
            STEP_DENSE,
            STEP_DENSE_INT8,
            STEP_DENSE_UNPACKED,
            STEP_DENSE_NATIVE,
            STEP_DENSE_NATIVE_AVX2,
            STEP_DENSE_NATIVE_TILES,
            STEP_DENSE_NATIVE_ROWS,
            STEP_DENSE_INT8_NATIVE,
            STEP_DENSE_INT8_NATIVE_AVX2,
        )
        if models.get(name) is not None and cfg.dense
    ]
    for b in cfg.batch_sizes:
        for name in moes:
            jobs[(name, b, min(cfg.batch_experts, b))] = lambda b=b, m=models[name], r=routers[name]: (
                time_engine(m, tokenizer, r, b, min(cfg.batch_experts, b), cfg)
            )
        for name in denses:
            jobs[(name, b, 0)] = lambda b=b, m=models[name]: time_engine(m, tokenizer, None, b, 0, cfg)
        if hf is not None and cfg.hf:
            jobs[(STEP_HF, b, 0)] = lambda b=b: time_hf(hf, b, cfg)
    for d in dcounts:
        for name in moes:
            jobs.setdefault(
                (name, cfg.expert_batch, d),
                lambda d=d, m=models[name], r=routers[name]: time_engine(
                    m, tokenizer, r, cfg.expert_batch, d, cfg
                ),
            )
    names = list(jobs)

    progress(f"warm-up: every system once at batch {max(cfg.batch_sizes)}")
    for key in names:
        if key[1] == max(cfg.batch_sizes) and (
            key[0] not in MOE_SYSTEMS or key[2] == min(cfg.batch_experts, key[1])
        ):
            jobs[key]()
    runs: dict[tuple[str, int, int], list[dict]] = {k: [] for k in names}
    for rep in range(cfg.repeats):
        shift = rep * len(names) // cfg.repeats
        for key in names[shift:] + names[:shift]:  # rotate: no measurement is always first
            res = jobs[key]()
            runs[key].append(res)
            progress(
                f"repeat {rep + 1}/{cfg.repeats} {key[0]:11s} batch {key[1]:3d} experts {key[2]}: "
                f"decode {res['decode'] * 1e3:8.2f} ms  prefill {res['prefill'] * 1e3:8.1f} ms"
            )

    rows = []
    for (system, b, d), rs in runs.items():
        row = {
            "system": system,
            "batch": b,
            "experts": d,
            "decode_ms": spread([r["decode"] for r in rs], cfg.flag_spread),
            "prefill_ms": spread([r["prefill"] for r in rs], cfg.flag_spread),
        }
        if system != STEP_HF:
            row["unique_experts_seen"] = sorted({u for r in rs for u in r["unique_experts"]})
            if system in MOE_SYSTEMS and row["unique_experts_seen"] != [d]:
                seen = row["unique_experts_seen"]
                notes.append(f"batch {b}, {d} experts asked: the engine's steps had {seen}")
        context = rs[0].get("context", cfg.prompt_len + cfg.warmup_steps + (cfg.decode_steps + 1) / 2)
        is_moe = system in MOE_SYSTEMS
        model = models[system] if system != STEP_HF else dense
        nbytes = step_bytes(model, b, list(range(d)), context, routers[system] if is_moe else None)
        rows.append(_floors(row, nbytes, bandwidths.get(system, bw)))
        if row["decode_ms"]["flagged"]:  # prefill flags stay in the JSON: one step each, noisier
            dm = row["decode_ms"]
            notes.append(
                f"{system} batch {b} experts {d}: decode repeat(s) {dm['flagged']} (0-based) more "
                f"than {cfg.flag_spread:.0%} from the median {dm['median']:.2f} ms"
            )
    batch_rows = [
        r
        for r in rows
        if r["system"] not in MOE_SYSTEMS or r["experts"] == min(cfg.batch_experts, r["batch"])
    ]
    batch_rows = [r for r in batch_rows if r["batch"] in cfg.batch_sizes]
    expert_rows = [
        r
        for r in rows
        if r["system"] in MOE_SYSTEMS and r["batch"] == cfg.expert_batch and r["experts"] in dcounts
    ]
    paired = moe_vs_dense(runs, cfg)
    breakdown: dict = {}
    if cfg.breakdown:
        hooked = {
            STEP_MOE: "pregating",
            STEP_MOE_INT8: "pregating_int8",
            STEP_MOE_NATIVE: "pregating_native",
            STEP_MOE_INT8_NATIVE: "pregating_int8_native",
        }
        breakdown = {key: [] for name, key in hooked.items() if name in models}
        breakdown["layerwise"] = [] if gate is not None else {"skipped": "no --layerwise gate given"}
        for b in cfg.batch_sizes:
            progress(f"breakdown at batch {b} (hooked run{' + layer-wise gate' if gate is not None else ''})")
            for name, key in hooked.items():
                if name in models:
                    m, d = models[name], min(cfg.batch_experts, b)
                    res = time_engine(m, tokenizer, routers[name], b, d, cfg, breakdown=True)
                    breakdown[key].append({"batch": b, "experts": d, **res["breakdown"]})
            if gate is not None:
                lw = time_layerwise(moe, gate, b, cfg)
                breakdown["layerwise"].append(
                    {"batch": b, "experts_per_layer": lw["experts_per_layer"], **lw["breakdown"]}
                )
        if gate is not None:
            notes.append(
                "layer-wise gate: timed with direct model.forward_packed calls (the engine serves "
                "pre-gating routers only); its experts are its own choice, not controlled"
            )

    for name, model in models.items():
        tiling = getattr(getattr(model, "native", None), "tiling", None)
        if (
            tiling is not None and not tiling.tiled
        ):  # a torch read put the rows back during the run, breakdown included
            notes.append(f"{name}: its weights were read as rows, not tiles (pregate.native_layout)")

    products = None
    if cfg.breakdown:
        progress("one matrix-vector product at each of the model's MLP shapes")
        products = measure_products(config, cfg)
    llama = measure_llama_cpp(cfg, config, dense, progress)
    if "skipped" in llama:
        notes.append(f"llama.cpp skipped: {llama['skipped']}")

    return {
        "model": str(model_dir),
        "base": config.provenance.get("base"),
        "router": router_note,
        "config": asdict(cfg),
        "threads": torch.get_num_threads(),
        "num_experts": config.num_experts,
        "top_k": router.cfg.top_k,
        "bandwidth": bw,
        "bandwidth_int8": bandwidths.get(STEP_MOE_INT8),
        "batch_sizes": batch_rows,
        "distinct_experts": expert_rows,
        "moe_vs_dense": paired,
        "breakdown": breakdown,
        "products": products,
        "llama_cpp": llama,
        "notes": notes,
    }


def dense_twin(system: str) -> str:
    """The dense parent measured in the same layout as MoE system `system` (moe-int8 -> dense-int8)."""
    return STEP_DENSE + system.removeprefix(STEP_MOE)


def moe_vs_dense(runs: dict[tuple[str, int, int], list[dict]], cfg: StepBenchConfig) -> list[dict]:
    """Each MoE's decode step over its dense twin's at every batch size, paired within each repeat.

    The two run in the same repeat, so a slow spell of the host that lasts a repeat moves both: the
    ratio of each repeat's pair spreads far less than either time does, and its spread is what says
    whether the MoE is ahead (the brief: ratios measured side by side, medians of interleaved repeats)."""
    out = []
    for (system, b, d), rs in runs.items():
        twin = (dense_twin(system), b, 0)
        if system not in MOE_SYSTEMS or d != min(cfg.batch_experts, b) or b not in cfg.batch_sizes:
            continue
        if twin not in runs:
            continue
        ratios = [m["decode"] / t["decode"] for m, t in zip(rs, runs[twin], strict=True)]
        out.append(
            {"system": system, "dense": twin[0], "batch": b, "experts": d}
            | {"decode_ratio": repeat_spread(ratios, cfg.flag_spread)}
        )
    return out


# ----------------------------------------------------------------------------------------- report


def _row_line(r: dict) -> str:
    d, p = r["decode_ms"], r["prefill_ms"]
    flag = "!" if d["flagged"] else ""
    return (
        f"{r['system']:12s}{r['batch']:6d}{r['experts']:8d}{d['median']:11.2f}{flag:1s}"
        f"{d['min']:9.2f}{d['max']:9.2f}{p['median']:11.1f}{r['bytes']['total'] / 1e6:9.1f}"
        f"{r['floor_read_ms']:9.2f}{r['floor_gemv_ms']:9.2f}{r['ratio_read']:8.2f}{r['ratio_gemv']:8.2f}"
    )


def _product_cell(p: dict) -> str:
    return f"{p['us']:.1f} ({p['gbps']:.1f})".rjust(19)


def format_step_table(result: dict) -> str:
    head = (
        f"{'system':12s}{'batch':>6s}{'experts':>8s}{'decode ms':>11s} {'min':>9s}{'max':>9s}"
        f"{'prefill ms':>11s}{'MB read':>9s}{'floor rd':>9s}{'floor mv':>9s}{'x read':>8s}{'x gemv':>8s}"
    )
    bw = result["bandwidth"]
    lines = [
        f"bandwidth: plain read {bw['read'] / 1e9:.2f} GB/s, "
        f"torch GEMV ({bw['dtype']}) {bw['gemv'] / 1e9:.2f} GB/s"
        + (
            f", int8 GEMV {q['gemv'] / 1e9:.2f} GB/s (-int8 rows)"
            if (q := result.get("bandwidth_int8"))
            else ""
        ),
        "floor = MB read / bandwidth (rd: plain read, mv: GEMV); x = time / floor; "
        "! = a repeat far off the median",
        "",
        "decode step by batch size",
        head,
    ]
    lines += [_row_line(r) for r in result["batch_sizes"]]
    lines += ["", f"decode step by distinct experts (batch {result['config']['expert_batch']})", head]
    lines += [_row_line(r) for r in result["distinct_experts"]]
    if result.get("moe_vs_dense"):
        lines += ["", "MoE / its dense parent, decode step, paired within each repeat (median, min, max)"]
        for r in result["moe_vs_dense"]:
            q = r["decode_ratio"]
            flag = "!" if q["flagged"] else " "
            lines.append(
                f"{r['system']:24s}/ {r['dense']:24s} batch {r['batch']:3d}"
                f"{q['median']:8.3f}{flag}{q['min']:7.3f}{q['max']:7.3f}"
            )
    for variant, rows in result["breakdown"].items():
        lines += ["", f"breakdown of a decode step, {variant} router (median ms)"]
        if isinstance(rows, dict):
            lines.append(f"  skipped: {rows['skipped']}")
            continue
        # the parts a layout has (a native step's layers are one call, the torch layout's several)
        cols = (*[c for c in PARTS if any(r[c] for r in rows) or c in ("router", "lm_head")], "rest", "step")
        lines.append(f"{'batch':>6s}{'experts':>9s}" + "".join(f"{c:>11s}" for c in cols) + f"{'calls':>8s}")
        for r in rows:  # pre-gating: the controlled experts; layer-wise: its mean per layer
            experts = r.get("experts", r.get("experts_per_layer"))
            calls = r.get("torch_calls")
            lines.append(
                f"{r['batch']:6d}{experts:9.2f}"
                + "".join(f"{r[c]:11.3f}" for c in cols)
                + (f"{calls:8d}" if calls is not None else f"{'-':>8s}")
            )
    if result.get("products"):
        lines += ["", "one matrix-vector product per MLP shape of layer 0, cold (us per call, GB/s)"]
        kinds = [k for k in ("plain", "packed", "int8") if k in result["products"]]
        lines.append(f"{'product':16s}{'shape':>12s}" + "".join(f"{k:>19s}" for k in kinds))
        for role, (o, i) in result["products"]["shapes"].items():
            cells = "".join(_product_cell(result["products"][k][role]) for k in kinds)
            lines.append(f"{role:16s}{f'{o}x{i}':>12s}" + cells)
    ll = result["llama_cpp"]
    lines.append("")
    if "skipped" in ll:
        lines += [f"llama.cpp: skipped ({ll['skipped']})", f"  source GGUF: {ll['source']['gguf'] or '-'}"]
    else:
        lines.append("llama.cpp, dense parent, batch 1 (decode ms: median, min, max):")
        for r in ll["runs"]:
            dm = r["decode_ms"]
            lines.append(
                f"  {r['weights']:8s}{dm['median']:9.2f}{dm['min']:9.2f}{dm['max']:9.2f}  "
                f"{r['gguf_bytes'] / 1e6:7.1f} MB  {r['gguf']}"
            )
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def plot_step_vs_experts(result: dict, path: str | Path) -> Path:
    """Decode-step time against distinct experts (median, min-max bars) with both floors drawn."""
    from pregate.plots import pyplot

    plt = pyplot()
    rows = [r for r in result["distinct_experts"] if r["system"] == STEP_MOE]
    xs = [r["experts"] for r in rows]
    med = [r["decode_ms"]["median"] for r in rows]
    lo = [m - r["decode_ms"]["min"] for m, r in zip(med, rows)]
    hi = [r["decode_ms"]["max"] - m for m, r in zip(med, rows)]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.errorbar(xs, med, yerr=[lo, hi], fmt="k-o", capsize=3, label="MoE in the engine (median, min-max)")
    ax.plot(xs, [r["floor_read_ms"] for r in rows], "b--", label="floor: bytes / plain-read bandwidth")
    ax.plot(xs, [r["floor_gemv_ms"] for r in rows], "r:", label="floor: bytes / torch GEMV rate")
    b = result["config"]["expert_batch"]
    for r in result["batch_sizes"]:
        if r["system"] == STEP_DENSE and r["batch"] == b:
            ax.axhline(r["decode_ms"]["median"], color="gray", lw=1, label=f"dense parent, batch {b}")
    ax.set_xlabel(f"distinct routed experts in the step (batch {b})")
    ax.set_ylabel("decode step (ms)")
    ax.set_xticks(xs)
    top = max(med + [r["floor_gemv_ms"] for r in rows])
    ax.set_ylim(0, 1.6 * top)  # a disturbed repeat's bar may run off the top; the JSON has every repeat
    ax.set_title("Decode-step time vs distinct experts, against the memory floor")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_step_outputs(result: dict, json_path: str | Path) -> list[Path]:
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    plot = json_path.with_name(json_path.stem + "_step_vs_experts.png")
    return [json_path, plot_step_vs_experts(result, plot)]


def bench_step(model_dir: str | Path, json_path: str | Path | None, cfg: StepBenchConfig) -> dict:
    """The library function behind `pregate bench step`: check, run, print the table, and with
    json_path write the JSON and the plot beside it."""
    check_model(model_config(model_dir), cfg)  # before any weights load
    result = run_bench_step(model_dir, cfg)
    print(format_step_table(result))
    for p in write_step_outputs(result, json_path) if json_path else ():
        print(f"wrote {p}")
    return result
