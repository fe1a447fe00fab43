"""Shared fixtures: tiny random Llama-family models (float32, CPU) built with transformers itself."""

import random

import pytest
import torch


def tiny_hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A random HF causal LM of the given family, small enough for exact float32 comparisons."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=model_type == "llama",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF initialises small; larger weights make equivalence tests meaningful
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(params=["llama", "qwen2"])
def hf_model(request):
    return tiny_hf_model(request.param)


TEXTS = {
    "alpha": ["the quick brown fox jumps over the lazy dog. " * 20 + f"story {i}." for i in range(40)],
    "beta": [f"def f{i}(x):\n    return x * {i} + 1\n" * 12 for i in range(40)],
}


def tiny_tokenizer(tmp_path):
    """A real byte-level BPE tokenizer trained here on the tiny domains, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t for docs in TEXTS.values() for t in docs], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A local HF checkpoint dir (tiny random Llama + real tokenizer) and two registered text domains."""
    from pregate import data

    tokenizer = tiny_tokenizer(tmp_path)
    model = tiny_hf_model("llama", vocab_size=len(tokenizer))
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    for name, docs in TEXTS.items():
        folder = tmp_path / f"corpus-{name}"
        folder.mkdir()
        for i, text in enumerate(docs):
            (folder / f"{i}.txt").write_text(text)
        data.register_domain(name, folder)
    return path


def routed_trace(n=12, seed=0, experts=7, arrivals=False):
    """A routed trace (no model needed) with sticky experts, as Read-ME's router has: temporal locality."""
    from pregate.workload import WorkloadRequest

    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, o = rng.randint(2, 20), rng.randint(1, 12)
        e, pe, oe = rng.randrange(experts), [], []
        for lst, m in ((pe, p), (oe, o)):
            for _ in range(m):
                e = e if rng.random() < 0.7 else rng.randrange(experts)
                lst.append(e)
        out.append(WorkloadRequest(f"r{i}", "", o, rng.uniform(0, 0.05) * i if arrivals else 0.0, p, pe, oe))
    return out


def bookkeeping_size(obj, seen: set | None = None) -> int:
    """Entries held in the containers of `obj`, followed through pregate objects and nested containers
    (tensors, files, threads and other foreign objects count 0): what a long run could grow."""
    from collections import deque

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, (list, tuple, set, frozenset, deque)):
        return len(obj) + sum(bookkeeping_size(x, seen) for x in obj)
    if isinstance(obj, dict):
        return len(obj) + sum(bookkeeping_size(k, seen) + bookkeeping_size(v, seen) for k, v in obj.items())
    if type(obj).__module__.startswith("pregate.") and hasattr(obj, "__dict__"):
        return sum(bookkeeping_size(v, seen) for v in vars(obj).values())
    return 0
