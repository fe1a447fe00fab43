"""Domain corpora: the registry of domains, deterministic splits and token blocks.

A domain is a named corpus: the seven built-in RedPajama stand-ins (read by ``corpora``; ``DOMAIN_NAMES``)
and user domains (``register_domain``: a folder of .txt/.md files or a .jsonl file). This module owns the
registry (``DomainInfo``, ``register_domain``, ``available_domains``, ``domain_info``), chunking
(``chunk_text``), documents and splits (``load_documents``, ``assign_splits``, ``split_documents``),
token streams and blocks (``token_stream``, ``token_blocks``) and ``describe_domains``. Imports from the
package: ``errors`` and ``corpora``.

Documents. Every source document (paper, play scene, bible chapter, article, file, Q&A pair...) is cut
into chunks of at most ``CHUNK_CHARS`` characters at paragraph (blank line) boundaries, falling back
to line and then hard cuts, *before* splitting; exact duplicate chunks are dropped. A "document" in
this module is such a chunk. User domains (``register_domain``) are chunked the same way.

Splits. A chunk goes to test / validation / train by the sha1 of its text (5 % / 5 % / 90 %), so its
split depends on its text only, not on file order or machine (c4, common_crawl and github *contents*
do depend on what is installed). Validation and test are then topped up to min(MIN_SPLIT_DOCS, n // 10)
chunks by moving the train chunks with the smallest sha1("<split>:" + text): a function of the set of
chunks, not their order. A chunk is in exactly one split, so test text never reaches train.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pregate.corpora import BUILTINS, read_text
from pregate.errors import PregateError, check_int

DOMAIN_NAMES: tuple[str, ...] = (
    "arxiv",
    "book",
    "c4",
    "common_crawl",
    "github",
    "stackexchange",
    "wikipedia",
)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
CHUNK_CHARS = 4000  # ~1k tokens: long enough for context, small enough that 106 articles give many chunks
MIN_SPLIT_DOCS = 3
assert tuple(sorted(BUILTINS)) == DOMAIN_NAMES  # the built-in corpora are the seven RedPajama domains


class DataError(PregateError):
    """Bad domain name, split, path or token request; the message says what is valid."""


@dataclass(frozen=True)
class DomainInfo:
    name: str
    source: str  # human-readable: where the text comes from
    stand_in: bool  # True when it only stands in for the RedPajama domain
    note: str  # one line on what is a stand-in for what, or ""


# ----------------------------------------------------------------------------------------------------
# Chunking.


def chunk_text(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into stripped, non-empty pieces of at most ``max_chars`` characters.

    Paragraphs (separated by blank lines) are packed greedily; a paragraph longer than ``max_chars``
    is packed line by line, and a line longer than that is cut hard. Depends only on ``text``.
    """
    if max_chars <= 0:
        raise DataError(f"max_chars must be positive, got {max_chars}")
    pieces: list[str] = []
    for para in re.split(r"\n[ \t]*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if len(para) <= max_chars:
            pieces.append(para)
            continue
        for line in para.split("\n"):
            pieces.extend(line[i : i + max_chars] for i in range(0, max(len(line), 1), max_chars))
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        sep = 2 if current else 0
        if current and size + sep + len(piece) > max_chars:
            chunks.append("\n\n".join(current))
            current, size, sep = [], 0, 0
        current.append(piece)
        size += sep + len(piece)
    if current:
        chunks.append("\n\n".join(current))
    return [c.strip() for c in chunks if c.strip()]


# ----------------------------------------------------------------------------------------------------
# User domains.

_USER: dict[str, tuple[DomainInfo, Path]] = {}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _user_documents(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md")),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        return [read_text(p) for p in files]
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be an object "
                    f'like {{"text": "..."}}'
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(
                    f'{path}:{lineno}: expected an object with a string "text" field, '
                    f"got {line.strip()[:80]!r}"
                )
            docs.append(row["text"])
    return docs


def register_domain(name: str, path: str | Path) -> DomainInfo:
    """Register a user domain: a folder of .txt/.md files (recursive, one document per file, sorted by
    relative path) or a .jsonl file whose lines are objects with a "text" field.

    The text is read now (and chunked/split like built-ins); registering a user name again replaces
    it. Raises DataError for a built-in name, a malformed name, a missing path, another file type or
    no non-empty text.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise DataError(
            f"domain name {name!r} is invalid: use letters, digits, '_', '.', '-' "
            f"(starting with a letter or digit)"
        )
    if name in BUILTINS:
        raise DataError(
            f"domain name {name!r} is a built-in domain; choose another name "
            f"(built-ins: {', '.join(DOMAIN_NAMES)})"
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"domain path {str(p)!r} does not exist; give a folder of .txt/.md files or a .jsonl file"
        )
    if p.is_file() and p.suffix.lower() != ".jsonl":
        raise DataError(
            f"domain path {str(p)!r} is a {p.suffix or 'suffix-less'} file; give a folder of "
            f'.txt/.md files or a .jsonl file with a "text" field'
        )
    p = p.resolve()
    previous = _USER.get(name)
    info = DomainInfo(name=name, source=f"user domain from {p}", stand_in=False, note="")
    _USER[name] = (info, p)
    _clear_caches()
    try:
        if not load_documents(name):
            raise DataError(
                f"domain path {str(p)!r} holds no text: it needs .txt/.md files "
                f'(folder) or "text" fields (.jsonl) that are not empty'
            )
    except Exception:
        if previous is None:
            del _USER[name]
        else:
            _USER[name] = previous
        _clear_caches()
        raise
    return info


def available_domains() -> tuple[str, ...]:
    """Built-in domain names, then registered user domains in registration order."""
    return DOMAIN_NAMES + tuple(_USER)


def _check_name(name: str) -> None:
    if name not in BUILTINS and name not in _USER:
        raise DataError(
            f"unknown domain {name!r}; valid: {', '.join(available_domains())} "
            f"(or add one with register_domain)"
        )


def domain_info(name: str) -> DomainInfo:
    """What the domain is and where its text comes from. Unknown name -> DataError listing valid names."""
    _check_name(name)
    if name in _USER:
        return _USER[name][0]
    b = BUILTINS[name]
    return DomainInfo(name=name, source=b.source(), stand_in=b.stand_in, note=b.note)


# ----------------------------------------------------------------------------------------------------
# Documents and splits.


@functools.cache
def _documents(name: str) -> tuple[str, ...]:
    raw = BUILTINS[name].loader() if name in BUILTINS else _user_documents(_USER[name][1])
    seen: set[str] = set()
    out: list[str] = []
    for doc in raw:
        for chunk in chunk_text(doc):
            if chunk not in seen:
                seen.add(chunk)
                out.append(chunk)
    return tuple(out)


def load_documents(name: str) -> list[str]:
    """All documents (chunks of at most CHUNK_CHARS chars, deduplicated) of a domain in a deterministic
    order: source order, sorted file paths. Cached in-process; returns a fresh list each call."""
    _check_name(name)
    return list(_documents(name))


def _sha1(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:12], 16)


def assign_splits(documents: Sequence[str]) -> list[str]:
    """Split name for each document: a pure function of each text's hash, plus the deterministic top-up
    of validation/test to min(MIN_SPLIT_DOCS, n // 10) documents; independent of input order."""
    labels = []
    for doc in documents:
        bucket = _sha1(doc) % 100
        labels.append("test" if bucket < 5 else "validation" if bucket < 10 else "train")
    need = min(MIN_SPLIT_DOCS, len(documents) // 10)
    for split in ("test", "validation"):
        missing = need - labels.count(split)
        if missing > 0:
            train = sorted(
                (i for i, s in enumerate(labels) if s == "train"),
                key=lambda i: (_sha1(f"{split}:{documents[i]}"), documents[i]),
            )
            for i in train[:missing]:
                labels[i] = split
    return labels


@functools.cache
def _splits(name: str) -> dict[str, tuple[str, ...]]:
    docs = _documents(name)
    labels = assign_splits(docs)
    return {s: tuple(d for d, lab in zip(docs, labels) if lab == s) for s in SPLITS}


def split_documents(name: str, split: str) -> list[str]:
    """Documents of one split, in load_documents order. split must be train, validation or test."""
    _check_name(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return list(_splits(name)[split])


def _clear_caches() -> None:
    _documents.cache_clear()
    _splits.cache_clear()


# ----------------------------------------------------------------------------------------------------
# Tokens.


def token_stream(tokenizer, name: str, split: str, n_tokens: int) -> torch.LongTensor:
    """Exactly ``n_tokens`` ids: the split's documents in order, tokenized one at a time (lazily, so a
    small request never tokenizes a whole corpus), with ``tokenizer.eos_token_id`` between documents
    when the tokenizer has one. Raises DataError when the split holds fewer tokens."""
    check_int("n_tokens", n_tokens, error=DataError)
    docs = split_documents(name, split)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i > 0 and eos is not None:
            ids.append(int(eos))
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens], dtype=torch.long)
    raise DataError(
        f"domain {name!r} split {split!r} has only {len(ids)} tokens but {n_tokens} were "
        f"requested; ask for fewer tokens or use another split/domain"
    )


def token_blocks(tokenizer, name: str, split: str, n_tokens: int, block_len: int) -> torch.LongTensor:
    """[n_tokens // block_len, block_len] ids cut from ``token_stream`` (the remainder is not read)."""
    check_int("block_len", block_len, error=DataError)
    check_int("n_tokens", n_tokens, block_len, error=DataError, why="at least one block")
    n_blocks = n_tokens // block_len
    return token_stream(tokenizer, name, split, n_blocks * block_len).view(n_blocks, block_len)


def describe_domains(names: Sequence[str] | None = None) -> list[dict]:
    """Rows for `pregate data`: name, source, stand_in, note, documents, bytes (UTF-8) and the train /
    validation / test document counts. ``names`` defaults to every available domain."""
    rows = []
    for name in available_domains() if names is None else names:
        info = domain_info(name)
        splits = _splits(name)
        docs = _documents(name)
        rows.append(
            {
                "name": name,
                "source": info.source,
                "stand_in": info.stand_in,
                "note": info.note,
                "documents": len(docs),
                "bytes": sum(len(d.encode("utf-8")) for d in docs),
                **{s: len(splits[s]) for s in SPLITS},
            }
        )
    return rows
