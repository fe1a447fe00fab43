"""User-facing errors, and the one check of an integer or a number that names the field and its value.

Every layer imports this module, so it imports nothing from the package. The CLI prints a PregateError
as one clear line instead of a traceback."""

from __future__ import annotations

import math


class PregateError(Exception):
    """A mistake the user can fix (bad input, missing file, wrong option); the message says how."""

    exit_status = 2  # what `pregate` exits with after printing the message


def check_int(
    name: str,
    value: object,
    minimum: int = 1,
    maximum: int | None = None,
    error: type[PregateError] = PregateError,
    why: str = "",
) -> int:
    """`value` itself, if it is an integer (a bool is not) in [minimum, maximum]; otherwise `error`
    saying `name=value must be an integer >= minimum` (and why, when given)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise error(f"{name}={_shown(value)} must be an integer {bound}{f' ({why})' if why else ''}")
    return value


def check_expert_ids(lowest: int, highest: int, num_experts: int) -> None:
    """Refuse expert ids outside [0, num_experts), given the lowest and highest of them (a trace or a
    routing of another model, before any kernel indexes experts with them)."""
    if lowest < 0 or highest >= num_experts:
        raise PregateError(f"expert ids must lie in [0, {num_experts}), got [{lowest}, {highest}]")


def check_number(
    name: str,
    value: object,
    above: float | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    error: type[PregateError] = PregateError,
    why: str = "",
) -> float:
    """`value` itself, if it is a finite real number (a bool is not) > above, >= minimum and <= maximum,
    where given; otherwise `error` naming the field and the value."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (above is not None and not value > above)
        or (minimum is not None and not value >= minimum)
        or (maximum is not None and not value <= maximum)
    ):
        low = f" > {above}" if above is not None else f" >= {minimum}" if minimum is not None else ""
        bound = low + (f"{' and' if low else ''} <= {maximum}" if maximum is not None else "")
        raise error(f"{name}={_shown(value)} must be a finite number{bound}{f' ({why})' if why else ''}")
    return value


def _shown(value: object, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: a bad value may come from a client and be huge."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for str() (Python's digit limit)
        text = f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
