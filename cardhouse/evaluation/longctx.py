"""Long-context retrieval, a stand-in for LongBench (which cannot be had offline).

Two synthetic tasks built from the bundled real text (``corpora.py``: Austen, Wikipedia, ...):

- ``passkey``: a five-digit pass key stated once inside the filler text ("The pass key is
  48213. Remember it. 48213 is the pass key."), asked for at the end;
- ``needle``: a fact about a named person ("The secret word of Elinor Marsh is lantern.")
  hidden in the text (needle in a haystack), asked for at the end.

Each prompt is exactly ``length`` tokens: BOS (when the model has one), an instruction, filler
taken from a seeded random place in the corpus, the needle at ``depth`` (0 = right after the
instruction, 1 = right before the question) and the question. An answer is correct when the
greedy continuation (``max_new_tokens`` tokens, first line) contains the key or the word. All
prompts of one length have the same number of tokens, so a batch needs no padding.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from ..data.token_cache import tokenize_corpus
from ..models.loading import LoadedModel

KINDS = ("passkey", "needle")
INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and remember it; you will be asked about it.\n\n")
_NAMES = ["Elinor Marsh", "Arthur Penrose", "Clara Whitby", "Thomas Hale", "Mary Ashdown", "Henry Colville",
          "Lucy Fenwick", "Edmund Rowe"]
_WORDS = ["lantern", "harbour", "violet", "compass", "thimble", "orchard", "saddle", "meadow", "candle", "ribbon"]


@dataclass
class Item:
    kind: str
    length: int
    depth: float
    answer: str
    ids: list[int]


def _needle(kind: str, rng: random.Random) -> tuple[str, str, str]:
    """(sentence hidden in the text, question at the end, expected answer)."""
    if kind == "passkey":
        key = str(rng.randrange(10000, 100000))
        return (f" The pass key is {key}. Remember it. {key} is the pass key. ",
                "\n\nWhat is the pass key? The pass key is", key)
    name, word = rng.choice(_NAMES), rng.choice(_WORDS)
    return (f" The secret word of {name} is {word}. ", f"\n\nWhat is the secret word of {name}? "
            f"The secret word of {name} is", word)


def build_items(lm: LoadedModel, kinds: list[str], lengths: list[int], depths: list[float], n: int,
                corpus: str = "austen", seed: int = 0, max_new_tokens: int = 8) -> list[Item]:
    """``n`` prompts per (kind, length, depth), each exactly ``length`` tokens."""

    check(kinds, lengths, depths, n, max_new_tokens, max_length(lm), lm.name)
    filler = tokenize_corpus(lm.tokenizer, corpus, max_tokens=max(lengths) * 8).tolist()
    encode = lambda text: lm.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    bos = [lm.bos_id] if lm.bos_id is not None else []
    rng, items = random.Random(seed), []
    for kind in kinds:
        for length in lengths:
            for depth in depths:
                for _ in range(n):
                    needle, question, answer = _needle(kind, rng)
                    head, needle_ids, tail = bos + encode(INSTRUCTION), encode(needle), encode(question)
                    room = length - len(head) - len(needle_ids) - len(tail)
                    if room < 0:
                        raise ValueError(f"length {length} is too short for the {kind} prompt "
                                         f"({length - room} tokens without filler)")
                    start = rng.randrange(0, len(filler) - room)
                    text = filler[start:start + room]
                    cut = round(depth * room)
                    items.append(Item(kind, length, depth, answer, head + text[:cut] + needle_ids + text[cut:] + tail))
    return items


def check(kinds: list[str], lengths: list[int], depths: list[float], n: int, max_new_tokens: int = 8,
          maximum: int = 2048, name: str = "the model") -> None:
    """Every setting checked before any model time is spent (the CLI calls it with the config's maximum,
    before the weights load)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown long-context task(s) {unknown}; known: {', '.join(KINDS)}")
    too_long = [length for length in lengths if length + max_new_tokens > maximum]
    if too_long:
        raise ValueError(f"context length(s) {too_long} plus {max_new_tokens} answer tokens exceed {name}'s "
                         f"maximum of {maximum} tokens")
    if not lengths or min(lengths) < 64:
        raise ValueError(f"context lengths must be at least 64 tokens, got {lengths}")
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must lie in [0, 1], got {depths}")
    if n < 1:
        raise ValueError(f"items per cell must be at least 1, got {n}")


def max_length(lm: LoadedModel) -> int:
    config = lm.model.config.get_text_config()
    return next((getattr(config, a) for a in ("max_position_embeddings", "n_positions") if getattr(config, a, None)),
                2048)


def score(lm: LoadedModel, items: list[Item], *, max_new_tokens: int = 8, batch_size: int = 4,
          progress: bool = False) -> list[dict]:
    """Greedy answers; per item ``{kind, length, depth, answer, output, correct}``."""
    from tqdm.auto import tqdm

    rows = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(items), batch_size), disable=not progress, desc="long context"):
            batch = items[start:start + batch_size]
            by_length: dict[int, list[Item]] = {}
            for item in batch:
                by_length.setdefault(len(item.ids), []).append(item)
            for group in by_length.values():  # one length: no padding
                ids = torch.tensor([item.ids for item in group], device=lm.model.device)
                out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=max_new_tokens, pad_token_id=lm.tokenizer.pad_token_id
                                        if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id)
                for item, tokens in zip(group, out[:, ids.shape[1]:].tolist()):
                    text = lm.tokenizer.decode(tokens, skip_special_tokens=True).strip().split("\n")[0]
                    rows.append({"kind": item.kind, "length": item.length, "depth": item.depth, "answer": item.answer,
                                 "output": text, "correct": item.answer in text})
    return rows


def cells(rows: list[dict]) -> list[dict]:
    """Accuracy per (kind, length, depth)."""
    table: dict[tuple, list[bool]] = {}
    for row in rows:
        table.setdefault((row["kind"], row["length"], row["depth"]), []).append(row["correct"])
    return [{"kind": k, "length": n, "depth": d, "n": len(v), "accuracy": sum(v) / len(v)}
            for (k, n, d), v in sorted(table.items())]


def measurer(lm: LoadedModel, items: list[Item], **options):
    """``lm -> row`` for ``run_variants``: the mean accuracy per kind and every cell."""
    def measure(lm: LoadedModel) -> dict:
        rows = score(lm, items, **options)
        out = {f"retrieval_{kind}": sum(r["correct"] for r in rows if r["kind"] == kind)
               / max(1, sum(r["kind"] == kind for r in rows)) for kind in dict.fromkeys(i.kind for i in items)}
        return {**out, "cells": cells(rows), "answers": rows}
    return measure


def describe(items: list[Item]) -> dict:
    return {"items": len(items), "example": {k: v for k, v in asdict(items[0]).items() if k != "ids"}}
