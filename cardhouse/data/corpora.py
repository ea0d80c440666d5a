"""The corpora: real text for perplexity and training, from packages that ship it (see /work/shared/SOURCES.md).

Every corpus is built from its package on first use (``wikipedia``, ``sdists``, ``debian``) and cached as
plain text in ``cache_dir("corpora")``, written to a temporary file and renamed into place, so an
interrupted run never leaves a half-written file behind; ``token_cache`` tokenizes it per tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cardhouse._files import write_atomically
from cardhouse._install import cache_dir

from .debian import AUSTEN_DEBIAN_PACKAGE, KJV_DEBIAN_PACKAGE, austen_text, kjv_text
from .sdists import LLAMAFACTORY_REQUIREMENT, SENTENCEPIECE_REQUIREMENT, botchan_text, c4_text, wiki_demo_text
from .wikipedia import GENSIM_REQUIREMENT, WIKI_DUMP, wikipedia_text

# Bump when the text extraction changes: cached texts and token ids are then rebuilt.
TEXT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    source: str
    build_text: Callable[[], str]


# the three perplexity corpora first, then more text for training from scratch (cardhouse emergence; see
# docs/emergence.md)
CORPORA: dict[str, Corpus] = {corpus.name: corpus for corpus in (
    Corpus("wikipedia", "English Wikipedia articles (prose paragraphs of 106 articles, markup stripped)",
           f"PyPI {GENSIM_REQUIREMENT} wheel: gensim/{WIKI_DUMP}", wikipedia_text),
    Corpus("c4", "C4 web text (300 documents)", f"PyPI {LLAMAFACTORY_REQUIREMENT} sdist: data/c4_demo.jsonl", c4_text),
    Corpus("austen", "Jane Austen's six novels, book-length prose (a PG-19 stand-in)",
           f"Debian {AUSTEN_DEBIAN_PACKAGE}: R data files read with PyPI rdata", austen_text),
    Corpus("kjv", "The King James Bible (1,189 chapters, one paragraph each)",
           f"Debian {KJV_DEBIAN_PACKAGE} and bible-kjv-text: the bible program's output", kjv_text),
    Corpus("wiki-demo", "30 English Wikipedia articles (another revision of articles in 'wikipedia': do not mix them)",
           f"PyPI {LLAMAFACTORY_REQUIREMENT} sdist: data/wiki_demo.txt", wiki_demo_text),
    Corpus("botchan", "Natsume Soseki's novel Botchan in English (Project Gutenberg #8868, the book only)",
           f"PyPI {SENTENCEPIECE_REQUIREMENT} sdist: test/botchan.txt", botchan_text),
)}


def available_corpora() -> list[str]:
    return list(CORPORA)


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    return CORPORA[name]


def load_text(name: str) -> str:
    """The corpus as one string: documents (or paragraphs) in a fixed order, separated by blank lines."""
    corpus = get_corpus(name)
    cached = cache_dir("corpora") / f"{name}.v{TEXT_FORMAT_VERSION}.txt"
    if cached.exists():
        return cached.read_text(encoding="utf-8")
    text = corpus.build_text()
    write_atomically(cached, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return text


def prepare_corpora() -> None:
    """Install what the corpora come from and cache their texts (for offline use later)."""
    for name in CORPORA:
        load_text(name)
