"""`pregate export`: the Hugging Face export equals pregate's MoE, its engine and (fully covered) the parent.

Tiny float32 models on CPU; each export is loaded back with AutoModelForCausalLM + trust_remote_code.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from pregate.engine import Engine, SamplingParams
from pregate.errors import PregateError
from pregate.export import export_hf
from pregate.moe import build_moe_from_dense, load_moe, save_moe
from pregate.router import LayerwiseGate, load_router, routing_for, save_router
from tests.conftest import VOCAB, build, make_moe, prompts, tiny_hf_model, tiny_router

ROOT = Path(__file__).resolve().parent.parent


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


def checkpoint(path: Path, moe, router=None) -> Path:
    """A directory laid out like a `pregate train` output: MoE + router (no tokenizer)."""
    path.mkdir(parents=True)
    save_moe(moe, path)
    if router is not None:
        save_router(router, path)
    return path


def exported(tmp_path: Path, moe, router, name: str = "hf"):
    ck = checkpoint(tmp_path / f"{name}-checkpoint", moe, router)
    export_hf(ck, tmp_path / name)
    return load_hf(tmp_path / name)


@pytest.fixture(scope="module")
def moe_router_hf(tmp_path_factory):
    """Tied Llama MoE (3 uneven experts) + a decisive tiny router, and its export."""
    moe, router = build(tiny_hf_model(seed=4), num_experts=3), tiny_router()
    return moe, router, exported(tmp_path_factory.mktemp("export"), moe, router)


# ----------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("head", ["softmax", "dselect"])
def test_logits_equal_pregate_moe_under_router_routing(tmp_path, model_type, head):
    # llama: tied embeddings; qwen2: untied, q/k/v biases. dselect: top-2 weighted experts.
    moe = build(tiny_hf_model(model_type, seed=2), num_experts=4)
    top_k = 2 if head == "dselect" else 1
    router = tiny_router(num_experts=4, seed=1, top_k=top_k)
    if head == "dselect":
        from pregate.router import PreGatingRouter, RouterConfig

        torch.manual_seed(1)
        cfg = RouterConfig.preset("tiny", vocab_size=VOCAB, num_experts=4, head="dselect", top_k=2)
        router = PreGatingRouter(cfg).eval()
        with torch.no_grad():
            for p in router.parameters():
                p.normal_(0, 0.5)
    hf = exported(tmp_path, moe, router)
    ids = torch.randint(0, VOCAB, (3, 17))
    routing, _ = routing_for(router, ids)
    assert len(torch.unique(routing.expert_ids)) > 1  # several experts really run
    with torch.no_grad():
        want = moe(ids, routing)
        got = hf(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the router's choice inside forward is pregate's router's choice
    e, w = hf.route(ids)
    assert torch.equal(e.reshape(-1, top_k), routing.expert_ids)
    torch.testing.assert_close(w.reshape(-1, top_k), routing.weights)


def test_cached_decode_equals_full_recompute(moe_router_hf):
    from transformers import DynamicCache

    _, _, hf = moe_router_hf
    ids = torch.randint(0, VOCAB, (2, 15))
    with torch.no_grad():
        full = hf(ids, use_cache=False).logits
        cache, pieces, start = DynamicCache(), [], 0
        for n in (6, 3, 1, 1, 2, 1, 1):  # a prompt in chunks, then single tokens: the router keeps up
            pieces.append(hf(ids[:, start : start + n], cache=cache, use_cache=True).logits)
            start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 15


def test_beam_search_reorders_the_router_state_too(moe_router_hf):
    # the router's keys/values live in the DynamicCache, so beam reordering must keep them right:
    # cached beam search equals beam search that recomputes everything (router included) every step
    _, _, hf = moe_router_hf
    ids = torch.tensor([prompts(5)[4][:12]])
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        cached = hf.generate(ids, **kw)
        recomputed = hf.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)


def test_greedy_generate_equals_engine(moe_router_hf):
    moe, router, hf = moe_router_hf
    hf.generation_config.eos_token_id = None  # the engine below ignores eos too
    ps, n = prompts(6), 9
    engine = Engine(moe, router=router)
    want = [g.token_ids for g in engine.generate(ps, SamplingParams(max_tokens=n, ignore_eos=True))]
    with torch.no_grad():
        for p, tokens in zip(ps, want):
            out = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)
            assert out[0, len(p) :].tolist() == tokens
    # one left-padded batch: the mask and position ids keep every row equal to the row alone
    width = max(len(p) for p in ps)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert [row[width:].tolist() for row in out] == want


def test_experts_covering_every_channel_export_the_dense_parent(tmp_path, hf_model):
    # every routed expert holds all the channels the shared expert lacks (each in its own order), so
    # whichever expert the router picks, the MLP is the dense one
    n, i = hf_model.config.num_hidden_layers, hf_model.config.intermediate_size
    shared, experts = [], []
    for layer in range(n):
        perm = torch.randperm(i, generator=torch.Generator().manual_seed(layer))
        shared.append(perm[:30])
        rest = perm[30:]
        orders = [torch.randperm(len(rest), generator=torch.Generator().manual_seed(9 + e)) for e in range(3)]
        experts.append([rest[order] for order in orders])
    moe = build_moe_from_dense(hf_model, shared, experts)
    hf = exported(tmp_path, moe, tiny_router())
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, hf_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_refactored_full_remain_rate_exports_the_dense_parent(tiny_checkpoint, tmp_path):
    # `pregate refactor --remain-rate 1`: every channel in the shared expert; a router is added as train would
    from transformers import AutoModelForCausalLM

    from pregate.refactor import RefactorConfig, refactor
    from pregate.router import PreGatingRouter, RouterConfig

    cfg = RefactorConfig(
        domains=["alpha", "beta"], tokens_per_domain=256, block_len=64, dtype="float32", remain_rate=1.0
    )
    ck = refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)
    moe = load_moe(ck)
    vocab = moe.config.base["vocab_size"]
    router = PreGatingRouter(RouterConfig.preset("tiny", vocab_size=vocab, num_experts=moe.num_experts))
    save_router(router.eval(), ck)
    info = export_hf(ck, tmp_path / "hf")
    assert "tokenizer.json" in info["tokenizer_files"]
    hf = load_hf(tmp_path / "hf")
    parent = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    ids = torch.randint(0, vocab, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, parent(ids).logits, atol=1e-5, rtol=1e-5)


def test_trained_checkpoint_exports_with_tokenizer_and_generates_text(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from pregate.train import TrainConfig, train

    out = train(
        make_moe(tiny_checkpoint, tmp_path),
        tmp_path / "trained",
        TrainConfig.preset("tiny", rounds=1, train_control=False),
        progress=False,
    )
    export_hf(out, tmp_path / "hf")
    hf, tok = load_hf(tmp_path / "hf"), AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    moe, router = load_moe(out), load_router(out)
    ids = tok("the quick brown fox", return_tensors="pt")["input_ids"]  # [1, L]
    with torch.no_grad():
        want = moe(ids, routing_for(router, ids)[0])
        torch.testing.assert_close(hf(ids).logits, want, atol=1e-5, rtol=1e-5)
        text = tok.decode(hf.generate(ids, max_new_tokens=5, do_sample=False)[0])
    assert text.startswith("the quick brown fox")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pregate.PregateForCausalLM"
    assert config["num_experts"] == 2 and config["router"]["num_experts"] == 2


def test_shipped_files_import_only_torch_and_transformers():
    for name in ("modeling_pregate.py", "configuration_pregate.py"):
        tree = ast.parse((ROOT / "pregate" / name).read_text())
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.add(node.module.split(".")[0])
        assert roots <= {"torch", "transformers", "math", "dataclasses", "__future__"}, (name, roots)


# ----------------------------------------------------------------------------------------- bad input


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PregateError, match="not a pregate MoE checkpoint"):
        export_hf(tmp_path / "empty", tmp_path / "hf")
    with pytest.raises(PregateError, match="not a directory"):
        export_hf(tmp_path / "missing", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_existing_out_needs_force_and_is_left_alone(tmp_path, moe_router_hf):
    moe, router, _ = moe_router_hf
    ck = checkpoint(tmp_path / "ck", moe, router)
    out = tmp_path / "hf"
    out.mkdir()
    export_hf(ck, out)  # an empty directory is fine
    (out / "mine.txt").write_text("keep")
    with pytest.raises(PregateError, match="not empty.*--force"):
        export_hf(ck, out)
    assert (out / "mine.txt").read_text() == "keep"
    export_hf(ck, out, force=True)
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_layerwise_gates_and_missing_router_are_refused(tmp_path, moe_router_hf):
    moe, _, _ = moe_router_hf
    ck = checkpoint(tmp_path / "lw", moe, LayerwiseGate(3, 48, 3))
    with pytest.raises(PregateError, match="layer-wise gates.*without --layerwise"):
        export_hf(ck, tmp_path / "hf")
    bare = checkpoint(tmp_path / "bare", moe)
    with pytest.raises(PregateError, match="no trained router"):
        export_hf(bare, tmp_path / "hf")
    with pytest.raises(PregateError, match="does not fit"):
        other = checkpoint(tmp_path / "r4", moe, tiny_router(num_experts=4))
        export_hf(bare, tmp_path / "hf", router_dir=other)
    assert not (tmp_path / "hf").exists()


def test_cli_export_and_its_errors(tmp_path, moe_router_hf, capsys):
    from pregate.cli import main

    moe, router, _ = moe_router_hf
    ck = checkpoint(tmp_path / "ck", moe, router)
    assert main(["export", str(ck), "--out", str(tmp_path / "hf")]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert main(["export", str(ck), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "Traceback" not in err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a pregate MoE checkpoint" in capsys.readouterr().err
