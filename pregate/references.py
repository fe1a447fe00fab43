"""Reference-string files: the accesses the expert cache performs, in a plain text format that an
independent cache simulator (libCacheSim, for one) can replay.

Owns the file format (`TRACE_HEADER`, `write_references`, `read_references`, `ReferenceTrace`). What a
step references is defined by `pregate.eviction` (`step_references`, `unit_references`); which steps
run is the scheduler's (`pregate.sim.scheduled_steps` gives them for a routed trace). Imports only
`pregate.errors` and `pregate.eviction`; no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pregate.errors import PregateError
from pregate.eviction import UNITS, check_unit, step_references

TRACE_HEADER = "# pregate reference string v1"


class ReferenceTraceError(PregateError):
    """A missing or malformed reference-string file; the message names the file and line."""


def write_references(
    path: str | Path, steps: Sequence[Iterable[int]], num_layers: int, num_experts: int, unit: str
) -> Path:
    """Write the reference string the cache sees, one access per line: `step layer expert`.

    Format (plain text, UTF-8): lines starting with '#' are comments; the first is TRACE_HEADER, the
    second `# unit=<expert|slice> num_layers=<L> num_experts=<E>`. Each other line is three integers
    separated by one space: the step index (0-based, in execution order), the layer (0..L-1; -1 when
    the unit is a whole expert, which is loaded for all layers at once) and the expert id (0..E-1).
    Accesses appear in the order the cache performs them. To replay in another cache simulator use
    object id = expert (unit expert) or layer * E + expert (unit slice), object size 1.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.write(f"{TRACE_HEADER}\n")
        f.write(f"# unit={check_unit(unit)} num_layers={num_layers} num_experts={num_experts}\n")
        for i, s in enumerate(steps):
            for layer, e in step_references(s, num_layers, unit):
                f.write(f"{i} {layer} {e}\n")
    return path


@dataclass
class ReferenceTrace:
    unit: str
    num_layers: int
    num_experts: int
    accesses: list[tuple[int, int, int]]  # (step, layer, expert)

    def object_ids(self) -> list[int]:
        """Integer object ids for an independent simulator (see `write_references`)."""
        if self.unit == "expert":
            return [e for _, _, e in self.accesses]
        return [layer * self.num_experts + e for _, layer, e in self.accesses]


def read_references(path: str | Path) -> ReferenceTrace:
    """Parse a file written by `write_references`; a broken line names the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceTraceError(
            f"reference trace {path} does not exist; write one with `pregate trace export`"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip() != TRACE_HEADER:
        raise ReferenceTraceError(
            f"{path}: first line must be {TRACE_HEADER!r}; not a pregate reference string"
        )
    try:
        meta = dict(kv.split("=", 1) for kv in lines[1].lstrip("# ").split())
        unit = meta["unit"]
        num_layers = int(meta["num_layers"])
        num_experts = int(meta["num_experts"])
    except (IndexError, KeyError, ValueError):
        raise ReferenceTraceError(f"{path}:2: expected '# unit=... num_layers=... num_experts=...'") from None
    if unit not in UNITS:
        raise ReferenceTraceError(f"{path}:2: unit={unit!r} is unknown; expected one of {', '.join(UNITS)}")
    out = []
    for n, line in enumerate(lines[2:], 3):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        try:
            step, layer, e = (int(p) for p in parts)
        except ValueError:
            raise ReferenceTraceError(
                f"{path}:{n}: expected three integers 'step layer expert', got {line!r}"
            ) from None
        if not (0 <= e < num_experts and -1 <= layer < num_layers):
            raise ReferenceTraceError(f"{path}:{n}: layer {layer} or expert {e} out of range")
        out.append((step, layer, e))
    return ReferenceTrace(unit, num_layers, num_experts, out)
