"""The built-in corpora's readers: markup stripping and the guarded newsgroups unpickler."""

from __future__ import annotations

import io
import pickle

import pytest

from pregate import corpora


def test_strip_wiki_markup() -> None:
    src = (
        "'''Foo''' is a [[bar (thing)|bar]] and [[baz]].{{Infobox x|a={{nested}}}}<ref>cite</ref>\n"
        "== History ==\n[[File:x.jpg|thumb|a [[link]] caption]]See [http://x.org the site]."
    )
    assert corpora.strip_wiki_markup(src) == "Foo is a bar and baz.\nHistory\nSee the site."


def test_strip_html_keeps_visible_text() -> None:
    page = (
        "<html><head><title>t</title></head><body><script>var x=1;</script>"
        "<p>A &amp; B</p><h1>T\u00b6</h1></body>"
    )
    assert corpora.strip_html(page) == "A & B\nT"


def test_newsgroups_unpickler_refuses_other_classes() -> None:
    evil = pickle.dumps(print, protocol=0)  # a global reference to builtins.print
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        corpora._NewsgroupsUnpickler(io.BytesIO(evil)).load()
