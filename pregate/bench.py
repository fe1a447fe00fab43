"""`pregate bench serve`: every batching policy on the same ShareGPT trace and model, side by side.

What runs, in one process on one model: the pregate MoE engine under each scheduling policy; the dense
parent served by the same engine (fcfs, no routing); and Hugging Face `generate` on the dense parent with
static batches of the same concurrency (the baseline a user would pick). Every run replays the trace in
real time: a request joins when its arrival time has passed on the wall clock. Runs are interleaved and
repeated (the order rotates every repeat) so machine noise spreads over all of them; the report is the
median over repeats of every metric.

Routing: the router of the MoE checkpoint (`pregate train` writes it). A checkpoint without one gets a
router distilled here for a few dozen steps on the MoE's own expert scores (`distill_router`), which is
enough to give realistic expert queues; the benchmark says which it used.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from pregate import sim
from pregate.checkpoint import ROUTER_WEIGHTS, has_router
from pregate.distill import DistillConfig, router_loss
from pregate.engine import Engine, SamplingParams
from pregate.errors import PregateError, check_int
from pregate.metrics import RequestMetrics, StepRecord, repeat_spread, summarize_run
from pregate.moe import MoEForCausalLM, build_moe_from_dense, load_moe
from pregate.packed import serving_layout
from pregate.quantize import check_mode
from pregate.router import PreGatingRouter, RouterConfig, load_router
from pregate.scheduler import SCHEDULING_POLICIES, SchedulerConfig, SchedulerError
from pregate.workload import WorkloadRequest, load_trace, save_trace, sharegpt_workload

DENSE = "dense-fcfs"  # the dense parent in the same engine
HF = "hf-static"  # HF generate, static batches of max_running requests
# a whole run's repeat further than this share of the median from it is flagged (metrics.repeat_spread,
# the rule bench step and bench cache flag single steps and settings by, at 0.2): a run sums thousands
# of steps, so only a disturbed machine moves it this far (one repeat once took 27x the others)
FAR_OFF = 0.5


class BenchError(PregateError):
    """Bad benchmark options."""


@dataclass
class BenchConfig:
    """One benchmark: the trace, the budgets every policy shares, and what to compare."""

    policies: list[str] = field(default_factory=lambda: list(SCHEDULING_POLICIES))
    requests: int = 32
    rate: float | None = 4.0  # requests/s (Poisson); None = all at t=0
    seed: int = 0
    # a binding step budget (16 of 32 running requests decode per step), unlike serve's 256: the policies
    # differ only in what they leave out of a full step (docs/serving.md has a run at 64)
    token_budget: int = 16
    max_running: int = 32
    kv_capacity_tokens: int = 16384
    max_wait_steps: int = 2
    min_queue_tokens: int = 2
    prefill_chunk: int = 256
    long_prefill_tokens: int = 256
    max_bypass_steps: int = 64
    max_prompt_tokens: int = 256
    max_output_tokens: int = 64
    repeats: int = 3  # odd, so the median is one run's value, not a mean of two
    dtype: str = "bfloat16"  # weights; attention runs in float32 on CPU (MoEForCausalLM.attention_dtype)
    quantize: str | None = None  # "int8": weight-only int8 for the MoE and the dense parent in the engine
    native: bool = False  # their decode rows through pregate.native's layers
    dense: bool = True
    hf: bool = True
    router_steps: int = 40  # only when the checkpoint has no trained router

    def __post_init__(self) -> None:
        unknown = [p for p in self.policies if p not in SCHEDULING_POLICIES]
        if unknown or not self.policies:
            raise BenchError(
                f"policies={self.policies!r}: use one or more of {', '.join(SCHEDULING_POLICIES)}"
            )
        for name in (
            "requests",
            "token_budget",
            "max_running",
            "kv_capacity_tokens",
            "prefill_chunk",
            "max_prompt_tokens",
            "max_output_tokens",
            "repeats",
            "router_steps",
        ):
            v = getattr(self, name)
            check_int(f"BenchConfig.{name}", v, error=BenchError)
        if self.rate is not None and not self.rate > 0:
            raise BenchError(f"rate={self.rate!r} must be > 0 requests/s (omit it for all at t=0)")
        if self.dtype not in ("float32", "bfloat16"):
            raise BenchError(f"dtype={self.dtype!r} must be float32 or bfloat16")
        check_mode(self.quantize, error=BenchError)
        if self.native and self.dtype != "bfloat16":
            raise BenchError("--native runs bfloat16 weights; drop --dtype float32")
        try:
            self.scheduler(self.policies[0])  # budgets and expert-aware knobs, checked before any model loads
        except SchedulerError as err:
            raise BenchError(str(err)) from None

    def scheduler(self, policy: str) -> SchedulerConfig:
        """`policy` under this benchmark's budgets: every SchedulerConfig field but the policy is one of
        ours, by the same name (a new scheduler field must be added here too, or this fails loudly)."""
        budgets = {f.name: getattr(self, f.name) for f in fields(SchedulerConfig) if f.name != "policy"}
        return SchedulerConfig(policy=policy, **budgets)


@dataclass
class RunResult:
    requests: list[RequestMetrics]
    steps: list[StepRecord]
    failed: dict[str, str]

    def summary(self) -> dict:
        return summarize_run(self.requests, self.steps)


# ----------------------------------------------------------------------------------------- routers


def distill_router(
    moe: MoEForCausalLM,
    tokenizer,
    steps: int = 40,
    seq_len: int = 128,
    batch: int = 4,
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> PreGatingRouter:
    """A paper-shaped router distilled for `steps` steps on the MoE's own backbone (train split of its
    domains) with the training target and loss (`distill.router_loss`, `DistillConfig` defaults: the
    graded loss on log-share scores). A stand-in for `pregate train` so a bare MoE can be benchmarked."""
    from pregate import data

    torch.manual_seed(seed)
    base = moe.config.base
    router = PreGatingRouter(
        RouterConfig.preset("readme", vocab_size=base["vocab_size"], num_experts=moe.num_experts)
    )
    router.init_embedding_from(moe.embed_tokens.weight.float())
    domains = list(moe.config.provenance.get("domains") or moe.config.expert_names)
    pool = torch.cat(
        [data.token_blocks(tokenizer, d, "train", seq_len * batch * 2, seq_len) for d in domains]
    )
    opt = torch.optim.AdamW(router.parameters(), lr=5e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        ids = pool[torch.randint(len(pool), (batch,), generator=g)]
        loss, _ = router_loss(DistillConfig(), router, moe, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i % 10 == 0 or i == steps - 1:
            progress(f"  distilling a router: step {i + 1}/{steps}, loss {loss.item():.3f}")
    return router.eval()


def load_parts(model_dir: str | Path, cfg: BenchConfig, progress: Callable[[str], None] = print):
    """(MoE, tokenizer, router, how the router was obtained)."""
    from transformers import AutoTokenizer

    dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
    moe = load_moe(model_dir, dtype)
    if moe.num_experts == 0:
        raise BenchError(
            f"{model_dir} has no routed experts; give a MoE checkpoint from `pregate refactor`/`train`"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if has_router(model_dir):
        router = load_router(model_dir)
        if not isinstance(router, PreGatingRouter):
            raise BenchError(f"{model_dir} holds a layer-wise gate; serving needs a pre-gating router")
        return moe, tokenizer, router, f"trained ({model_dir}/{ROUTER_WEIGHTS})"
    progress(f"{model_dir} has no trained router; distilling one for {cfg.router_steps} steps")
    moe32 = load_moe(model_dir, torch.float32)
    router = distill_router(moe32, tokenizer, cfg.router_steps, seed=cfg.seed, progress=progress)
    return moe, tokenizer, router, f"distilled here for {cfg.router_steps} steps (no trained router)"


def load_dense_parent(moe: MoEForCausalLM):
    """(HF model, the same weights as a pregate model with 0 routed experts) of the MoE's dense parent,
    in the MoE's dtype: what the engine serves as the dense baseline."""
    from pregate import hub

    dtype = next(moe.parameters()).dtype
    hf = hub.load_dense(moe.config.provenance["base"], dtype)[0]
    n, i = hf.config.num_hidden_layers, hf.config.intermediate_size
    dense = build_moe_from_dense(hf, [torch.arange(i)] * n, [[] for _ in range(n)])
    return hf, dense


# ----------------------------------------------------------------------------------------- replay


def replay_engine(engine: Engine, trace: list[WorkloadRequest]) -> RunResult:
    """Serve `trace` in real time: a request is added once its arrival time has passed; returns metrics."""
    pending = sorted(trace, key=lambda r: r.arrival_time)
    t0 = engine.metrics.clock()
    i = 0
    while i < len(pending) or engine.has_work():
        now = engine.metrics.clock()
        while i < len(pending) and t0 + pending[i].arrival_time <= now:
            r = pending[i]
            params = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
            try:
                engine.add_request(
                    r.prompt, params, request_id=r.request_id, arrival_time=t0 + r.arrival_time
                )
            except PregateError as err:
                engine.failed[r.request_id] = str(err)
            i += 1
        if engine.has_work():
            engine.step()
        elif i < len(pending):
            time.sleep(max(0.0, t0 + pending[i].arrival_time - engine.metrics.clock()))
        for rid in [m.request_id for m in engine.metrics.requests]:
            engine.result(rid)  # drop finished outputs: only their metrics matter here
    return RunResult(list(engine.metrics.requests), list(engine.metrics.steps), dict(engine.failed))


@torch.no_grad()
def replay_hf_static(hf, tokenizer, trace: list[WorkloadRequest], batch_size: int) -> RunResult:
    """HF `generate` with static batches: when idle, take up to batch_size arrived requests, left-pad,
    generate the longest output length of the batch (greedy); every request ends with its batch."""
    pending = sorted(trace, key=lambda r: r.arrival_time)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0, i, done, steps = time.perf_counter(), 0, [], []
    while i < len(pending):
        now = time.perf_counter()
        if t0 + pending[i].arrival_time > now:
            time.sleep(t0 + pending[i].arrival_time - now)
            continue
        batch = []
        while i < len(pending) and len(batch) < batch_size and t0 + pending[i].arrival_time <= now:
            batch.append(pending[i])
            i += 1
        ids = [tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in batch]
        width = max(map(len, ids))
        x = torch.tensor([[pad] * (width - len(s)) + s for s in ids])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
        n = max(r.output_len for r in batch)
        start = time.perf_counter()
        hf.generate(
            input_ids=x,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad,
        )
        end = time.perf_counter()
        steps.append(
            StepRecord(  # n tokens for each row of the batch
                len(steps),
                start,
                end,
                len(batch) * (width + n),
                0,
                len(batch) * width,
                len(batch) * n,
                len(batch) * n,
            )
        )
        # static batching returns nothing before the batch ends: first token = finish = batch end
        done += [RequestMetrics(r.request_id, t0 + r.arrival_time, end, end, r.output_len) for r in batch]
    return RunResult(done, steps, {})


# ----------------------------------------------------------------------------------------- the benchmark


SERVE_METRICS = {  # table column -> (summary key, field)
    "norm_mean": ("normalized_latency", "mean"),
    "norm_p50": ("normalized_latency", "p50"),
    "norm_p95": ("normalized_latency", "p95"),
    "norm_p99": ("normalized_latency", "p99"),
    "norm_max": ("normalized_latency", "max"),
    "ttft_mean": ("ttft", "mean"),
    "ttft_p95": ("ttft", "p95"),
    "tpot_mean": ("tpot", "mean"),
    "throughput": ("throughput", None),
    "experts_per_step": ("unique_experts_per_step_mean", None),
    "tokens_per_step": ("tokens_per_step_mean", None),
    "step_time_mean": ("step_time_mean", None),
    "makespan": ("makespan", None),
}


def flat_metrics(summary: dict) -> dict[str, float | None]:
    out = {}
    for name, (key, sub) in SERVE_METRICS.items():
        v = summary.get(key)
        out[name] = (v or {}).get(sub) if sub else v
    return out


def native_budget_note(cfg: BenchConfig) -> str | None:
    """What --native leaves to torch at this token budget, or None when every step runs natively."""
    from pregate.native import whole_rows

    limit = whole_rows(cfg.quantize is not None)
    if not cfg.native or limit is None or cfg.token_budget <= limit:
        return None
    return (
        f"note: --native runs a step wholly natively when it holds at most {limit} tokens; at "
        f"--token-budget {cfg.token_budget} larger steps run their prompt chunks through torch; "
        f"--token-budget {limit} keeps every step native"
    )


# the settings that make a trace (BenchConfig field -> `bench serve` flag): a trace replayed from a file
# has its own, so these set to anything but their defaults would have no effect, and are refused
WORKLOAD_FIELDS = {
    "rate": "--rate",
    "requests": "--requests",
    "max_prompt_tokens": "--max-prompt",
    "max_output_tokens": "--max-output",
    "seed": "--seed",
}


def check_replay(cfg: BenchConfig, trace_path: str | Path | None) -> None:
    """Raise BenchError if trace_path exists (it is replayed as it is) and cfg sets workload settings."""
    if trace_path is None or not Path(trace_path).is_file():
        return
    d = BenchConfig()
    given = [flag for name, flag in WORKLOAD_FIELDS.items() if getattr(cfg, name) != getattr(d, name)]
    if given:
        raise BenchError(
            f"--trace {trace_path} exists and is replayed with its own requests and arrival times, "
            f"so {', '.join(given)} would have no effect: drop {'them' if len(given) > 1 else 'it'}, "
            "or give --trace a new file to generate the trace there"
        )


def run_bench(
    model_dir: str | Path,
    cfg: BenchConfig,
    trace_path: str | Path | None = None,
    progress: Callable[[str], None] = print,
) -> dict:
    """Run the benchmark; returns {"policies": {name: {metric: median}}, "workload": {...}, "runs": ...}.
    A trace_path that exists is replayed as it is (`check_replay`); else the trace is generated (and
    saved there if given)."""
    check_replay(cfg, trace_path)
    moe, tokenizer, router, router_note = load_parts(model_dir, cfg, progress)
    if trace_path is not None and Path(trace_path).is_file():
        trace = load_trace(trace_path)
        source = f"trace {trace_path}"
    else:

        def count(s: str) -> int:
            return len(tokenizer(s, add_special_tokens=False)["input_ids"])

        trace = sharegpt_workload(
            cfg.requests,
            cfg.rate,
            cfg.seed,
            count,
            cfg.max_prompt_tokens,
            cfg.max_output_tokens,
            pool=max(500, 20 * cfg.requests),
        )
        source = "ShareGPT first turns"
        if trace_path is not None:
            save_trace(trace_path, trace)
    names = list(cfg.policies)
    hf = dense = None
    if cfg.dense or cfg.hf:
        hf, dense = load_dense_parent(moe)
        dense = dense if cfg.dense else None
    serving_layout(moe, router, cfg.quantize, cfg.native)  # the engine's models as serve runs them; HF
    if dense is not None:  # generate keeps the float weights
        serving_layout(dense, None, cfg.quantize, cfg.native)
    names += [DENSE] * cfg.dense + [HF] * cfg.hf

    def one(name: str) -> RunResult:
        if name == HF:
            return replay_hf_static(hf, tokenizer, trace, cfg.max_running)
        if name == DENSE:
            return replay_engine(Engine(dense, tokenizer, None, cfg.scheduler("fcfs")), trace)
        return replay_engine(Engine(moe, tokenizer, router, cfg.scheduler(name)), trace)

    # Warm-up, unrecorded: a quarter of the trace at once through every system. A shorter one left the
    # first recorded run up to 30 % slower (kernel and allocator caches still cold for its batch shapes).
    warm = [WorkloadRequest(r.request_id, r.prompt, r.output_len) for r in trace[: max(2, len(trace) // 4)]]
    if (note := native_budget_note(cfg)) is not None:
        progress(note)
    progress(f"warm-up on {len(warm)} requests ({len(trace)} in the trace; router: {router_note})")
    for m in (moe, dense):
        if m is not None:
            replay_engine(Engine(m, tokenizer, router if m is moe else None, cfg.scheduler("fcfs")), warm)
    if hf is not None and cfg.hf:
        replay_hf_static(hf, tokenizer, warm, cfg.max_running)
    runs: dict[str, list[RunResult]] = {n: [] for n in names}
    for rep in range(cfg.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate: no run is always first
        for name in order:
            t = time.perf_counter()
            res = one(name)
            runs[name].append(res)
            s = flat_metrics(res.summary())
            progress(
                f"repeat {rep + 1}/{cfg.repeats} {name:14s} {time.perf_counter() - t:6.1f} s  "
                f"norm mean {s['norm_mean'] * 1e3:7.1f} ms/tok  p95 {s['norm_p95'] * 1e3:7.1f}  "
                f"experts/step {s['experts_per_step'] or 0:.2f}"
                + (f"  failed {len(res.failed)}" if res.failed else "")
            )
    policies = {}
    for name, rs in runs.items():
        flats = [flat_metrics(r.summary()) for r in rs]
        policies[name] = {
            k: (statistics.median(v) if (v := [f[k] for f in flats if f[k] is not None]) else None)
            for k in SERVE_METRICS
        }
        policies[name]["failed"] = max(len(r.failed) for r in rs)
        spread = [f["norm_mean"] for f in flats if f["norm_mean"] is not None]
        if spread:
            policies[name]["norm_mean_spread"] = [min(spread), max(spread)]
            policies[name]["outlier_repeats"] = outliers = repeat_spread(spread, FAR_OFF)["flagged"]
            for i in outliers:
                progress(
                    f"warning: repeat {i + 1} of {name} is far off the others "
                    f"(norm mean {spread[i] * 1e3:.1f} ms/tok against a median of "
                    f"{statistics.median(spread) * 1e3:.1f}); the machine was probably disturbed"
                )
    if HF in policies:
        policies[HF]["tpot_mean"] = None  # static batches return every token at the batch's end
    prompt_lens = [r.prompt_tokens or 0 for r in trace]
    workload = {
        "source": source,
        "requests": len(trace),
        "rate": cfg.rate,
        "seed": cfg.seed,
        "prompt_tokens_mean": sum(prompt_lens) / len(trace),
        "output_tokens_mean": sum(r.output_len for r in trace) / len(trace),
        "last_arrival": max(r.arrival_time for r in trace),
        "model": str(model_dir),
        "router": router_note,
        "config": asdict(cfg),
        "threads": torch.get_num_threads(),
        "num_layers": len(moe.layers),
    }
    moe_runs = [step_records(r) for n, rs in runs.items() if n not in (DENSE, HF) for r in rs]
    try:
        check = sim.fit_check(moe_runs, len(moe.layers))
    except sim.SimError as err:  # too few MoE runs or steps to fit on: say so in the report
        check = {"skipped": str(err)}
    return {"policies": policies, "workload": workload, "cost_model_check": check, "runs": runs}


def step_records(run: RunResult) -> list[dict]:
    """A run's engine steps as the simulator's cost-model fit reads them (`pregate.sim.calibrate`)."""
    return [
        {
            "duration": st.duration,
            "tokens": st.num_tokens,
            "experts": st.unique_experts,
            "rows": st.num_token_rows,
        }
        for st in run.steps
    ]


def format_serve_table(result: dict) -> str:
    cols = [
        ("norm_mean", 1e3),
        ("norm_p50", 1e3),
        ("norm_p95", 1e3),
        ("norm_p99", 1e3),
        ("norm_max", 1e3),
        ("ttft_mean", 1),
        ("tpot_mean", 1e3),
        ("throughput", 1),
        ("experts_per_step", 1),
    ]
    head = f"{'policy':14s}" + "".join(f"{c:>12s}" for c, _ in cols[:-1]) + f"{'experts/step':>14s}"
    head += f"{'norm_mean range':>20s}"
    lines = [
        head,
        "(medians over repeats; normalized latency and TPOT in ms/token, TTFT in s, throughput in "
        "generated tok/s; range: fastest and slowest repeat)",
    ]
    for name, m in result["policies"].items():
        cells = "".join(f"{m[c] * s:12.2f}" if m[c] is not None else f"{'-':>12s}" for c, s in cols[:-1])
        lo, hi = m.get("norm_mean_spread") or (None, None)
        spread = f"{lo * 1e3:9.1f} - {hi * 1e3:7.1f}" if lo is not None else f"{'-':>19s}"
        flag = " *" if m.get("outlier_repeats") else ""
        lines.append(f"{name:14s}{cells}{m['experts_per_step'] or 0:14.2f} {spread}{flag}")
    if any(m.get("outlier_repeats") for m in result["policies"].values()):
        lines.append("* a repeat far off the others (see the warnings above); rerun on a quiet machine")
    check = result.get("cost_model_check")
    if check and "skipped" in check:
        lines.append(f"simulator cost model check skipped: {check['skipped']}")
    elif check:
        totals = check["total_error_by_run"]
        others = check["runs"] - 1
        lines.append(
            "simulator cost model (non-negative least squares, each MoE run predicted from the other "
            f"{others}):\n  "
            f"step time error median {check['step_error_median']:.1%}, p90 {check['step_error_p90']:.1%}; "
            f"total step time per run {min(totals):+.1%} .. {max(totals):+.1%}"
        )
    return "\n".join(lines)


def write_serve_outputs(result: dict, json_path: str | Path) -> list[Path]:
    """The JSON (without raw runs, plus per-request normalized latencies) and the PNG plots beside it."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    out = {
        "policies": result["policies"],
        "workload": result["workload"],
        "cost_model_check": result.get("cost_model_check"),
        "normalized_latency_samples": {
            n: [m.normalized_latency for m in rs[0].requests] for n, rs in runs.items()
        },
        # every MoE step of every repeat: what `pregate simulate --cost` fits its cost model to
        # ("run": policy and repeat, so that `sim.fit_check` can be rerun on the file)
        "engine_steps": [
            {**rec, "run": f"{n} {i + 1}"}
            for n, rs in runs.items()
            if n not in (DENSE, HF)
            for i, r in enumerate(rs)
            for rec in step_records(r)
        ],
    }
    json_path.write_text(json.dumps(out, indent=1))
    return [json_path, *plot_bench(runs, json_path.with_suffix(""))]


def plot_bench(runs: dict[str, list[RunResult]], stem: Path) -> list[Path]:
    from pregate.plots import pyplot

    plt = pyplot()

    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, rs in runs.items():
        xs = sorted(m.normalized_latency * 1e3 for r in rs for m in r.requests)
        ax.plot(xs, [(k + 1) / len(xs) for k in range(len(xs))], label=name, lw=1.6)
    ax.set_xscale("log")
    ax.set_xlabel("normalized latency (ms per generated token, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF per policy (all repeats)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + "_latency_cdf.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, rs in runs.items():
        steps = [s for r in rs for s in r.steps if s.num_prefill_tokens == 0 and s.unique_experts > 0]
        if not steps:
            continue
        ax.scatter(
            [s.unique_experts + (hash(name) % 7 - 3) * 0.03 for s in steps],
            [s.duration * 1e3 for s in steps],
            s=6,
            alpha=0.3,
            label=name,
        )
    by_e: dict[int, list[float]] = {}
    for rs in (runs[n] for n in runs if n not in (DENSE, HF)):
        for r in rs:
            for s in r.steps:
                if s.num_prefill_tokens == 0:
                    by_e.setdefault(s.unique_experts, []).append(s.duration * 1e3)
    if by_e:
        es = sorted(by_e)
        ax.plot(es, [statistics.median(by_e[e]) for e in es], "k-o", label="median (MoE policies)")
    ax.set_xlabel("unique experts in the step")
    ax.set_ylabel("step latency (ms)")
    ax.set_title("Decode-step latency vs unique experts (Read-ME Fig. 3b)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + "_step_vs_experts.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def bench_serve(
    model_dir: str | Path,
    json_path: str | Path | None,
    cfg: BenchConfig,
    trace_path: str | Path | None = None,
) -> dict:
    """The library function behind `pregate bench serve`: run, print the table, and with json_path
    write the JSON and the plots beside it."""
    if not Path(model_dir).is_dir():
        raise BenchError(
            f"{model_dir} is not a directory; give a MoE checkpoint from `pregate refactor` or "
            "`pregate train`"
        )
    try:
        result = run_bench(model_dir, cfg, trace_path)
    except SchedulerError as err:
        raise BenchError(str(err)) from None
    print(format_serve_table(result))
    for p in write_serve_outputs(result, json_path) if json_path else ():
        print(f"wrote {p}")
    return result
