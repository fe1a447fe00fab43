"""`pregate bench memory`: peak resident memory of a serving engine against the experts it keeps resident.

Peak RSS only grows within a process, so every setting runs in a fresh Python process (`probe`, started
as `python -m pregate.memory_bench`), one after another: the imports alone (the floor every setting
shares), the engine with every expert resident, and the engine with an expert store holding k experts
(`load_engine(..., resident_experts=k)`, what `pregate serve --resident-experts k` runs). Each probe
loads the engine, records its peak RSS, serves `requests` prompts of random token ids for `max_tokens`
tokens each (so the store loads and evicts), records the peak again, and reports the bytes of routed-expert
weights it holds. The report sets the peaks beside the whole model's routed-expert bytes, so a reader can
check that a store of k experts never held them all, not even while loading.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pregate.checkpoint import has_router, parse_dtype
from pregate.errors import PregateError, check_int

IMPORTS_ONLY = "imports only"
ALL_RESIDENT = "all resident"


@dataclass
class MemoryBenchConfig:
    resident_experts: list[int] = field(default_factory=lambda: [1, 2, 4])
    requests: int = 4
    prompt_len: int = 32
    max_tokens: int = 16
    dtype: str = "bfloat16"
    timeout_s: float = 600.0  # per probe process

    def __post_init__(self) -> None:
        ks = list(self.resident_experts)
        if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
            raise PregateError(f"--resident-experts {ks!r}: each must be an integer >= 1")
        for name in ("requests", "prompt_len", "max_tokens"):
            check_int(f"MemoryBenchConfig.{name}", getattr(self, name))
        parse_dtype(self.dtype)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe(model_dir: str, k: int | None, cfg: MemoryBenchConfig, imports_only: bool = False) -> dict:
    """One setting in this process (meant to be fresh): peak RSS after loading and after serving."""
    import torch

    from pregate.engine import SamplingParams
    from pregate.launch import load_engine
    from pregate.scheduler import SchedulerConfig

    if imports_only:
        return {"after_load_mb": peak_rss_mb(), "after_serving_mb": peak_rss_mb(), "routed_bytes": 0}
    budget = cfg.requests * (cfg.prompt_len + cfg.max_tokens)
    sched = SchedulerConfig(max_running=cfg.requests, kv_capacity_tokens=budget)
    engine = load_engine(model_dir, sched, dtype=cfg.dtype, resident_experts=k)
    after_load = peak_rss_mb()
    routed = 0
    for layer in engine.model.layers:  # the parameters, or their inference layout (int8, packed)
        mlp = layer.mlp
        routed += mlp.w_gate_up.nbytes + mlp.w_down_t.nbytes
        routed += mlp.inference_experts.nbytes if mlp.inference_experts is not None else 0
    if engine.store is not None:
        routed += engine.store.buffer_bytes
    g = torch.Generator().manual_seed(0)
    vocab = engine.model.config.base["vocab_size"]
    prompts = [torch.randint(3, vocab, (cfg.prompt_len,), generator=g).tolist() for _ in range(cfg.requests)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=cfg.max_tokens, ignore_eos=True))
    failed = [o.finish_reason for o in outs if o.finish_reason == "error"]
    if failed:
        raise PregateError(f"{len(failed)} of {len(outs)} requests failed in the probe")
    return {"after_load_mb": after_load, "after_serving_mb": peak_rss_mb(), "routed_bytes": routed}


def _run_probe(
    model_dir: str, setting: str, k: int | None, cfg: MemoryBenchConfig, progress: Callable[[str], None]
) -> dict:
    args = [sys.executable, "-m", "pregate.memory_bench", model_dir, "--config", json.dumps(asdict(cfg))]
    if setting == IMPORTS_ONLY:
        args.append("--imports-only")
    elif k is not None:
        args += ["--k", str(k)]
    progress(f"probe: {setting}")
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        raise PregateError(f"the {setting} probe took more than {cfg.timeout_s:g} s") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise PregateError(f"the {setting} probe failed: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_memory_bench(
    model_dir: str | Path, cfg: MemoryBenchConfig, progress: Callable[[str], None] = print
) -> dict:
    """Every setting, each in its own process; returns {"rows": [...], "routed_bytes_all": ..., ...}."""
    from pregate.moe import load_config

    config = load_config(model_dir)  # a clear error before any process starts
    if not has_router(model_dir):
        raise PregateError(f"{model_dir} has no trained router; give a `pregate train` output directory")
    if config.num_experts == 0:
        raise PregateError(f"{model_dir} has no routed experts to offload")
    too_many = [k for k in cfg.resident_experts if k > config.num_experts]
    if too_many:
        raise PregateError(f"--resident-experts {too_many}: the model has {config.num_experts} experts")
    settings: list[tuple[str, int | None]] = [(IMPORTS_ONLY, None), (ALL_RESIDENT, None)]
    settings += [(f"k = {k}", k) for k in cfg.resident_experts]
    rows = []
    for name, k in settings:
        res = _run_probe(str(model_dir), name, k, cfg, progress)
        rows.append({"setting": name, "resident_experts": k, **res})
    everything = next(r for r in rows if r["setting"] == ALL_RESIDENT)["routed_bytes"]
    return {
        "model": str(model_dir),
        "num_experts": config.num_experts,
        "routed_bytes_all": everything,
        "config": asdict(cfg),
        "rows": rows,
    }


def format_memory_table(result: dict) -> str:
    floor = result["rows"][0]["after_serving_mb"]
    lines = [
        f"routed-expert weights of the whole model: {result['routed_bytes_all'] / 2**20:.1f} MiB "
        f"({result['num_experts']} experts); peak RSS in MiB, each setting in a fresh process",
        f"{'setting':16s}{'after load':>12s}{'after serving':>15s}{'above imports':>15s}{'routed held':>13s}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['setting']:16s}{r['after_load_mb']:12.0f}{r['after_serving_mb']:15.0f}"
            f"{r['after_serving_mb'] - floor:15.0f}{r['routed_bytes'] / 2**20:13.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """The probe process: prints one JSON line."""
    p = argparse.ArgumentParser(prog="python -m pregate.memory_bench")
    p.add_argument("model")
    p.add_argument("--config", required=True)
    p.add_argument("--k", type=int)
    p.add_argument("--imports-only", action="store_true")
    args = p.parse_args(argv)
    cfg = MemoryBenchConfig(**json.loads(args.config))
    print(json.dumps(probe(args.model, args.k, cfg, imports_only=args.imports_only)))


if __name__ == "__main__":
    main()
