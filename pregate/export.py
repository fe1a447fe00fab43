"""`pregate export`: a pregate MoE + its pre-gating router as a Hugging Face checkpoint directory.

The directory loads with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and holds:
- config.json: a `PregateConfig` (model_type "pregate_moe") whose `auto_map` points at the two files below;
- configuration_pregate.py and modeling_pregate.py, copied verbatim from this package (they import only
  torch and transformers; pre-gating runs inside the model's `forward`);
- model.safetensors: backbone, shared and routed experts (in the checkpoint's dtype) and router (float32);
- the tokenizer files of the checkpoint, and a short README.md.

This module owns the mapping from pregate's parameter names to the exported ones (`hf_state_dict`, the one
place that knows both layouts) and the Hugging Face directory's layout (`HF_CONFIG_FILE`,
`HF_WEIGHTS_FILE`: a different layout from pregate's own `checkpoint`, whose directory mechanics it
reuses). Layer-wise gates cannot be exported: they choose experts inside the backbone, so nothing can
route before it runs. Imports from the package: `errors`, `checkpoint`, `moe` and `router`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from pregate.checkpoint import ROUTER_CONFIG, atomic_dir, has_router, tokenizer_files
from pregate.errors import PregateError

MODEL_TYPE = "pregate_moe"
SHIPPED_FILES = ("configuration_pregate.py", "modeling_pregate.py")
AUTO_MAP = {
    "AutoConfig": "configuration_pregate.PregateConfig",
    "AutoModelForCausalLM": "modeling_pregate.PregateForCausalLM",
}
# The exported Hugging Face directory (not pregate's checkpoint layout, see `pregate.checkpoint`).
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"

# pregate name (regex) -> exported name; every parameter must match exactly one rule.
_BACKBONE_RULES = [
    (r"embed_tokens\.weight", r"model.embed_tokens.weight"),
    (r"norm\.weight", r"model.norm.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
    (r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", r"model.layers.\1.\2.weight"),
    (r"layers\.(\d+)\.self_attn\.([qkvo]_proj)\.(weight|bias)", r"model.layers.\1.self_attn.\2.\3"),
    (r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"model.layers.\1.mlp.shared.\2.weight"),
    (r"layers\.(\d+)\.mlp\.w_gate", r"model.layers.\1.mlp.experts.gate_proj"),  # [E, R, H]
    (r"layers\.(\d+)\.mlp\.w_up", r"model.layers.\1.mlp.experts.up_proj"),  # [E, R, H]
    (r"layers\.(\d+)\.mlp\.w_down", r"model.layers.\1.mlp.experts.down_proj"),  # [E, H, R]
    (r"layers\.(\d+)\.mlp\.(shared_index|expert_index)", None),  # dense-channel bookkeeping, not weights
]
_ROUTER_RULES = [
    (r"embed\.weight", r"router.embed_tokens.weight"),
    (r"norm\.weight", r"router.norm.weight"),
    (r"layers\.(\d+)\.(attn_norm|mlp_norm)\.weight", r"router.layers.\1.\2.weight"),
    (r"layers\.(\d+)\.attn\.qkv\.weight", r"router.layers.\1.attn.qkv_proj.weight"),
    (r"layers\.(\d+)\.attn\.out\.weight", r"router.layers.\1.attn.o_proj.weight"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)\.weight", r"router.layers.\1.mlp.\2_proj.weight"),
    (r"head\.weight", r"router.head.weight"),
    (r"head\.(z_proj|alpha_proj)\.(weight|bias)", r"router.head.\1.\2"),
]


def _rename(state: dict[str, torch.Tensor], rules, what: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        hits = [(pat, new) for pat, new in rules if re.fullmatch(pat, name)]
        if len(hits) != 1:
            raise PregateError(
                f"cannot export {what} parameter {name!r}: pregate.export.hf_state_dict does not know this "
                "layout (a checkpoint from a newer pregate?); update its mapping"
            )
        pat, new = hits[0]
        if new is not None:
            out[re.sub(pat, new, name)] = tensor.detach().contiguous()
    return out


def hf_state_dict(moe, router) -> dict[str, torch.Tensor]:
    """pregate's `MoEForCausalLM` [+ `PreGatingRouter`] state -> the exported model's state dict.

    The only function that knows pregate's parameter names; the exported modeling file has its own.
    Backbone tensors keep their dtype, router tensors become float32 (pregate routes in float32).
    """
    state = _rename(moe.state_dict(), _BACKBONE_RULES, "MoE")
    if moe.config.base.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    if router is not None:
        routed = _rename(router.state_dict(), _ROUTER_RULES, "router")
        state.update({k: v.float() for k, v in routed.items()})
    return state


def hf_config(moe, router) -> dict:
    """The exported HF_CONFIG_FILE as a dict (PregateConfig's fields plus auto_map)."""
    from pregate.moe import FORMAT_VERSION

    base, cfg = moe.config.base, moe.config
    keep = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "rms_norm_eps",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    out = {k: base[k] for k in keep if k in base}
    rope = base.get("rope_parameters")
    if rope is None:  # a parent config written before transformers 5
        rope = dict(base.get("rope_scaling") or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = base.get("rope_theta", 10000.0)
    dtype = next(moe.parameters()).dtype
    out.update(
        model_type=MODEL_TYPE,
        architectures=["PregateForCausalLM"],
        auto_map=dict(AUTO_MAP),
        head_dim=moe.head_dim,
        attention_bias=bool(base.get("attention_bias", False)) or base["model_type"] == "qwen2",
        rope_parameters=rope,
        tie_word_embeddings=bool(base.get("tie_word_embeddings", False)),
        dtype=str(dtype).removeprefix("torch."),
        num_experts=cfg.num_experts,
        num_experts_per_tok=router.cfg.top_k if router is not None else 1,
        shared_channels=list(cfg.shared_channels),
        expert_channels=[list(row) for row in cfg.expert_channels],
        expert_names=list(cfg.expert_names),
        router=router.cfg.to_dict() if router is not None else None,
        parent_model_type=base["model_type"],
        pregate={"format_version": FORMAT_VERSION, "provenance": cfg.provenance},
    )
    return out


def _load_parts(checkpoint_dir: Path, router_dir: Path | None):
    from pregate.moe import load_moe
    from pregate.router import PreGatingRouter, load_router

    moe = load_moe(checkpoint_dir)  # clear errors for a directory that is not a checkpoint
    if moe.num_experts == 0:
        return moe, None  # a dense checkpoint (e.g. the same-size control): nothing to route
    source = router_dir or checkpoint_dir
    if not has_router(source):
        hint = "pass --router DIR" if router_dir is None else "give the `pregate train` output that holds it"
        raise PregateError(
            f"{source} holds no trained router ({ROUTER_CONFIG}); the export pre-gates with one: "
            f"train it with `pregate train {checkpoint_dir} --out DIR` and export DIR, or {hint}"
        )
    router = load_router(source)
    if not isinstance(router, PreGatingRouter):
        raise PregateError(
            f"{source} holds layer-wise gates (`pregate train --layerwise`): they choose experts from "
            "each layer's hidden state, so they cannot route before the backbone runs; export a "
            "pre-gating router (`pregate train` without --layerwise)"
        )
    base = moe.config.base
    if router.cfg.num_experts != moe.num_experts or router.cfg.vocab_size != base["vocab_size"]:
        raise PregateError(
            f"the router in {source} (vocab {router.cfg.vocab_size}, {router.cfg.num_experts} experts) "
            f"does not fit the MoE in {checkpoint_dir} "
            f"(vocab {base['vocab_size']}, {moe.num_experts} experts)"
        )
    return moe, router


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PregateError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PregateError(
            f"--out {out} already exists and is not empty; choose another --out or pass --force to replace it"
        )


def export_hf(
    checkpoint_dir: str | Path, out_dir: str | Path, router_dir: str | Path | None = None, force: bool = False
) -> dict:
    """Write the Hugging Face export of `checkpoint_dir` (a `pregate train` output, or any MoE checkpoint
    with `router_dir`) into `out_dir`; returns a summary. The directory appears complete or not at all.

    Raises PregateError for a directory that is not a MoE checkpoint, a missing or layer-wise router, and
    an existing non-empty `out_dir` without force=True.
    """
    from safetensors.torch import save_file

    checkpoint_dir, out = Path(checkpoint_dir), Path(out_dir)
    if out.resolve() == checkpoint_dir.resolve():
        raise PregateError(f"--out {out} is the checkpoint itself; choose another directory")
    _check_out(out, force)
    moe, router = _load_parts(checkpoint_dir, Path(router_dir) if router_dir is not None else None)
    state = hf_state_dict(moe, router)
    config = hf_config(moe, router)
    tokenizer = tokenizer_files(checkpoint_dir)
    here = Path(__file__).parent
    with atomic_dir(out, force=True) as tmp:  # `out` is absent, empty or --force by now (checked above)
        save_file(state, str(tmp / HF_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(config, indent=1))
        for name in SHIPPED_FILES:
            shutil.copy2(here / name, tmp / name)
        for path in tokenizer:
            shutil.copy2(path, tmp / path.name)
        (tmp / "README.md").write_text(_readme(checkpoint_dir, config))
    return {
        "out": str(out),
        "num_experts": moe.num_experts,
        "router": "none (dense)" if router is None else f"{router.cfg.head}, top-{router.cfg.top_k}",
        "dtype": config["dtype"],
        "parameters": sum(t.numel() for t in state.values()),
        "tokenizer_files": [p.name for p in tokenizer],
    }


def _readme(checkpoint_dir: Path, config: dict) -> str:
    return (
        f"# pregate export of `{checkpoint_dir.name}`\n\n"
        f"A Read-ME pre-gated MoE ({config['num_experts']} routed experts + a shared expert per layer, "
        f"parent: {config['parent_model_type']}), written by `pregate export`.\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(PATH)\n"
        "```\n\n"
        "The router runs inside `forward` on the input ids; see modeling_pregate.py.\n"
    )
