"""pregate: refactor a dense LLM into a router-decoupled MoE (Read-ME) and serve it with pre-gating."""

__version__ = "0.1.0"
