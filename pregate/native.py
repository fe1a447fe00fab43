"""A native MoE MLP for decode steps (`--native`): a layer's shared and routed experts in one call.

A bfloat16 decode step spends most of its MLP time outside the bytes it reads: each MoE layer makes
about fourteen torch calls (two products per expert, slicing, the activation, the product with up,
the sums), and oneDNN's small products run well below the memory's rate (`pregate bench step`'s
per-shape table). `pregate/native/moe_mlp.c` does a layer's whole MLP in one OpenMP region, reading
the weights once in their plain layouts, for steps of at most `NATIVE_ROWS` rows; longer steps
(prefill chunks) take the torch path on the same plain weights.

Contract (tests): a row's result does not depend on the other rows of the step or on the thread count,
so batched serving equals one-by-one serving exactly while steps stay within `NATIVE_ROWS`; against the
torch path it is the same arithmetic in another summation order (float32 accumulation, bfloat16
rounding after every op, as eager torch rounds), so it agrees within bfloat16 rounding, not bit for bit.
A step of more rows runs the torch path, so a prompt's prefill and the decode rows of a step that also
carries a prefill chunk are computed by torch: the exactness above is conditional in the way that
`quantize.DEQUANT_ROWS` makes int8's.

The C file is compiled on first use with the system's C compiler (`cc`, or `$CC`) into
`~/.cache/pregate/native` (`$PREGATE_CACHE_DIR`), once per version of the source; x86-64 with AVX2 and
FMA only. It links the OpenMP runtime that torch has already loaded, so both share one thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pregate.errors import PregateError
from pregate.moe import MoEForCausalLM, MoEMLP, RoutingPlan

SOURCE = Path(__file__).parent / "native" / "moe_mlp.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
# Up to this many rows a step's MLP runs natively. Its products read each weight once for all rows but
# are not blocked like a GEMM, so a prefill chunk is faster through oneDNN (`bench step` measures both).
NATIVE_ROWS = 8

_library: ctypes.CDLL | None = None


def unavailable_reason() -> str | None:
    """Why the native MLP cannot run on this machine, or None if it can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the native MLP needs x86-64 Linux (this is {platform.system()} {platform.machine()})"
    try:
        flags = next(
            (
                line.split()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
            ),
            [],
        )
    except OSError as e:
        return f"cannot read /proc/cpuinfo: {e}"
    if "avx2" not in flags or "fma" not in flags:
        return "the native MLP needs a CPU with AVX2 and FMA"
    if _compiler() is None:
        return "the native MLP needs a C compiler (cc, gcc, or $CC)"
    return None


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    root = os.environ.get("PREGATE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "pregate" / "native"


def library() -> ctypes.CDLL:
    """The compiled kernel (built on first use, then loaded from the cache). Raises PregateError."""
    global _library
    if _library is not None:
        return _library
    reason = unavailable_reason()
    if reason is not None:
        raise PregateError(reason)
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    path = _cache_dir() / f"moe_mlp-{tag}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            cmd = [_compiler(), *FLAGS, str(SOURCE), "-o", str(built), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise PregateError(f"building the native MLP failed ({' '.join(cmd)}):\n{done.stderr}")
            os.replace(built, path)  # atomic: a concurrent build leaves one complete file
    lib = ctypes.CDLL(str(path))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    i64 = ctypes.c_long
    lib.pg_moe_mlp.argtypes = [ptr, ptr, ptr, i32, i32, ptr, ptr, i32, ptr, i64, ptr, i64, ptr, i32]
    lib.pg_moe_mlp.argtypes += [ptr, ptr, ptr, ptr, ptr]
    lib.pg_moe_mlp.restype = i32
    _library = lib
    return lib


def _ints(values) -> ctypes.Array:
    return (ctypes.c_int * max(len(values), 1))(*values)


class _PlanArgs:
    """A routing plan's assignments as the kernel takes them. Pre-gating routes a step once for all its
    layers, so they are made once per plan (`for_plan` keeps the last one) instead of once per layer."""

    _last: tuple[RoutingPlan | None, _PlanArgs | None] = (None, None)

    def __init__(self, plan: RoutingPlan | None):
        groups = plan.groups if plan is not None else []
        self.groups = len(groups)
        self.experts = _ints([e for e, _, _ in groups])
        self.starts = _ints([start for _, start, _ in groups])
        self.counts = _ints([end - start for _, start, end in groups])
        self.rows_of = _ints(plan.order.tolist()) if groups else None
        self.weights = None  # bfloat16 [T*K] in `order`; None: every weight is 1 (Read-ME's top-1)
        if groups and not plan.unit_weights:
            self.weights = plan.weights.to(torch.bfloat16).contiguous()

    @classmethod
    def for_plan(cls, plan: RoutingPlan | None) -> _PlanArgs:
        last, args = cls._last
        if args is None or last is not plan:
            args = cls(plan)
            cls._last = (plan, args)
        return args


class NativeMLP:
    """One MoEMLP as the kernel reads it: `run(x, plan, residual)` -> residual + mlp(x). It reads the
    module's own plain parameters (nothing copied), through pointers taken at each call."""

    def __init__(self, mlp: MoEMLP):
        self.mlp = mlp
        self.widths = _ints(mlp.widths)
        self.routed = mlp.num_experts > 0 and any(mlp.widths)

    def takes(self, x: torch.Tensor) -> bool:
        """Whether this step's rows go the native way (a decode step in inference, bfloat16)."""
        w = self.mlp.gate_up_proj.weight
        return (
            x.shape[0] <= NATIVE_ROWS and x.dtype == w.dtype == torch.bfloat16 and not torch.is_grad_enabled()
        )

    def run(self, x: torch.Tensor, plan: RoutingPlan | None, residual: torch.Tensor | None) -> torch.Tensor:
        mlp = self.mlp
        x = x.contiguous()
        if residual is not None:
            residual = residual.contiguous()
        out = torch.empty_like(x)
        args = _PlanArgs.for_plan(plan if self.routed else None)
        gate_up, down_t = mlp.w_gate_up, mlp.w_down_t
        status = library().pg_moe_mlp(
            x.data_ptr(),
            None if residual is None else residual.data_ptr(),
            out.data_ptr(),
            x.shape[0],
            x.shape[1],
            mlp.gate_up_proj.weight.data_ptr(),
            mlp.down_proj.weight.data_ptr(),
            mlp.shared,
            gate_up.data_ptr(),
            gate_up.stride(0),
            down_t.data_ptr(),
            down_t.stride(0),
            self.widths,
            args.groups,
            args.experts,
            args.starts,
            args.counts,
            args.rows_of,
            None if args.weights is None else args.weights.data_ptr(),
        )
        if status != 0:
            raise MemoryError("the native MLP could not allocate its scratch memory")
        return out


def can_run_native(model: MoEForCausalLM) -> str | None:
    """Why `model` cannot take the native MLP, or None if it can."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    w = model.norm.weight
    if w.dtype != torch.bfloat16 or w.device.type != "cpu":
        return f"the native MLP runs bfloat16 models on CPU (this one: {w.dtype} on {w.device.type})"
    if model.quantized:
        return "the native MLP reads bfloat16 weights (this model is quantized)"
    if any(not isinstance(m.mlp.gate_up_proj, nn.Linear) or m.mlp.inference_experts for m in model.layers):
        return "the native MLP reads plain weights (this model's MLPs are packed)"
    if model.layers[0].mlp.act is not F.silu:
        return "the native MLP implements SiLU only"
    if any(m.mlp.num_experts and m.mlp.w_gate_up.shape[1] == 0 for m in model.layers):
        return "the native MLP needs the routed experts resident (these were released to an expert store)"
    if model.config.base["hidden_size"] % 8:
        return "the native MLP needs a hidden size that is a multiple of 8"
    return None


@torch.no_grad()
def attach_native(model: MoEForCausalLM) -> MoEForCausalLM:
    """Give each layer's MLP its native path (in place; the weights stay plain). Raises PregateError when
    `can_run_native` refuses. The routed experts must be resident (no expert store)."""
    reason = can_run_native(model)
    if reason is not None:
        raise PregateError(reason)
    library()  # build now, not in the first request
    for layer in model.layers:
        mlp = layer.mlp
        for p in (mlp.gate_up_proj.weight, mlp.down_proj.weight, mlp.w_gate_up, mlp.w_down_t):
            p.data = p.data.contiguous()  # the kernel walks the memory itself
        mlp.native = NativeMLP(mlp)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
