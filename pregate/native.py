"""Native decode layers (`--native`): every decoder layer of a decode step's rows in one native call.

A bfloat16 decode step on CPU spends most of its time outside the bytes it reads: each MoE layer makes
about fifty torch calls (norms, q|k|v, RoPE, the cache writes, attention, o, two products per expert,
slicing, the activation, the sums), and oneDNN's small products run well below the memory's rate
(`pregate bench step`'s per-shape table). `pregate/native/` holds the kernels in C with AVX2, and their
bfloat16 and int8 products on AVX512-BF16's pair dot products where the CPU has them (`pair_dots`):
`attention.c` (RMSNorm, q|k|v, RoPE, the new keys and values into the KV cache, attention, o and the
residual), `moe_mlp.c` (RMSNorm, the shared and routed experts, the activation, their sums and the
residual), each one OpenMP region over the plain weights, and `decoder.c`, which runs both for every
layer in one call (`NativeDecoder.run`; each layer's weights described once in a struct, `native.h`).
A step of at most `WHOLE_ROWS` tokens in one KV cache (the engine's pool) runs wholly this way, prompt
chunks included (a chunk's tokens are rows at consecutive positions of one slot). In a larger step its
decode rows (one token each) run this way and its prompt chunks beside them through torch, on the same
plain weights (`NativeStep` splits and merges the rows). The native rows go in calls of at most
`NATIVE_ROWS` rows (`PAIR_ROWS` on the pair dot products), one after another. The router's decode
step has its kernel too (`router.c`, pregate.native_router), and the LM head where it is int8, or plain
bfloat16 (not packed: a CPU whose oneDNN cannot pack bfloat16, pregate.packed) (`linear.c`,
`NativeHead`); the expert store's CPU loads transpose with `transpose.c`. `attach_native` tiles the
bfloat16 decoder weights and LM head (a tied one with its embedding) in place (pregate.native_layout)
where every step runs natively (`default_tiles`), or as `tiles` (`--native-tiles`, `--no-native-tiles`)
says: faster steps of one to four tokens, even ones of more.

Contract (tests): a native row's result depends on its own token, position and cache slot only, not on
the other rows of its step or the thread count, and a prompt chunk's rows give the bits of feeding its
tokens one at a time. So batched serving equals one-by-one serving exactly whenever every row runs
natively, which a token budget of at most `WHOLE_ROWS` guarantees (in int8 when a step also has at most
`HEAD_ROWS` token-producing rows, `PAIR_HEAD_ROWS` on the pair dot products: the int8 head's limit).
Against the torch path it is the same arithmetic in another summation order (float32 sums, bfloat16
rounding after every op as eager torch rounds, attention in float32), so it agrees within rounding, not
bit for bit: a cached decode matches a full recompute (all prompt rows, through torch) within rounding,
as int8's does across `quantize.DEQUANT_ROWS`.

The C files are compiled on first use with the system's C compiler (`cc`, or `$CC`) into
`~/.cache/pregate/native` (`$PREGATE_CACHE_DIR`), once per version of the sources (the build of a
version nothing has loaded for `STALE_DAYS` is deleted when another is loaded); x86-64 with AVX2 and
FMA only, with AVX512-BF16's flags added where the CPU has it ($PREGATE_NATIVE_ISA=avx2: not). The
library links the OpenMP runtime that torch has already loaded, so both share one thread
pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pregate.errors import PregateError, check_expert_ids
from pregate.moe import AttentionPlan, MoEForCausalLM, MoEMLP, Routing, RoutingPlan, expert_groups
from pregate.native_layout import TiledEmbedding, Tiling, gate_up_order
from pregate.quantize import Int8Experts, Int8Linear, padded

SOURCES = Path(__file__).parent / "native"
# -ffp-contract=off: no fused multiply-add where torch rounds a product before adding (RoPE)
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
# Where the CPU has AVX512-BF16, bfloat16 and int8 weights meet their inputs in its pair dot products
# (native.h's PAIR_DOTS): 32 products an instruction, no conversion of bfloat16 weights; a fifth to a
# quarter off the steps that are bound by arithmetic (docs/serving.md), nothing off those bound by
# reading the weights.
PAIR_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
PAIR_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
# "avx2" keeps the AVX2 products on a CPU that has AVX512-BF16 (to compare or test them); read whenever
# the default is asked for (pair_dots).
ISA_ENV = "PREGATE_NATIVE_ISA"
# Rows per native call: the products read each weight once for all of a call's rows but are not
# blocked like a GEMM (the dot tiles of native.h are at most 8 wide), so more rows go in more calls.
NATIVE_ROWS = 8
# ... and where the pair dot products run bfloat16 weights: a tile of 8 weight rows then serves 16 rows
# from L1 (their bfloat16 copies are half the float32 inputs AVX2 reads), so a step of 16 decode rows
# reads its weights once. A side-by-side script outside the repository found steps of 12-32 decode rows
# faster in calls of 16 than of 8, and calls of 32 no faster than 16 (docs/serving.md).
PAIR_ROWS = 16
# A step of at most this many tokens in one cache runs wholly natively, prompt chunks included. Torch on
# the plain weights --native keeps (not packed) was the slower one at every chunk up to this size in a
# side-by-side run; past it a chunk goes to torch, whose GEMM gains on longer chunks.
WHOLE_ROWS = 128


def whole_rows(quantized: bool) -> int | None:
    """The most tokens a step may hold to run wholly natively, None for any. WHOLE_ROWS comes from a
    CPU where oneDNN packs bfloat16 (pregate.packed.cpu_packs_bfloat16), which is where it has fast
    bfloat16 kernels; on one where it cannot (AVX2 alone), its bfloat16 product on the plain weights
    was the slower one at every row count, 1 to 256, that a side-by-side script outside the repository
    tried on one MLP-sized matrix, so there every bfloat16 step runs natively. int8 keeps the limit:
    torch's int8 kernel is another kernel."""
    from pregate.packed import cpu_packs_bfloat16

    return WHOLE_ROWS if quantized or cpu_packs_bfloat16() else None


# Rows up to which an int8 LM head runs natively (NativeHead): past them torch's int8 kernel is faster.
HEAD_ROWS = 8
# ... on the pair dot products: a side-by-side script outside the repository found the native int8 head
# at about half the time of torch's int8 kernel at every row count from 1 to 32 (both grow linearly;
# docs/serving.md); larger steps were not measured and keep torch's kernel.
PAIR_HEAD_ROWS = 32

STALE_DAYS = 30  # a build of other sources unused this long is deleted when one is loaded
_libraries: dict[bool, ctypes.CDLL] = {}  # by whether the pair dot products run


def _cpu_flags() -> list[str]:
    """The CPU's feature flags (/proc/cpuinfo). Raises OSError."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next((line.split() for line in lines if line.startswith("flags")), [])


def unavailable_reason() -> str | None:
    """Why the native decode layers cannot run on this machine, or None if they can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"--native needs x86-64 Linux (this is {platform.system()} {platform.machine()})"
    try:
        flags = _cpu_flags()
    except OSError as e:
        return f"cannot read /proc/cpuinfo: {e}"
    if "avx2" not in flags or "fma" not in flags:
        return "--native needs a CPU with AVX2 and FMA"
    if _compiler() is None:
        return "--native needs a C compiler (cc, gcc, or $CC)"
    return None


@functools.cache
def cpu_pair_dots() -> bool:
    """Whether this CPU has AVX512-BF16's pair dot products (and the AVX-512 they need)."""
    try:
        return all(f in _cpu_flags() for f in PAIR_CPU_FLAGS)
    except OSError:
        return False


def pair_dots() -> bool:
    """Whether the bfloat16 and int8 products run on AVX512-BF16's pair dot products by default here (the
    CPU has them, and $PREGATE_NATIVE_ISA is not "avx2"), rather than on AVX2's (float32 ones always
    do). The two sum in other orders, so their bits differ within rounding; each keeps the kernels'
    contract on its own."""
    isa = os.environ.get(ISA_ENV, "auto")
    if isa not in ("auto", "avx2"):
        raise PregateError(f"${ISA_ENV} must be auto or avx2, not {isa!r}")
    return isa == "auto" and cpu_pair_dots()


def products() -> str:
    """What the native kernels' bfloat16 and int8 products run on here by default, in words."""
    return "AVX512-BF16's pair dot products" if pair_dots() else "AVX2"


def weights_reason(weight: torch.Tensor, dtype: torch.dtype, what: str) -> str | None:
    """Why the native kernels cannot run on weights like `weight` here (the machine first, then its dtype
    and device: `what` names what they run, e.g. "bfloat16 models"), or None if they can."""
    reason = unavailable_reason()
    if reason is None and (weight.dtype != dtype or weight.device.type != "cpu"):
        reason = f"--native runs {what} on CPU (this one: {weight.dtype} on {weight.device.type})"
    return reason


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    root = os.environ.get("PREGATE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "pregate" / "native"


def _mark_used_and_prune(path: Path) -> None:
    """Mark the build at `path` as used now, and delete the builds of other source versions that nothing
    has loaded for STALE_DAYS (each version leaves one behind). Best effort: the cache may be read-only."""
    now = time.time()
    try:
        os.utime(path)
        for old in path.parent.glob("pregate-native-*.so"):
            if old != path and now - old.stat().st_mtime > STALE_DAYS * 86400:
                old.unlink(missing_ok=True)
    except OSError:
        pass


def _build(files: list[Path], path: Path, flags: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        sources = [str(f) for f in files if f.suffix == ".c"]
        cmd = [_compiler(), *flags, *sources, "-o", str(built), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            hint = f"; {ISA_ENV}=avx2 builds without AVX512-BF16" if flags != FLAGS else ""
            raise PregateError(f"building the native kernels failed ({' '.join(cmd)}{hint}):\n{done.stderr}")
        os.replace(built, path)  # atomic: a concurrent build leaves one complete file


def library(pairs: bool | None = None) -> ctypes.CDLL:
    """The compiled kernels (built on first use, then loaded from the cache), with AVX512-BF16's pair
    dot products for bfloat16 and int8 weights or AVX2's (`pairs`; None: pair_dots(), what this
    machine runs by default). Raises PregateError."""
    pairs = pair_dots() if pairs is None else pairs
    if pairs in _libraries:
        return _libraries[pairs]
    reason = unavailable_reason()
    if reason is None and pairs and not cpu_pair_dots():
        reason = f"AVX512-BF16's pair dot products need a CPU with {', '.join(PAIR_CPU_FLAGS)}"
    if reason is not None:
        raise PregateError(reason)
    files, flags = sorted(SOURCES.glob("*.[ch]")), FLAGS + (PAIR_FLAGS if pairs else [])
    tag = hashlib.sha256(b"".join(f.read_bytes() for f in files) + " ".join(flags).encode()).hexdigest()[:16]
    path = _cache_dir() / f"pregate-native-{tag}.so"
    if not path.exists():
        try:
            _build(files, path, flags)
        except OSError as err:
            raise PregateError(
                f"cannot build the native kernels into {path.parent} ({err}); set PREGATE_CACHE_DIR to a "
                "writable directory"
            ) from None
    _mark_used_and_prune(path)
    lib = ctypes.CDLL(str(path))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    i64 = ctypes.c_long
    f32 = ctypes.c_float
    lib.pg_moe_mlp.argtypes = [ptr, ptr, ptr, i32, i32, ptr, i32, ptr]
    lib.pg_moe_mlp.restype = i32
    lib.pg_decode.argtypes = [ptr, ptr, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, i32, ptr, ptr, ptr]
    lib.pg_decode.restype = i32
    lib.pg_router_step.argtypes = [i32, i32, i32, i32, i32, f32, i32, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr]
    lib.pg_router_step.argtypes += [ptr, ptr, ptr, ptr, ptr, ptr]
    lib.pg_router_step.restype = i32
    lib.pg_linear.argtypes = [ptr, ptr, i32, i32, i32, i32, ptr, ptr, i64, i32]
    lib.pg_linear.restype = i32
    lib.pg_transpose16.argtypes = [ptr, ptr, i64, i64]
    lib.pg_transpose16.restype = None
    _libraries[pairs] = lib
    return lib


def _ints(values) -> ctypes.Array:
    return (ctypes.c_int * max(len(values), 1))(*values)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _address(array: ctypes.Array | None) -> int | None:
    return None if array is None else ctypes.addressof(array)


_PTR, _INT, _LONG = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


class _AttentionWeights(ctypes.Structure):
    """native.h's attention_weights."""

    _fields_ = [("norm_w", _PTR), ("eps", ctypes.c_float), ("int8", _INT), ("w_qkv", _PTR)]
    _fields_ += [("qkv_scale", _PTR), ("b_qkv", _PTR), ("N", _INT), ("G", _INT), ("D", _INT)]
    _fields_ += [("w_o", _PTR), ("o_scale", _PTR), ("blocked", _INT)]


class _MLPWeights(ctypes.Structure):
    """native.h's mlp_weights."""

    _fields_ = [("norm_w", _PTR), ("eps", ctypes.c_float), ("int8", _INT), ("routed", _INT)]
    _fields_ += [(name, _PTR) for name in ("s_gu", "s_down", "s_gu_scale", "s_down_scale")]
    _fields_ += [("S", _INT), ("s_up", _INT)]
    _fields_ += [(name, _PTR) for name in ("gu", "dn", "gu_scale", "dn_scale")]
    _fields_ += [
        (name, _LONG) for name in ("gu_step", "gu_scale_step", "dn_step", "dn_scale_step", "dn_stride")
    ]
    _fields_ += [("widths", _PTR), ("ups", _PTR), ("blocked", _INT)]


class _RoutingPlan(ctypes.Structure):
    """native.h's routing_plan."""

    _fields_ = [("groups", _INT)] + [(name, _PTR) for name in ("experts", "starts", "counts", "rows_of")]
    _fields_ += [("weights", _PTR)]


class Held:
    """The tensors (and ctypes arrays) a native struct points into, kept alive as long as it is:
    `ptr(t)` -> the address of t's data (None -> NULL). A struct is built once, so the kernels read the
    weights as they were when it was built, like a packed copy."""

    def __init__(self):
        self.objects: list = []

    def ptr(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        if not t.is_contiguous():  # the kernels walk the memory themselves
            raise PregateError(f"a native kernel would read a non-contiguous tensor {tuple(t.shape)}")
        t = t.detach()  # its own reference to the storage, even if a parameter's .data is replaced
        self.objects.append(t)
        return t.data_ptr()

    def array(self, values: list[int]) -> int:
        arr = _ints(values)
        self.objects.append(arr)
        return ctypes.addressof(arr)


def host_routing(routing: Routing) -> tuple[list[list[int]], list[list[float]]]:
    """A routing's expert ids and weights as host lists, one list of k per row: what PlanArgs and the
    call order (`by_expert`) read, taken from the tensors once per step."""
    k = routing.expert_ids.shape[-1] if routing.expert_ids.dim() > 1 else 1
    return routing.expert_ids.reshape(-1, k).tolist(), routing.weights.reshape(-1, k).tolist()


class PlanArgs:
    """A step's routing as the MLP kernel takes it: assignments grouped by expert (`expert_groups`, the
    rule RoutingPlan follows), built from host lists in Python, since a decode step has only a few rows
    (RoutingPlan's torch calls took longer than the grouping itself). Pre-gating routes a step once for
    all its layers, so a NativeStep makes this once for all of them. rows: the routing's rows to take
    (None: all); lists: `host_routing(routing)` when the caller has it already."""

    def __init__(
        self,
        routing: Routing | None,
        rows: list[int] | None = None,
        num_experts: int = 0,
        lists: tuple[list[list[int]], list[list[float]]] | None = None,
    ):
        ids, weights, k = [], [], 1
        if routing is not None and num_experts:
            all_ids, all_weights = lists or host_routing(routing)
            k = len(all_ids[0]) if all_ids else 1
            for r in range(len(all_ids)) if rows is None else rows:
                ids += all_ids[r]
                weights += all_weights[r]
        counts = [0] * num_experts
        if ids:
            check_expert_ids(min(ids), max(ids), num_experts)
            for e in ids:
                counts[e] += 1
        order = sorted(range(len(ids)), key=ids.__getitem__)  # stable, as expert_groups wants
        groups = expert_groups(counts)
        self.groups = len(groups)
        self.experts = _ints([e for e, _, _ in groups])
        self.starts = _ints([start for _, start, _ in groups])
        self.counts = _ints([end - start for _, start, end in groups])
        self.rows_of = _ints([a // k for a in order]) if groups else None
        self.weights = None  # bfloat16 [T*K] in `order`; None: every weight is 1 (Read-ME's top-1)
        if groups and any(w != 1 for w in weights):
            self.weights = torch.tensor([weights[a] for a in order]).to(torch.bfloat16)
        arrays = (self.experts, self.starts, self.counts, self.rows_of)
        self.struct = _RoutingPlan(self.groups, *map(_address, arrays), _ptr(self.weights))


def _linear(linear, held: Held) -> tuple[int, int | None]:
    """(weights, scales or None) of a plain or Int8Linear layer."""
    if isinstance(linear, Int8Linear):
        return held.ptr(linear.qweight), held.ptr(linear.scales)
    return held.ptr(linear.weight), None


class NativeMLP:
    """One MoEMLP as the kernel reads it (`native.h`'s mlp_weights, built once over the module's own
    weights, nothing copied), with the post-attention norm before it. `NativeDecoder` hands `weights` to
    the kernel from C; `run(x, args, residual, norm)` -> residual + mlp(x), or mlp(norm(x)) with norm
    set, calls it for one layer (the tests check the MLP alone), in bfloat16 or pregate.quantize's int8
    layouts."""

    def __init__(self, mlp: MoEMLP, norm, lib: ctypes.CDLL | None = None):
        held = self.held = Held()
        int8 = isinstance(mlp.gate_up_proj, Int8Linear)
        w = self.weights = _MLPWeights(norm_w=held.ptr(norm.weight), eps=norm.eps, int8=int8)
        w.s_gu, w.s_gu_scale = _linear(mlp.gate_up_proj, held)
        w.s_down, w.s_down_scale = _linear(mlp.down_proj, held)
        w.S = w.s_up = mlp.shared  # int8: padded like the experts, the up rows from there
        w.routed = mlp.num_experts > 0 and any(mlp.widths)
        if int8 and w.routed:
            experts = mlp.inference_experts
            gate_up, down = experts.gate_up, experts.down  # down [E, H, Rp], along rows
            w.gu_scale, w.dn_scale = held.ptr(experts.gate_up_scales), held.ptr(experts.down_scales)
            w.gu_scale_step, w.dn_scale_step = experts.gate_up_scales.stride(0), experts.down_scales.stride(0)
            widths = [padded(width) for width in mlp.widths]
        else:
            # w_down_t [E, R, H] is the transposed view of down [E, H, R] (attach_native stores it so)
            gate_up, down = mlp.w_gate_up, mlp.w_down_t.mT
            widths = list(mlp.widths)
        w.gu, w.gu_step = held.ptr(gate_up), gate_up.stride(0)
        w.dn, w.dn_step, w.dn_stride = held.ptr(down), down.stride(0), down.stride(1)
        w.widths = w.ups = held.array(widths)  # the kernel's width per expert, and where its up rows start
        self.kernel = (lib or library()).pg_moe_mlp

    def run(self, x: torch.Tensor, args: PlanArgs, residual: torch.Tensor | None, norm: bool = False):
        x = x.contiguous()
        if residual is not None:
            residual = residual.contiguous()
        out = torch.empty_like(x)
        status = self.kernel(
            x.data_ptr(),
            _ptr(residual),
            out.data_ptr(),
            x.shape[0],
            x.shape[1],
            ctypes.byref(self.weights),
            norm,
            ctypes.byref(args.struct),
        )
        if status != 0:
            raise MemoryError("the native MLP could not allocate its scratch memory")
        return out


def by_expert(lengths: list[int], experts: list[list[int]]) -> list[int]:
    """The order in which a step's native rows go through its calls: rows come in runs of `lengths`
    (one per sequence: one token, or a prompt chunk), experts[i] is row i's expert ids. The one-token
    rows first, grouped by expert (stable), then the chunks in their order, each chunk's rows in order.
    A call reads each of its experts' weights once for all its rows, so grouping lets a step of several
    calls read each expert in about one call instead of in every call; the rows of different sequences
    do not depend on each other, and each row's bits do not depend on its call (the contract above)."""
    runs, start = [], 0
    for n in lengths:
        runs.append(range(start, start + n))
        start += n
    single = sorted((r for r in runs if len(r) == 1), key=lambda r: experts[r[0]])
    return [i for r in single + [r for r in runs if len(r) > 1] for i in r]


class NativeCall:
    """One call of the native decoder: at most `call_rows` consecutive rows [start, end) of a step's
    native rows, each with its cache slot and position, and their routing."""

    def __init__(self, start: int, slots: list[int], pos: list[int], plan_args: PlanArgs):
        self.start, self.end = start, start + len(slots)
        self.slots, self.pos, self.plan_args = _ints(slots), _ints(pos), plan_args


class NativeStep:
    """How one step divides between the native decoder and torch. A step whose sequences all live in one
    KV cache and that holds at most WHOLE_ROWS tokens runs wholly natively, prompt chunks included: a
    chunk's token i is a row at position past + i, and the kernel writes every row's key and value before
    any row attends, so each row sees its chunk's earlier tokens (the causal mask) and the row's result
    is the one decoding that token alone would give. Otherwise its decode rows (one group of the KV pool)
    run natively and every other row (prompt chunks) through torch; `split` and `merge` move rows between
    the step's stream and the two parts. The native rows run as `calls` of at most `call_rows` rows (the
    decoder's: NATIVE_ROWS, or PAIR_ROWS), one after another, a chunk's rows in order, so a chunk cut
    between two calls sees its earlier tokens in the cache; a step of more than one call takes its
    one-token rows first, grouped by expert (`by_expert`), so that each call reads fewer experts."""

    def __init__(
        self, attention: AttentionPlan, routing: Routing | None, num_experts: int, whole: bool, call_rows: int
    ):
        self.rest_rows = self.rest_attention = self.rest_plan = None
        if whole:  # every row, in stream order
            segments = attention.segments
            self.cache = segments[0].cache
            slots = [s.slot for s in segments for _ in range(s.length)]
            pos = [p for s in segments for p in range(s.past, s.past + s.length)]
            self.rows = None
        else:
            group = attention.groups[0]
            self.cache = group.cache
            slots, pos = group.slots.tolist(), group.pos.tolist()  # per decode row, in the order of its rows
            # rows None: the decode rows are the whole stream in order (the steady state), nothing to gather
            self.rows = None if attention.only_direct else group.rows
            if attention.alone:  # prompt chunks beside the decode rows: planned on their own, through torch
                rest = [attention.segments[i] for i in attention.alone]
                starts = [attention.starts[i] for i in attention.alone]
                self.rest_rows = torch.cat([torch.arange(s, s + seg.length) for s, seg in zip(starts, rest)])
                self.rest_attention = AttentionPlan(rest, group.rows.device)
                self.rest_plan = self._plan(routing, self.rest_rows, num_experts)
        rows = list(range(len(slots))) if self.rows is None else self.rows.tolist()
        lists = host_routing(routing) if routing is not None and num_experts else None
        if len(rows) > call_rows and lists is not None:
            lengths = [seg.length for seg in attention.segments] if whole else [1] * len(rows)
            order = by_expert(lengths, [lists[0][r] for r in rows])
            if order != sorted(order):
                rows, slots, pos = ([v[i] for i in order] for v in (rows, slots, pos))
                self.rows = torch.tensor(rows)
        self.calls = []
        for a in range(0, len(rows), call_rows):
            b = a + call_rows
            plan_args = PlanArgs(routing, rows[a:b], num_experts, lists)
            self.calls.append(NativeCall(a, slots[a:b], pos[a:b], plan_args))

    @staticmethod
    def _plan(routing: Routing | None, rows: torch.Tensor | None, num_experts: int) -> RoutingPlan | None:
        if routing is None or not num_experts:
            return None
        if rows is not None:
            routing = Routing(routing.expert_ids[rows], routing.weights[rows])
        return RoutingPlan(routing, num_experts)

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows of a stream-aligned tensor -> (native rows, the rest or None)."""
        if self.rows is None:
            return t, None
        return t[self.rows], None if self.rest_rows is None else t[self.rest_rows]

    def merge(self, decoded: torch.Tensor, rest: torch.Tensor | None) -> torch.Tensor:
        if self.rows is None:
            return decoded
        total = len(self.rows) + (0 if self.rest_rows is None else len(self.rest_rows))
        out = decoded.new_empty(total, decoded.shape[1])
        out[self.rows] = decoded
        if rest is not None:
            out[self.rest_rows] = rest
        return out


class NativeHead(nn.Module):
    """An LM head whose products over a step's token-producing rows run as one native call,
    `native/linear.c`. Two cases: an int8 head, over at most `max_rows` rows (`HEAD_ROWS`: at one row
    torch's int8 kernel read this 49k-row matrix at about 0.6x the memory's rate, `bench step`'s int8
    breakdown; past HEAD_ROWS it is the faster one; `PAIR_HEAD_ROWS` on the pair dot products); and a
    plain bfloat16 head over any rows, what a CPU whose oneDNN cannot pack bfloat16 serves
    (pregate.packed), where torch's product on the plain weights takes far longer at every row count
    (docs/serving.md). Other calls, and any with a gradient, go to the wrapped layer (`inner`); a tied
    head wraps the embedding's own table, nothing copied. `pairs`: its kernel (library)."""

    def __init__(self, head: nn.Linear | Int8Linear, pairs: bool):
        super().__init__()
        self.inner = head
        self.int8 = isinstance(head, Int8Linear)
        self.kernel = library(pairs).pg_linear
        self.max_rows = None if not self.int8 else PAIR_HEAD_ROWS if pairs else HEAD_ROWS  # None: any
        self.blocked = 0  # 1: its weight tiled (pregate.native_layout; a bfloat16 head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.inner
        many = self.max_rows is not None and x.shape[0] > self.max_rows
        if x.dim() != 2 or x.dtype != torch.bfloat16 or many or torch.is_grad_enabled():
            return head(x)
        x = x.contiguous()
        y = x.new_empty(x.shape[0], head.out_features)
        weight = head.qweight if self.int8 else head.weight
        status = self.kernel(
            x.data_ptr(),
            y.data_ptr(),
            x.shape[0],
            head.in_features,
            head.out_features,
            self.int8,
            weight.data_ptr(),
            head.scales.data_ptr() if self.int8 else None,
            weight.stride(0),
            self.blocked,
        )
        if status != 0:
            raise MemoryError("the native LM head could not allocate its scratch memory")
        return y if head.bias is None else y + head.bias


class NativeDecoder:
    """Every decoder layer of a step's native rows (NativeStep) as one native call (`native/decoder.c`:
    attention, then the MLP, layer after layer): `step(attention, routing, h)` -> a NativeStep, or None
    for a step that runs wholly through torch; `run(h, cos, sin, step)` -> the rows leaving the last
    layer."""

    def __init__(self, model: MoEForCausalLM, pairs: bool, tiles: bool = False):
        lib = library(pairs)
        self.num_experts = model.num_experts
        self.whole_rows = whole_rows(bool(model.quantized))
        # int8 keeps calls of 8: on its pair products a side-by-side script found calls of 16 no faster
        self.call_rows = PAIR_ROWS if pairs and not model.quantized else NATIVE_ROWS
        self.layers = [_NativeLayer(layer, lib) for layer in model.layers]
        n = len(self.layers)
        self.attention = (_AttentionWeights * n)(*[layer.weights for layer in self.layers])
        self.mlps = (_MLPWeights * n)(*[layer.mlp.weights for layer in self.layers])
        self.kernel = lib.pg_decode
        self.tiling = self._tiling(model) if tiles else None

    def _tiling(self, model: MoEForCausalLM) -> Tiling | None:
        """The bfloat16 decoder weights tiled (pregate.native_layout); None where one cannot be tiled in
        place (the kernels then read rows)."""
        tiling = Tiling()
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            tiling.add(attn.qkv_proj, "weight")
            tiling.add(attn.o_proj, "weight")
            tiling.add(mlp.gate_up_proj, "weight", order=gate_up_order(mlp.shared, mlp.shared))
            tiling.add(mlp.down_proj, "weight")
            if self.layers[i].mlp.weights.routed:
                for e, width in enumerate(mlp.widths):  # gate|up rows [0, 2W), down [H, W] of [H, R]
                    tiling.add(mlp, "w_gate_up", lambda t, e=e: t[e], gate_up_order(width, width))
                    tiling.add(mlp, "w_down_t", lambda t, e=e: t.mT[e], cols=width)
            # what the kernels read: the decoder's arrays, and the MLP's own struct (NativeMLP.run)
            tiling.flags += [self.attention[i], self.mlps[i], self.layers[i].mlp.weights]
        if not tiling.fits():
            return None
        tiling.tile()
        # torch reads rows: a forward of any module that holds them, or of a layer's attention or MLP, or
        # a state_dict, puts them back first
        modules = [owner for owner, *_ in tiling.matrices]
        modules += [m for layer in model.layers for m in (layer.self_attn, layer.mlp)]
        for module in {id(m): m for m in modules}.values():
            tiling.hook(module)
        return tiling

    def step(self, attention: AttentionPlan, routing: Routing | None, h: torch.Tensor) -> NativeStep | None:
        if torch.is_grad_enabled() or h.dtype != torch.bfloat16:
            return None
        caches = {id(s.cache) for s in attention.segments}
        small = self.whole_rows is None or h.shape[0] <= self.whole_rows
        if small and len(caches) == 1 and attention.segments[0].cache is not None:
            return NativeStep(attention, routing, self.num_experts, True, self.call_rows)
        if len(attention.groups) != 1:
            return None
        return NativeStep(attention, routing, self.num_experts, False, self.call_rows)

    def run(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: NativeStep) -> torch.Tensor:
        h, cos, sin = h.contiguous(), cos.contiguous(), sin.contiguous()
        out = torch.empty_like(h)
        n, cache = len(self.layers), step.cache
        k_cache = (ctypes.c_void_p * n)(*[k.data_ptr() for k in cache.k])
        v_cache = (ctypes.c_void_p * n)(*[v.data_ptr() for v in cache.v])
        for call in step.calls:  # in order: a later call's rows may attend to an earlier call's keys
            a, b = call.start, call.end
            status = self.kernel(
                h[a:b].data_ptr(),
                out[a:b].data_ptr(),
                b - a,
                h.shape[1],
                n,
                self.attention,
                self.mlps,
                cos[a:b].data_ptr(),
                sin[a:b].data_ptr(),
                k_cache,
                v_cache,
                cache.capacity,
                call.slots,
                call.pos,
                ctypes.byref(call.plan_args.struct),
            )
            if status != 0:
                raise MemoryError("the native decoder could not allocate its scratch memory")
        return out


class _NativeLayer:
    """One decoder layer as the kernels read it: its attention (`native.h`'s attention_weights, built
    once; a call then looks nothing up through the modules) and its NativeMLP."""

    def __init__(self, layer, lib: ctypes.CDLL):
        attn, held = layer.self_attn, Held()
        self.held = held
        w = self.weights = _AttentionWeights(
            norm_w=held.ptr(layer.input_layernorm.weight),
            eps=layer.input_layernorm.eps,
            int8=isinstance(attn.qkv_proj, Int8Linear),
            b_qkv=held.ptr(attn.qkv_proj.bias),
            N=attn.n_heads,
            G=attn.n_kv,
            D=attn.head_dim,
        )
        w.w_qkv, w.qkv_scale = _linear(attn.qkv_proj, held)
        w.w_o, w.o_scale = _linear(attn.o_proj, held)
        self.mlp = NativeMLP(layer.mlp, layer.post_attention_layernorm, lib)


def can_run_native(model: MoEForCausalLM) -> str | None:
    """Why `model` cannot take the native decode layers (`--native`), or None if it can."""
    reason = weights_reason(model.norm.weight, torch.bfloat16, "bfloat16 models")
    if reason is not None:
        return reason
    int8 = model.quantized == "int8"
    if model.quantized and not int8:
        return f"--native reads bfloat16 or int8 weights (this model is {model.quantized})"
    kind = Int8Linear if int8 else nn.Linear
    for m in model.layers:
        attn, mlp = m.self_attn, m.mlp
        if not all(
            isinstance(t, kind) for t in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        ):
            return "--native reads plain bfloat16 or int8 weights (this model's decoder layers are packed)"
        if mlp.num_experts and any(mlp.widths):
            if int8:
                resident = isinstance(mlp.inference_experts, Int8Experts)
            else:
                resident = mlp.inference_experts is None and mlp.w_gate_up.shape[1] > 0
            if not resident:
                return "--native needs every routed expert resident (not --resident-experts)"
    if model.layers[0].mlp.act is not F.silu:
        return "--native implements SiLU only"
    if model.config.base["hidden_size"] % (32 if int8 else 8):
        return f"--native needs a hidden size that is a multiple of {32 if int8 else 8}"
    if model.attention_dtype != torch.float32:
        return "--native needs the float32 KV cache of a CPU model"
    return None


def default_tiles(quantized: bool, pairs: bool) -> bool:
    """Whether the native path tiles its weights (pregate.native_layout) unless told: bfloat16 weights
    on AVX2's products where every step runs natively (whole_rows None: oneDNN cannot pack bfloat16), so
    torch never reads them. There tiles were faster for steps of one to four tokens and even for eight
    and sixteen (docs/serving.md); where some steps go through torch, the first would put the rows back."""
    return not quantized and not pairs and whole_rows(False) is None


@torch.no_grad()
def attach_native(
    model: MoEForCausalLM, pairs: bool | None = None, tiles: bool | None = None
) -> MoEForCausalLM:
    """Give a bfloat16 model with plain decoder layers, or one quantized to int8, its native decode path
    (in place; the weights stay as they are), its bfloat16 and int8 products on AVX512-BF16's pair dot
    products or AVX2's (`pairs`, library()). `tiles`: the bfloat16 decoder weights and LM head tiled in
    place (pregate.native_layout, `--native-tiles`; None: `default_tiles`). Raises
    PregateError when `can_run_native` refuses (the routed experts must be resident: no expert store), or
    tiles cannot run."""
    reason = can_run_native(model)
    if reason is not None:
        raise PregateError(reason)
    pairs = pair_dots() if pairs is None else pairs
    tiles = default_tiles(bool(model.quantized), pairs) if tiles is None else tiles
    if tiles and model.quantized:
        raise PregateError("--native-tiles tiles bfloat16 weights, not int8 ones")
    library(pairs)  # build now, not in the first request
    for layer in model.layers:
        mlp, attn = layer.mlp, layer.self_attn
        if not model.quantized:  # int8 buffers are made contiguous
            tensors = (mlp.gate_up_proj.weight, mlp.down_proj.weight, mlp.w_gate_up)
            for p in (*tensors, attn.qkv_proj.weight, attn.o_proj.weight):
                p.data = p.data.contiguous()  # the kernels walk the memory themselves
            # each routed down as rows [H, R], read along them like every other product (a transposed
            # [R, H] read column by column was the slowest product); torch reads the transposed view
            mlp.w_down_t.data = mlp.w_down_t.data.mT.contiguous().mT
    model.native = NativeDecoder(model, pairs, tiles)
    head = model.lm_head  # a packed bfloat16 head (pregate.packed) already reads near the memory's rate
    untied = head is not None
    if head is None:  # tied to the embedding, plain
        table = model.embed_tokens
        head = nn.Linear(table.embedding_dim, table.num_embeddings, bias=False, device="meta")
        head.weight = table.weight  # the same parameter: nothing allocated, nothing copied
    if (isinstance(head, Int8Linear) and head.scales.dtype == torch.bfloat16) or type(head) is nn.Linear:
        model.lm_head = NativeHead(head, pairs)
        tiling = model.native.tiling
        if tiling is not None and type(head) is nn.Linear and tiling.include(head, "weight", model.lm_head):
            if not untied:  # the table is the head's: lookups read the tiles
                model.embed_tokens = TiledEmbedding(model.embed_tokens, tiling)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
