"""Roofline parts of a step: the bytes it must read, how fast this machine reads, where its time goes.

`step_bytes`: the bytes one decode step of a pregate model must read at least, by part (shapes only).
`measure_bandwidth`: a plain read (`sum`) and torch's GEMV (`x @ W.T`) over buffers far above the caches.
`count_torch_calls`: the torch operator calls of one step (torch.profiler).
`Breakdown`: per-part time of each forward from perf_counter in module hooks (no profiler, CPU only:
there ops are synchronous, so a hook's clock reads when the module's work is done).
Used by `pregate bench step` (bench_step.py); no engine or scheduler here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from pregate.moe import MoEForCausalLM
from pregate.packed import PackedLinear
from pregate.quantize import int8_matmul, padded
from pregate.router import PreGatingRouter

PARTS = ("router", "attention", "shared", "routed", "native", "lm_head")

# ----------------------------------------------------------------------------------------- bytes and floors


def _nbytes(module: nn.Module | None) -> int:
    """Bytes of a module's weights: its parameters, or its buffers once quantized (int8 + scales)."""
    if module is None:
        return 0
    tensors = list(module.parameters())
    if getattr(module, "qweight", None) is not None or any(hasattr(m, "qweight") for m in module.modules()):
        tensors += [b for name, b in module.named_buffers() if not name.endswith("_index")]
    # prepacked weights (pregate.packed) are plain attributes, neither parameters nor buffers
    tensors += [m.packed for m in module.modules() if isinstance(getattr(m, "packed", None), torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def step_bytes(
    model: MoEForCausalLM,
    batch: int,
    experts: Sequence[int],
    context: float,
    router: PreGatingRouter | None = None,
) -> dict[str, float]:
    """Bytes a decode step of `batch` tokens must read at least, by part, and their "total".

    experts: the distinct routed experts of the step (pre-gating: the same in every layer); each is read
    at its true width (3 x width x H). context: keys/values per sequence the attention reads.
    """
    hidden = model.config.base["hidden_size"]
    head = model.lm_head if model.lm_head is not None else model.embed_tokens
    # bytes per weight: the embedding table's (int8 and its scales once quantized)
    elt = _nbytes(head) / (model.config.base["vocab_size"] * hidden)
    routed_elt = 1 if model.quantized else elt
    out = {
        "embed_rows": float(batch * hidden * elt),
        "attention": 0.0,
        "norms": float(_nbytes(model.norm)),
        "shared": 0.0,
        "routed": 0.0,
    }
    for layer in model.layers:
        mlp = layer.mlp
        out["attention"] += _nbytes(layer.self_attn)
        out["norms"] += _nbytes(layer.input_layernorm) + _nbytes(layer.post_attention_layernorm)
        out["shared"] += _nbytes(mlp.gate_up_proj) + _nbytes(mlp.down_proj)
        out["routed"] += sum(3 * mlp.widths[e] * hidden * routed_elt for e in experts)
    out["lm_head"] = float(_nbytes(head))
    out["router"] = 0.0
    if router is not None:
        inner = getattr(router, "inner", router)
        table = _nbytes(inner.embed)  # float, or int8 rows and their scales once quantized
        rows = inner.cfg.vocab_size - batch  # the table less the B rows the step looks up
        out["router"] = float(_nbytes(inner) - rows * table / inner.cfg.vocab_size)
    base = model.config.base
    kv_elt = torch.empty((), dtype=model.attention_dtype).element_size()
    per_token = 2 * base["num_key_value_heads"] * model.head_dim * kv_elt  # K and V of one layer
    out["kv"] = float(len(model.layers) * batch * per_token * context)
    out["total"] = sum(out.values())
    return out


def _median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def measure_bandwidth(
    dtype: torch.dtype,
    megabytes: int,
    shapes: Sequence[tuple[int, int]],
    reps: int = 5,
    int8: bool = False,
    packed: bool = False,
) -> dict:
    """Bytes/s of a plain read (`buf.sum()` over `megabytes`) and of torch's GEMV (x [1, in] @ W.T over
    as many [out, in] matrices as fill `megabytes`) for each shape; "gemv" is the rate over all shapes,
    "gemv_us_per_shape" the time of one product. int8: the GEMV is `pregate.quantize.int8_matmul`
    (torch's weight-only int8 kernel, activations in `dtype`), exactly what a `--quantize int8` model
    runs; packed: the prepacked product of `pregate.packed`, as a packed bfloat16 model runs it."""
    elt = torch.empty((), dtype=dtype).element_size()
    total = megabytes * 2**20
    buf = torch.ones(total // elt, dtype=dtype)
    buf.sum()
    read = buf.numel() * elt / _median_time(buf.sum, reps)
    del buf
    welt = 1 if int8 else elt
    per_shape, per_call, moved, spent = {}, {}, 0, 0.0
    for out_f, in_f in dict.fromkeys(shapes):
        count = max(1, total // (out_f * in_f * welt))
        x = torch.randn(1, in_f).to(dtype)
        if int8:
            in_f = padded(in_f)  # the kernel's alignment
            x = torch.randn(1, in_f).to(dtype)
            ws = torch.randint(-127, 128, (count, out_f, in_f), dtype=torch.int8)
            scales = torch.rand(out_f).to(dtype)

            def gemv(ws=ws, x=x, scales=scales) -> None:
                for w in ws:
                    int8_matmul(x, w, scales)  # as the model calls it (a float32 model crosses in bf16)
        else:
            ws = torch.empty(count, out_f, in_f, dtype=dtype).normal_(0, 0.02)
            if packed:
                layers = [PackedLinear(w, None) for w in ws]

                def gemv(layers=layers, x=x) -> None:
                    for layer in layers:
                        layer(x)
            else:

                def gemv(ws=ws, x=x) -> None:
                    for w in ws:
                        x @ w.T

        gemv()
        t = _median_time(gemv, reps)
        per_shape[f"{out_f}x{in_f}"] = ws.numel() * welt / t
        per_call[f"{out_f}x{in_f}"] = t / count * 1e6
        moved += ws.numel() * welt
        spent += t
        del ws, gemv
    return {
        "read": read,
        "gemv": moved / spent,
        "gemv_per_shape": per_shape,
        "gemv_us_per_shape": per_call,
        "buffer_bytes": total,
        "dtype": "int8 weights" if int8 else str(dtype).removeprefix("torch.") + " packed" * packed,
    }


# ----------------------------------------------------------------------------------------- breakdown


def count_torch_calls(fn: Callable[[], object]) -> int:
    """Top-level torch operator calls (aten ops not made by another aten op) during one call of fn: the
    fixed per-call cost of a step grows with this count, whatever the bytes it reads."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::")
        and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))
    )


class Breakdown:
    """Per-part time of every step, from perf_counter in module hooks (CPU ops are synchronous).

    attention: each layer's self_attn; shared: the shared expert (gate_up_proj in, down_proj out);
    routed: the rest of each MoE MLP; native: the native decoder's call (`--native`: every layer of the
    decode rows, which then pass none of the module hooks); lm_head: `lm_logits`; router: `router.step`
    and `step_tokens` (pre-gating; natively too), or the layer-wise gate through to its layer's MLP (its
    routing plan included). The rest of a step is step time - the parts.
    Attach with `with Breakdown(model, router) as bd:`; `take()` returns the parts since the last call.
    """

    def __init__(self, model: MoEForCausalLM, router=None) -> None:
        self.model, self.router = model, router
        self.acc = dict.fromkeys(PARTS, 0.0)
        self._handles: list = []
        self._wrapped: list[tuple[object, str]] = []
        self._t: dict[str, float] = {}
        self.gate_start: float | None = None  # set by a layer-wise gate's wrapper

    def __enter__(self) -> Breakdown:
        now = time.perf_counter
        t = self._t

        def mark(key):
            return lambda *args: t.__setitem__(key, now())

        def add_attention(*args):
            self.acc["attention"] += now() - t["attn"]

        def mlp_start(*args):
            t["mlp"], t["shared_dt"] = now(), 0.0
            if self.gate_start is not None:
                self.acc["router"] += t["mlp"] - self.gate_start
                self.gate_start = None

        def shared_end(*args):
            t["shared_dt"] = now() - t["shared"]
            self.acc["shared"] += t["shared_dt"]

        def mlp_end(*args):
            self.acc["routed"] += now() - t["mlp"] - t["shared_dt"]

        for layer in self.model.layers:
            h = self._handles
            h.append(layer.self_attn.register_forward_pre_hook(mark("attn")))
            h.append(layer.self_attn.register_forward_hook(add_attention))
            h.append(layer.mlp.register_forward_pre_hook(mlp_start))
            h.append(layer.mlp.gate_up_proj.register_forward_pre_hook(mark("shared")))
            h.append(layer.mlp.down_proj.register_forward_hook(shared_end))
            h.append(layer.mlp.register_forward_hook(mlp_end))
        self._wrap(self.model, "lm_logits", "lm_head")
        if self.model.native is not None:
            self._wrap(self.model.native, "run", "native")
        if self.router is not None:
            self._wrap(self.router, "step", "router")
            self._wrap(self.router, "step_tokens", "router")
        return self

    def _wrap(self, obj, name: str, part: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.acc[part] += time.perf_counter() - t

        setattr(obj, name, timed)  # an instance attribute shadows the method until __exit__
        self._wrapped.append((obj, name))

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for obj, name in self._wrapped:
            delattr(obj, name)
        self._handles, self._wrapped = [], []

    def take(self) -> dict[str, float]:
        out, self.acc = self.acc, dict.fromkeys(PARTS, 0.0)
        return out


def summarize_breakdown(steps: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Median ms of each part and of the step over (duration, parts) of the timed steps.

    rest = step - parts: scheduling, routing plan, sampling, detokenizing, and the hooks' own cost."""
    rows = [{**parts, "rest": dur - sum(parts.values()), "step": dur} for dur, parts in steps]
    return {k: statistics.median(r[k] for r in rows) * 1e3 for k in (*PARTS, "rest", "step")}
