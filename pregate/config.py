"""Typed configuration of the model half, validated on construction, with named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from pregate.data import DOMAIN_NAMES
from pregate.errors import PregateError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PregateError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class RefactorConfig:
    """How `pregate refactor` turns a dense model into a MoE (SPEC section 1)."""

    domains: list[str] = field(default_factory=lambda: list(DOMAIN_NAMES))
    tokens_per_domain: int = 16 * 4096  # the paper: ~16 x 4096 tokens per domain
    block_len: int = 512
    remain_rate: float = 0.5  # fraction of MLP channels each domain keeps
    seed: int = 0
    dtype: str = "bfloat16"  # dtype of the written checkpoint (statistics are always float32)
    batch_size: int = 4

    def __post_init__(self):
        if not 0.0 < self.remain_rate <= 1.0:
            raise PregateError(f"remain_rate must lie in (0, 1], got {self.remain_rate}")
        if not self.domains:
            raise PregateError("domains: give at least one domain")
        if len(set(self.domains)) != len(self.domains):
            raise PregateError(f"domains: {self.domains} lists a domain twice")
        if self.block_len < 2:
            raise PregateError(f"block_len must be >= 2, got {self.block_len}")
        if self.tokens_per_domain < self.block_len:
            raise PregateError(f"tokens_per_domain ({self.tokens_per_domain}) must be at least block_len ({self.block_len})")
        if self.batch_size < 1:
            raise PregateError(f"batch_size must be >= 1, got {self.batch_size}")
        parse_dtype(self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


REFACTOR_PRESETS = {
    "paper": RefactorConfig(),
    # make demo: the seven domains on a budget that runs in a few minutes on 2 CPU cores
    "demo": RefactorConfig(tokens_per_domain=8192, block_len=512),
    "tiny": RefactorConfig(tokens_per_domain=256, block_len=64, dtype="float32"),
}
