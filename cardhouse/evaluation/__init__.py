"""Evaluation: perplexity on real text and zero-shot accuracy through lm-evaluation-harness."""

from .corpora import CORPORA, Corpus, available_corpora, load_text, tokenize_corpus
from .perplexity import PerplexityResult, build_windows, evaluate_perplexities, perplexity
