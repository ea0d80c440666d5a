"""Token ids of a corpus, cached per tokenizer in ``cache_dir("tokens")`` as safetensors.

A cache file is keyed by the corpus, the tokenizer's vocabulary and both format versions, and carries the
hash of the text it was made from: a stale, corrupt or foreign file is rebuilt, and a new one is written to
a temporary file and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from cardhouse._files import write_atomically
from cardhouse._install import cache_dir

from .corpora import TEXT_FORMAT_VERSION, get_corpus, load_text

log = logging.getLogger(__name__)

# Bump when the token cache layout changes.
TOKENS_FORMAT_VERSION = 1


def vocabulary_hash(tokenizer) -> str:
    vocabulary = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([type(tokenizer).__name__, vocabulary], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def token_cache_path(name: str, vocab_hash: str) -> Path:
    key = f"{name}-{vocab_hash[:20]}-t{TEXT_FORMAT_VERSION}-k{TOKENS_FORMAT_VERSION}"
    return cache_dir("tokens") / f"{key}.safetensors"


def _cache_metadata(name: str, vocab_hash: str, text: str) -> dict[str, str]:
    return {
        "corpus": name,
        "vocabulary_hash": vocab_hash,
        # A cache made from another version of the text (a changed extraction) is stale.
        "text_hash": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "text_format_version": str(TEXT_FORMAT_VERSION),
        "tokens_format_version": str(TOKENS_FORMAT_VERSION),
    }


def _read_token_cache(path: Path, expected_metadata: dict[str, str]) -> torch.Tensor | None:
    """The cached token ids, or None when the file is missing, corrupt or for another key."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as cache:
            if cache.metadata() != expected_metadata:
                raise ValueError("it was made from another text, vocabulary or cache format")
            token_ids = cache.get_tensor("token_ids")
        if token_ids.ndim != 1:
            raise ValueError(f"token_ids has shape {tuple(token_ids.shape)}")
        return token_ids
    except Exception as error:  # any unreadable cache is rebuilt, whatever broke it
        log.warning("rebuilding the token cache %s: %s", path, error)
        return None


def _tokenize_text(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: the corpus is longer than model_max_length on purpose.
    token_ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(token_ids, dtype=torch.int32)


def tokenize_corpus(tokenizer, name: str, max_tokens: int | None = None) -> torch.LongTensor:
    """Token ids of the whole corpus (1-D, no special tokens), the first ``max_tokens`` if given."""
    from safetensors.torch import save_file

    get_corpus(name)
    vocab_hash = vocabulary_hash(tokenizer)
    path = token_cache_path(name, vocab_hash)
    text = load_text(name)
    metadata = _cache_metadata(name, vocab_hash, text)
    token_ids = _read_token_cache(path, metadata)
    if token_ids is None:
        token_ids = _tokenize_text(tokenizer, text)
        write_atomically(path, lambda tmp: save_file({"token_ids": token_ids}, str(tmp), metadata=metadata))
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    return token_ids.long()
