"""Domain corpora on the real packaged text: loading, splits, tokens, user domains, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pregate import corpora, data
from pregate.data import DOMAIN_NAMES, DataError, DomainInfo
from pregate.errors import PregateError


class ByteTokenizer:
    """A real (if simple) tokenizer: UTF-8 bytes are the ids, 256 is eos. Counts its calls."""

    eos_token_id = 256

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False
        self.calls += 1
        return {"input_ids": list(text.encode("utf-8"))}


class NoEosTokenizer(ByteTokenizer):
    eos_token_id = None


@pytest.fixture
def user_domain(tmp_path: Path):
    """Register user domains under unique names and forget them afterwards."""
    names: list[str] = []

    def register(name: str, path: Path) -> DomainInfo:
        names.append(name)
        return data.register_domain(name, path)

    yield register
    for name in names:
        data._USER.pop(name, None)


def _write_docs(folder: Path, texts: list[str], suffix: str = ".txt") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:03d}{suffix}").write_text(text, encoding="utf-8")


# --- built-in domains -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_builtin_domain_has_text_in_every_split(name: str) -> None:
    docs = data.load_documents(name)
    assert len(docs) >= 200, f"{name}: only {len(docs)} documents"
    assert all(d.strip() and len(d) <= data.CHUNK_CHARS for d in docs)
    assert len(set(docs)) == len(docs)
    splits = {s: data.split_documents(name, s) for s in data.SPLITS}
    for split, part in splits.items():
        assert len(part) >= data.MIN_SPLIT_DOCS, f"{name}/{split} has {len(part)} documents"
    # disjoint, complete, in load order; test text never in train
    assert sorted(sum(splits.values(), [])) == sorted(docs)
    assert not set(splits["test"]) & set(splits["train"])
    assert not set(splits["validation"]) & set(splits["train"])
    assert splits["train"] == [d for d in docs if d in set(splits["train"])]
    assert 0.8 < len(splits["train"]) / len(docs) < 0.97
    # enough train text for activation statistics (16 x 4096 tokens at ~4 bytes/token)
    assert sum(len(d) for d in splits["train"]) > 4 * 16 * 4096


def test_splits_are_deterministic_and_independent_of_order() -> None:
    docs = data.load_documents("wikipedia")
    labels = data.assign_splits(docs)
    assert data.assign_splits(list(docs)) == labels
    assert data.assign_splits(docs[::-1]) == labels[::-1]
    assert data.split_documents("wikipedia", "test") == data.split_documents("wikipedia", "test")
    # a document keeps its split when the rest of the corpus changes (hash bucket, no top-up needed)
    sub = docs[: len(docs) // 2]
    assert data.assign_splits(sub + docs[len(docs) // 2 :]) == labels


def test_small_split_is_topped_up_deterministically() -> None:
    docs = [f"document number {i} about topic {i % 7}" for i in range(40)]
    labels = data.assign_splits(docs)
    assert labels.count("test") >= 3 and labels.count("validation") >= 3
    assert labels.count("train") >= 30
    shuffled = docs[1::2] + docs[0::2]
    relabel = dict(zip(shuffled, data.assign_splits(shuffled)))
    assert [relabel[d] for d in docs] == labels


def test_domain_info_marks_the_stand_ins() -> None:
    infos = {n: data.domain_info(n) for n in DOMAIN_NAMES}
    assert {n for n, i in infos.items() if i.stand_in} == {"c4", "common_crawl", "stackexchange"}
    for name, info in infos.items():
        assert info.name == name and info.source
        if info.stand_in:
            assert "stand-in" in info.note
    assert "Shakespeare" in infos["book"].source and "Bible" in infos["book"].source
    if not corpora._python_docs_present():
        assert corpora.PYTHON_DOC_APT in infos["c4"].source


def test_describe_domains_rows_add_up() -> None:
    rows = data.describe_domains(["wikipedia", "arxiv"])
    assert [r["name"] for r in rows] == ["wikipedia", "arxiv"]
    for row in rows:
        assert row["documents"] == row["train"] + row["validation"] + row["test"]
        assert row["bytes"] >= sum(len(d) for d in data.load_documents(row["name"]))
        assert set(row) >= {"name", "source", "stand_in", "documents", "bytes", "train", "validation", "test"}


def test_wikipedia_is_article_text() -> None:
    docs = data.load_documents("wikipedia")
    assert docs[0].startswith("Anarchism\n\nAnarchism is a political philosophy")
    assert not any(d.lstrip().upper().startswith("#REDIRECT") for d in docs)
    joined = "\n".join(docs)
    assert joined.count("{{") < 50 and "<ref" not in joined and "'''" not in joined


def test_chunk_text_bounds_and_preserves_words() -> None:
    text = "\n\n".join(f"para {i} " + "word " * (i * 37 % 300) for i in range(60)) + "\n\n" + "x" * 9000
    chunks = data.chunk_text(text, max_chars=1000)
    assert all(0 < len(c) <= 1000 for c in chunks)
    assert "".join("".join(chunks).split()) == "".join(text.split())
    with pytest.raises(DataError, match="max_chars"):
        data.chunk_text(text, max_chars=0)


# --- tokens -----------------------------------------------------------------------------------------


def test_token_stream_is_exact_lazy_and_eos_separated() -> None:
    tok = ByteTokenizer()
    ids = data.token_stream(tok, "github", "train", 3000)
    assert ids.dtype == torch.long and ids.shape == (3000,)
    assert tok.calls <= 3000 // 10  # did not tokenize the 11 MB corpus
    first = data.split_documents("github", "train")[0].encode("utf-8")
    n = min(len(first), 3000)
    assert ids[:n].tolist() == list(first[:n])
    if len(first) < 3000:
        assert ids[len(first)].item() == ByteTokenizer.eos_token_id
    blocks = data.token_blocks(ByteTokenizer(), "github", "train", 3000, 512)
    assert blocks.shape == (5, 512) and torch.equal(blocks.flatten(), ids[: 5 * 512])


def test_token_stream_counts_and_errors_on_small_domain(tmp_path: Path, user_domain) -> None:
    texts = [f"text number {i}. " * (3 + i % 5) for i in range(30)]
    _write_docs(tmp_path / "small", texts)
    user_domain("small_user", tmp_path / "small")
    train = data.split_documents("small_user", "train")
    available = sum(len(d.encode()) for d in train) + len(train) - 1  # bytes + eos between documents
    assert data.token_stream(ByteTokenizer(), "small_user", "train", available).shape == (available,)
    no_eos = data.token_stream(NoEosTokenizer(), "small_user", "train", available - len(train) + 1)
    assert ByteTokenizer.eos_token_id not in no_eos.tolist()
    with pytest.raises(DataError, match=rf"'small_user'.*'train'.*only {available} tokens.*{available + 1}"):
        data.token_stream(ByteTokenizer(), "small_user", "train", available + 1)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_token_stream_rejects_bad_counts(bad) -> None:
    with pytest.raises(DataError, match="n_tokens"):
        data.token_stream(ByteTokenizer(), "wikipedia", "train", bad)
    with pytest.raises(DataError, match="block_len"):
        data.token_blocks(ByteTokenizer(), "wikipedia", "train", 100, bad)


# --- user domains -----------------------------------------------------------------------------------


def test_register_folder_domain(tmp_path: Path, user_domain) -> None:
    folder = tmp_path / "notes"
    _write_docs(folder / "b", ["second file"], ".md")
    _write_docs(folder / "a", ["first file", "   "], ".txt")
    (folder / "ignored.csv").write_text("a,b\n1,2\n")
    info = user_domain("my_notes", folder)
    assert info == data.domain_info("my_notes")
    assert not info.stand_in and str(folder.resolve()) in info.source
    assert data.load_documents("my_notes") == ["first file", "second file"]  # sorted paths, blanks dropped
    assert "my_notes" in data.available_domains()
    assert [r["documents"] for r in data.describe_domains(["my_notes"])] == [2]


def test_register_jsonl_domain_and_reregister(tmp_path: Path, user_domain) -> None:
    path = tmp_path / "docs.jsonl"
    long_text = "".join(f"sentence {i}. " for i in range(700))  # ~10k chars on one line: chunked
    path.write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["alpha", long_text, "alpha"]))
        + "\n\n"
    )
    user_domain("my_jsonl", path)
    docs = data.load_documents("my_jsonl")
    assert docs[0] == "alpha" and len(docs) == 1 + -(-len(long_text.strip()) // data.CHUNK_CHARS)
    assert all(len(d) <= data.CHUNK_CHARS for d in docs)
    path.write_text(json.dumps({"text": "beta"}) + "\n")
    user_domain("my_jsonl", path)  # registering again replaces the cached text
    assert data.load_documents("my_jsonl") == ["beta"]


def test_register_errors(tmp_path: Path, user_domain) -> None:
    with pytest.raises(DataError, match="built-in"):
        data.register_domain("wikipedia", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        data.register_domain("nowhere", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(DataError, match="no text"):
        data.register_domain("empty_one", tmp_path / "empty")
    assert "empty_one" not in data.available_domains()  # a failed registration leaves nothing behind
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"\.jsonl"):
        data.register_domain("csv_one", tmp_path / "x.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        data.register_domain("bad_one", bad)
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        data.register_domain("bad_one", bad)
    with pytest.raises(DataError, match="invalid"):
        data.register_domain("../escape", tmp_path)


def test_unknown_domain_and_bad_split() -> None:
    with pytest.raises(DataError, match="unknown domain 'redpajama'.*arxiv, book, c4") as err:
        data.domain_info("redpajama")
    assert isinstance(err.value, PregateError)
    with pytest.raises(DataError, match="unknown domain"):
        data.load_documents("redpajama")
    with pytest.raises(DataError, match="unknown split 'dev'.*train, validation, test"):
        data.split_documents("wikipedia", "dev")
    with pytest.raises(DataError, match="unknown split"):
        data.token_stream(ByteTokenizer(), "wikipedia", "eval", 10)
