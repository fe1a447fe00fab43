"""lm-eval's `local-completions` model against the real server: the log-likelihoods it scores (echo +
logprobs, as it asks) equal a direct log-softmax of the model's logits, and its accuracy equals what
pregate's own lm-eval model (`pregate eval tasks`' PregateLM) scores on the same task.

Needs an `lm_eval` executable with its API extras (tenacity, pinned in requirements.txt): the one beside
this Python, on PATH, or named by the LM_EVAL variable. Skipped otherwise."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pregate.moe import Segment
from pregate.server import build_app
from tests.conftest import running, tiny_engine

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]  # lm_eval runs in a subprocess

DOCS = [
    {"question": "the quick brown fox jumps over the lazy", "choices": ["dog", "cat", "fox"], "answer": 0},
    {"question": "def f3(x):\n    return x *", "choices": ["3 + 1", "dog", "lazy"], "answer": 0},
    {"question": "the quick brown", "choices": ["fox", "x", "return"], "answer": 0},
]
TASK = """task: pregate_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_local_completions_scores_what_the_model_says(tmp_path):
    beside = Path(sys.executable).parent / "lm_eval"
    lm_eval = os.environ.get("LM_EVAL") or (str(beside) if beside.is_file() else shutil.which("lm_eval"))
    if not lm_eval:
        pytest.skip("no lm_eval executable (set LM_EVAL=/path/to/lm_eval)")
    engine = tiny_engine(tmp_path)
    tok = engine.tokenizer
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    with running(build_app(engine, "tiny")) as url:
        args = (
            f"base_url={url}/v1/completions,model=tiny,tokenizer={tmp_path / 'tok'},"
            "tokenizer_backend=huggingface,"
            "num_concurrent=1,max_retries=1"
        )
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(
            [
                lm_eval,
                "--model",
                "local-completions",
                "--model_args",
                args,
                "--include_path",
                str(tmp_path / "tasks"),
                "--tasks",
                "pregate_tiny_mc",
                "--output_path",
                str(tmp_path / "out"),
                "--log_samples",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples,) = list((tmp_path / "out").rglob("samples_pregate_tiny_mc_*.jsonl"))
    scored = 0
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        for arg, resp in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = arg["arg_0"], arg["arg_1"]
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
            n_context = len(tok(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logits = engine.model.forward_packed(torch.tensor(whole), [Segment(len(whole))], None)
            lp = torch.log_softmax(logits.float(), dim=-1)
            want = sum(float(lp[i - 1, whole[i]]) for i in range(n_context, len(whole)))
            assert float(resp[0][0]) == pytest.approx(want, abs=1e-4)
            scored += 1
    assert scored == sum(len(d["choices"]) for d in DOCS)

    # the same task through pregate's own lm-eval model on the same weights: the same accuracy
    from pregate.harness import PregateLM, _packed
    from pregate.tasks import run_lm_eval

    lm = PregateLM(lambda ids, rows: _packed(engine.model, ids, rows, None), tok, max_length=256)
    ours = run_lm_eval(lm, ["pregate_tiny_mc"], None, tmp_path / "tasks")["results"]["pregate_tiny_mc"]
    (results,) = list((tmp_path / "out").rglob("results_*.json"))
    theirs = json.loads(results.read_text())["results"]["pregate_tiny_mc"]
    assert ours["acc,none"] == theirs["acc,none"]
