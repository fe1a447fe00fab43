"""The checkpoint layout: atomic directory writes, the config reader's errors, layout helpers."""

from __future__ import annotations

import json

import pytest

from pregate import checkpoint
from pregate.checkpoint import CONFIG_FILE, ROUTER_CONFIG, atomic_dir
from pregate.errors import PregateError
from pregate.moe import load_config, save_moe
from tests.conftest import build, tiny_hf_model


def test_atomic_dir_discards_a_failed_write(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out", force=False) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    with pytest.raises(PregateError, match="--force"):
        with atomic_dir(out, force=False):
            pass
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["new"]


def test_read_config_says_what_is_wrong(tmp_path):
    with pytest.raises(PregateError, match="is not a directory"):
        checkpoint.read_config(tmp_path / "absent")
    with pytest.raises(PregateError, match=f"no {CONFIG_FILE}"):
        checkpoint.read_config(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(PregateError, match="is damaged"):
        checkpoint.read_config(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "pregate-moe", "version": 1}))
    with pytest.raises(PregateError, match="is damaged"):  # fields missing: not a MoEConfig
        load_config(tmp_path)


def test_load_config_reads_a_saved_moe_without_its_weights(tmp_path):
    moe = build(tiny_hf_model())
    save_moe(moe, tmp_path)
    assert checkpoint.is_checkpoint(tmp_path) and not checkpoint.has_router(tmp_path)
    assert load_config(tmp_path) == moe.config
    (tmp_path / ROUTER_CONFIG).write_text("{}")
    assert checkpoint.has_router(tmp_path)


def test_parse_dtype_names_the_choices():
    import torch

    assert checkpoint.parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(PregateError, match="float32, bfloat16, float16"):
        checkpoint.parse_dtype("int8")


def test_tokenizer_files_and_link_tree(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "added_tokens.json", "model.bin"):
        (src / name).write_text(name)
    (src / "sub" / "kept").write_text("k")
    (src / "sub" / "skipped").write_text("s")
    (src / ".hidden").write_text("h")
    names = [p.name for p in checkpoint.tokenizer_files(src)]
    assert names == ["added_tokens.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    dst.mkdir()
    checkpoint.link_tree(src, dst, {"model.bin", "sub/skipped"})
    linked = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert linked == [
        "added_tokens.json",
        "sub/kept",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
