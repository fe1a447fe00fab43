"""Shared fixtures and helpers: tiny random Llama-family models (float32, CPU) built with transformers
itself, MoEs and routers built from them, engines and real servers over them.

Test modules import helpers from here (`from tests.conftest import build`), never from each other. The
autouse `domain_registry` fixture gives every test the registry of user domains it started with."""

import random
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

VOCAB = 97  # tiny_hf_model's vocabulary


@pytest.fixture(autouse=True)
def domain_registry():
    """Forget the user domains a test registers (itself, through tiny_checkpoint or through the CLI's
    --add-domain): the registry and the document caches are put back as they were before it."""
    from pregate import data

    before = dict(data._USER)
    yield
    if data._USER != before:
        data._USER.clear()
        data._USER.update(before)
        data._clear_caches()


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
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([t for docs in TEXTS.values() for t in docs], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A local HF checkpoint dir (tiny random Llama + real tokenizer) and two registered text domains
    (alpha, beta; forgotten after the test by `domain_registry`)."""
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


# ---------------------------------------------------------------------------------------- MoEs and routers


def partition(num_channels: int, num_experts: int, shared: int, seed: int = 0):
    """Random disjoint shared + routed channel sets covering every channel (uneven expert widths)."""
    perm = torch.randperm(num_channels, generator=torch.Generator().manual_seed(seed))
    rest = perm[shared:]
    cut_gen = torch.Generator().manual_seed(seed + 1)
    cuts = sorted(torch.randint(1, len(rest), (num_experts - 1,), generator=cut_gen).tolist())
    return perm[:shared], list(torch.tensor_split(rest, cuts))


def build(hf, num_experts=3, shared=20, seed=0):
    """An MoE of `hf` whose shared + routed experts cover every channel of every layer."""
    from pregate.moe import build_moe_from_dense

    n, i = hf.config.num_hidden_layers, hf.config.intermediate_size
    parts = [partition(i, num_experts, shared, seed + layer) for layer in range(n)]
    return build_moe_from_dense(hf, [p[0] for p in parts], [p[1] for p in parts])


def served_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """What `pregate serve` loads, at tmp_path / "served": a float32 3-expert MoE of the tiny checkpoint
    that covers every channel, its tokenizer and a tiny untrained pre-gating router."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pregate.moe import save_moe
    from pregate.router import PreGatingRouter, RouterConfig, save_router

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    out = tmp_path / "served"
    out.mkdir()
    save_moe(build(hf), out)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(out)
    save_router(
        PreGatingRouter(RouterConfig.preset("tiny", vocab_size=hf.config.vocab_size, num_experts=3)), out
    )
    return out


def make_moe(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """`refactor` of the tiny checkpoint into a 2-expert MoE (alpha, beta) at tmp_path / "moe"."""
    from pregate.refactor import RefactorConfig, refactor

    cfg = RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=256, block_len=64, dtype="float32")
    return refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)


def tiny_router(num_experts: int = 3, seed: int = 0, top_k: int = 1):
    """A tiny pre-gating router over VOCAB, random but decisive: every expert gets tokens."""
    from pregate.router import PreGatingRouter, RouterConfig

    torch.manual_seed(seed)
    cfg = RouterConfig.preset("tiny", vocab_size=VOCAB, num_experts=num_experts, top_k=top_k)
    router = PreGatingRouter(cfg)
    with torch.no_grad():
        for p in router.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    return router.eval()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n (at most 8) token-id prompts of mixed lengths, ids in [3, VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    lens = [1, 5, 17, 3, 40, 9, 2, 23][:n]
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lens]


@torch.no_grad()
def reference_greedy(moe, router, ids: list[int], n: int) -> list[int]:
    """One request alone, no KV cache: full recompute of the backbone and the router at every token."""
    from pregate.moe import Routing

    seq, out = list(ids), []
    for _ in range(n):
        x = torch.tensor([seq])
        e, w = router.route(router(x))  # [1, L, K]
        logits = moe(x, Routing(e[0], w[0].float()))
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        seq.append(tok)
    return out


def assert_batched_equals_one_by_one(served, router, policy: str, reference=None) -> None:
    """Six requests through an engine over `served` (budgets that force prefill chunking and choices
    between queues) give each request the tokens it gets alone by full recompute on `reference`
    (default `served` itself): batched, chunked and cached == one by one."""
    from pregate.engine import Engine, SamplingParams
    from pregate.scheduler import SchedulerConfig

    cfg = SchedulerConfig(
        policy=policy, token_budget=8, max_running=5, kv_capacity_tokens=150, prefill_chunk=6
    )
    engine = Engine(served, router=router, scheduler_config=cfg)
    ps, lens = prompts(6), [6, 3, 9, 1, 7, 4]
    rids = [engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in zip(ps, lens)]
    while engine.has_work():
        engine.step()
    reference = served if reference is None else reference
    for i, rid in enumerate(rids):
        assert engine.result(rid).token_ids == reference_greedy(reference, router, ps[i], lens[i]), (
            f"request {i}"
        )


# ------------------------------------------------------------------------------------- engines and servers


def tiny_engine(tmp_path, config=None, step_s: float = 0.0):
    """An engine over a tiny dense-parent MoE with a real tokenizer; step_s slows every forward."""
    from pregate.engine import Engine
    from pregate.moe import build_moe_from_dense

    tok = tiny_tokenizer(tmp_path)
    hf = tiny_hf_model(seed=3, vocab_size=len(tok))
    n, width = hf.config.num_hidden_layers, hf.config.intermediate_size
    dense = build_moe_from_dense(hf, [torch.arange(width)] * n, [[] for _ in range(n)])
    engine = Engine(dense, tok, scheduler_config=config)
    if step_s:
        real = engine.model.forward_packed

        def slow(*args, **kwargs):
            time.sleep(step_s)
            return real(*args, **kwargs)

        engine.model.forward_packed = slow
    return engine


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app, host: str = "127.0.0.1", log_level: str = "critical", **timeouts):
    """A real uvicorn server for app on loopback, configured as `pregate serve` runs it
    (`launch.uvicorn_config`; `timeouts` passed on), in a thread of this process; yields its base url."""
    import uvicorn

    from pregate.launch import uvicorn_config

    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, host, port, log_level=log_level, **timeouts))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
