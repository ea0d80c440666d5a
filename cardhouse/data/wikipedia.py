"""Wikipedia prose: the XML dump excerpt that gensim's wheel ships for its tests, markup stripped."""

from __future__ import annotations

import bz2
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator

from cardhouse._install import ensure_module

from .text import PARAGRAPH_SEPARATOR

GENSIM_REQUIREMENT = "gensim==4.4.0"
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# Markup that mwparserfromhell would keep as visible text (citations) or parse slowly
# (deeply nested templates); none of it is prose.
_WIKI_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_WIKI_COMMENT = re.compile(r"<!--.*?-->", re.S)
# Everything after the first of these headings is lists of links and references.
_WIKI_BACK_MATTER = re.compile(
    r"^=+\s*(References|Notes|See also|Further reading|External links|Bibliography|Sources|"
    r"Works cited|Citations|Footnotes)\s*=+\s*$",
    re.M | re.I,
)
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:])")
MIN_PARAGRAPH_WORDS = 10


def _local_tag(element: ET.Element) -> str:
    return element.tag.rsplit("}", 1)[-1]


def _iter_article_markup(xml_stream) -> Iterator[str]:
    """Wiki markup of each main-namespace page that is not a redirect, in dump order."""
    for _, element in ET.iterparse(xml_stream, events=("end",)):
        if _local_tag(element) != "page":
            continue
        namespace = element.findtext("{*}ns")
        is_redirect = element.find("{*}redirect") is not None
        markup = element.findtext("{*}revision/{*}text") or ""
        element.clear()
        if namespace == "0" and not is_redirect:
            yield markup


def _drop_templates(markup: str) -> str:
    """Remove ``{{...}}`` templates, nested ones included."""
    kept, depth = [], 0
    for piece in re.split(r"(\{\{|\}\})", markup):
        if piece == "{{":
            depth += 1
        elif piece == "}}":
            depth = max(0, depth - 1)
        elif depth == 0:
            kept.append(piece)
    return "".join(kept)


def _is_prose(line: str) -> bool:
    # Leftover "|" means a table row or an image caption; prose ends a sentence.
    return len(line.split()) >= MIN_PARAGRAPH_WORDS and "|" not in line and line[-1] in ".!?\"'"


def article_prose(markup: str) -> list[str]:
    """The prose paragraphs of one article's wiki markup: no templates, references, tables or back matter."""
    import mwparserfromhell

    back_matter = _WIKI_BACK_MATTER.search(markup)
    if back_matter:
        markup = markup[: back_matter.start()]
    markup = _drop_templates(_WIKI_REF.sub("", _WIKI_COMMENT.sub("", markup)))
    plain = mwparserfromhell.parse(markup).strip_code()
    paragraphs = []
    for line in plain.splitlines():
        line = " ".join(line.split())
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", _EMPTY_PARENS.sub("", line))
        if line and _is_prose(line):
            paragraphs.append(line)
    return paragraphs


def wikipedia_text() -> str:
    dump = ensure_module("gensim", GENSIM_REQUIREMENT) / WIKI_DUMP
    with bz2.open(dump) as xml_stream:
        paragraphs = [p for markup in _iter_article_markup(xml_stream) for p in article_prose(markup)]
    return PARAGRAPH_SEPARATOR.join(paragraphs)
