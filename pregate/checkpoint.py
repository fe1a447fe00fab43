"""The on-disk layout of pregate checkpoints: file names, the control directory, atomic writes.

A `pregate refactor` output directory holds:
- `CONFIG_FILE` + `WEIGHTS_FILE`: the MoE (written and read by `moe.save_moe` / `moe.load_moe`);
- the tokenizer files (`tokenizer_files`), `STATS_FILE` (per-domain channel means) and `RECORD_FILE`
  (what the refactoring did);
- `CONTROL_DIR`/: the same-size dense control, itself a MoE checkpoint with 0 routed experts.
A `pregate train` output has the same layout plus `ROUTER_WEIGHTS` + `ROUTER_CONFIG` (the router, written
and read by `router.save_router` / `router.load_router`), `STATE_FILE` (resume state), `LOG_FILE` and
`PLOT_FILE`. A directory appears complete or not at all (`atomic_dir`).

This module owns the names and the directory mechanics only; the components own their formats. It imports
nothing from the package but `errors` (and no torch at import time), so every layer may import it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pregate.errors import PregateError

CONFIG_FILE = "pregate_config.json"
WEIGHTS_FILE = "model.safetensors"
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_CONFIG = "router_config.json"
CONTROL_DIR = "control"
STATS_FILE = "stats.safetensors"
RECORD_FILE = "refactor.json"
STATE_FILE = "train_state.json"
LOG_FILE = "train_log.json"
PLOT_FILE = "loss.png"
# Tokenizer files besides tokenizer*: what `save_pretrained` of the supported tokenizers writes.
TOKENIZER_NAMES = (
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the dtypes a checkpoint may be written and served in


def parse_dtype(name: str):
    """The torch dtype of a name in DTYPE_NAMES."""
    if name not in DTYPE_NAMES:
        raise PregateError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)


def is_checkpoint(path: str | Path) -> bool:
    """True when `path` holds a pregate MoE config (a `pregate refactor` or `pregate train` output)."""
    return (Path(path) / CONFIG_FILE).is_file()


def has_router(path: str | Path) -> bool:
    """True when `path` holds a trained router (a `pregate train` output)."""
    return (Path(path) / ROUTER_CONFIG).is_file()


def read_config(path: str | Path) -> dict:
    """The parsed `CONFIG_FILE` of a checkpoint directory; a clear PregateError when `path` is none.

    `moe.load_config` turns it into a `MoEConfig`."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise PregateError(f"{path} is not a directory; give a checkpoint written by `pregate refactor`")
    if not cfg_file.is_file():
        raise PregateError(
            f"{path} is not a pregate MoE checkpoint (no {CONFIG_FILE}); make one with `pregate refactor`"
        )
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise PregateError(f"{cfg_file} is damaged ({err}); rewrite the checkpoint") from err


@contextmanager
def atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` only when the block finishes without error."""
    out = Path(out)
    if out.exists() and not force:
        raise PregateError(f"{out} already exists; choose another --out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{int(time.time())}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_files(src: Path) -> list[Path]:
    """The tokenizer files of a checkpoint directory, sorted by name."""
    names = [p for p in sorted(Path(src).iterdir()) if p.is_file()]
    return [p for p in names if p.name.startswith("tokenizer") or p.name in TOKENIZER_NAMES]


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of `src` into the existing directory `dst`."""
    for path in tokenizer_files(src):
        shutil.copy2(path, Path(dst) / path.name)


def link_tree(src: Path, dst: Path, skip: set[str]) -> None:
    """Hard-link (copy if linking fails) every file of src into dst, except relative paths in `skip`.
    Safe because checkpoint files are only ever replaced, never written in place."""
    for path in src.rglob("*"):
        rel = path.relative_to(src).as_posix()
        if path.is_dir() or rel in skip or rel.startswith(".") or any(rel.startswith(s + "/") for s in skip):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
