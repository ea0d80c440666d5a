"""The training text as tokens: SmolLM2's tokenizer, every corpus with its end held out, the random
training batches and the fixed held-out windows and prompts the measurements read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.token_cache import tokenize_corpus
from ..models.sources import BUNDLED, gguf_cache_folder
from .config import TrainConfig


@dataclass
class TokenData:
    train: torch.Tensor  # [n_train] token ids
    val: torch.Tensor  # [n_val] held-out token ids
    corpora: dict[str, int]  # corpus -> tokens (train + val)


def smollm2_tokenizer(folder: Path | None = None):
    """SmolLM2's tokenizer without its weights.

    From ``folder`` when it holds one (a run folder keeps its own copy, so that it can be
    carried to a machine without package registries), else from the bundled model's cache,
    else from its GGUF file; then saved to ``folder``.
    """
    from transformers import AutoTokenizer

    if folder is not None and (Path(folder) / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    gguf = BUNDLED["smollm2-135m"].locate_gguf()
    cached = gguf_cache_folder(gguf)  # where load_model keeps it
    if (cached / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # parses the GGUF: seconds
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


def split_tokens(per_corpus: dict[str, torch.Tensor], val_fraction: float) -> TokenData:
    """Hold out the end of every corpus, so that each one is in the validation text."""
    train, val = [], []
    for ids in per_corpus.values():
        cut = len(ids) - int(len(ids) * val_fraction)
        train.append(ids[:cut])
        val.append(ids[cut:])
    return TokenData(torch.cat(train), torch.cat(val), {name: len(ids) for name, ids in per_corpus.items()})


def load_data(tokenizer, config: TrainConfig) -> TokenData:
    return split_tokens({name: tokenize_corpus(tokenizer, name) for name in config.corpora}, config.val_fraction)


def check_data(data: TokenData, config: TrainConfig) -> None:
    T, B = config.block_size, config.batch_size
    if len(data.train) < B * T + 1:
        raise ValueError(f"the training text has {len(data.train):,} tokens, too few for a batch of {B} windows of "
                         f"{T} tokens (at least {B * T + 1:,}): add corpora or lower the context or batch size")
    if len(data.val) < T + 1:
        raise ValueError(f"the held-out text has {len(data.val):,} tokens, fewer than one window of {T + 1}: "
                         f"add corpora, raise val_fraction or lower the context")


def get_batch(tokens: torch.Tensor, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows ``x [B, T]`` and their next tokens ``y [B, T]``."""
    start = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    x = torch.stack([tokens[i:i + block_size] for i in start.tolist()])
    y = torch.stack([tokens[i + 1:i + 1 + block_size] for i in start.tolist()])
    return x, y


def val_windows(data: TokenData, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping held-out windows ``x, y [n, T]``, spread evenly over the whole held-out text.

    Spread, because the held-out text is every corpus's end one after the other: the first
    windows alone would be the first corpus's. The same windows at every measurement.
    """
    T = config.block_size
    n = min(config.eval_windows, (len(data.val) - 1) // T)
    starts = torch.linspace(0, len(data.val) - T - 1, n).long().tolist()  # spaced >= T apart: n * T <= len - 1
    x = torch.stack([data.val[s:s + T] for s in starts])
    y = torch.stack([data.val[s + 1:s + T + 1] for s in starts])
    return x, y


def scan_prompts(data: TokenData, tokenizer, config: TrainConfig) -> list[str]:
    """Held-out text cut into windows of half the context (re-tokenizing them stays within it)."""
    length = config.block_size // 2 or 1
    starts = torch.linspace(0, len(data.val) - length - 1, config.scan_prompts).long().unique().tolist()
    return [tokenizer.decode(data.val[s:s + length].tolist()) for s in starts]
