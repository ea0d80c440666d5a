"""Moved to ``cardhouse.data.corpora`` (the text sources sit below the analyses and the evaluation);
this name is kept so that imports written before the move still work."""

from ..data.corpora import (CORPORA, LLAMAFACTORY_REQUIREMENT, Corpus, available_corpora,  # noqa: F401
                            get_corpus, load_text, prepare_corpora, read_sdist_member, tokenize_corpus)
