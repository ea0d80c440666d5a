"""Instruction data for fine-tuning: Alpaca-style records, a prompt template, a validation split.

A record is ``{"instruction": str, "input": str (optional), "output": str}``. The default
data are the 999 English Alpaca records that LLaMA-Factory's source distribution ships
(``data/alpaca_en_demo.json``, read through the same cached sdist as the C4 corpus).
The loss is taken on the response tokens only; the prompt starts with the model's BOS
token (``lm.encode``), the position where the massive activation forms.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..data.sdists import LLAMAFACTORY_REQUIREMENT, read_sdist_member
from ..models.loading import LoadedModel

ALPACA_MEMBER_SUFFIX = "/data/alpaca_en_demo.json"
DEFAULT_DATA = "alpaca"
REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_FIELDS = ("input",)
TEMPLATES = ("alpaca", "chat")
IGNORE_INDEX = -100  # label of tokens that are not predicted (prompt, padding)

# The Stanford Alpaca prompts.
_ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.\n\n"
                      "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
_ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


class DataError(ValueError):
    pass


def _check_record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}, not an object with "
                        f"{', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)} fields")
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise DataError(f"{where} has no {' and no '.join(repr(f) for f in missing)} field "
                        f"(it has {sorted(record) or 'none'}; expected instruction, input (optional), output)")
    for name in REQUIRED_FIELDS + OPTIONAL_FIELDS:
        if name in record and not isinstance(record[name], str):
            raise DataError(f"{where}: field {name!r} is a {type(record[name]).__name__}, not a string")
    return {"instruction": record["instruction"], "input": record.get("input", ""), "output": record["output"]}


def parse_records(text: str, name: str, fmt: str) -> list[dict]:
    """Records from the text of a ``json`` file (a list of objects) or a ``jsonl`` file (one object a line)."""
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
        if not isinstance(data, list):
            raise DataError(f"{name} holds a JSON {type(data).__name__}, not a list of records "
                            "(use a JSON list of objects or a JSONL file with one object a line)")
        records = [_check_record(r, f"record {i} of {name}") for i, r in enumerate(data, 1)]
    elif fmt == "jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"line {line_no} of {name} is not valid JSON: {e.msg}") from None
            records.append(_check_record(record, f"the record on line {line_no} of {name}"))
    else:
        raise DataError(f"unknown data format {fmt!r} of {name}: use a .json list of records or a .jsonl file")
    if not records:
        raise DataError(f"{name} holds no records")
    return records


def load_records(source: str | Path = DEFAULT_DATA) -> list[dict]:
    """``"alpaca"`` (the bundled 999 Alpaca records) or the path of a .json / .jsonl file."""
    if str(source) == DEFAULT_DATA:
        text = read_sdist_member(LLAMAFACTORY_REQUIREMENT, ALPACA_MEMBER_SUFFIX).decode("utf-8")
        return parse_records(text, "alpaca_en_demo.json", "json")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} (or use {DEFAULT_DATA!r}, the bundled Alpaca records)")
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("json", "jsonl"):
        raise DataError(f"unknown data format {path.suffix or '(no extension)'!r} of {path}: "
                        "use a .json list of records or a .jsonl file with one record a line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_records(text, path.name, fmt)


def split_records(records: list[dict], val_fraction: float = 0.05, *, seed: int = 0,
                  limit: int | None = None) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle (of the first ``limit`` records after it), then ``val_fraction`` of them held out."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {val_fraction}")
    if len(records) < 2:
        raise DataError(f"{len(records)} record is too few for a training and a validation split")
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    if limit is not None:
        if limit < 2:
            raise ValueError(f"the record limit must be at least 2, got {limit}")
        shuffled = shuffled[:limit]
    n_val = max(1, round(val_fraction * len(shuffled)))
    return shuffled[n_val:], shuffled[:n_val]


def prompt_ids(lm: LoadedModel, record: dict, template: str) -> list[int]:
    """Token ids of the prompt, BOS first (when the model has one), ending where the response starts."""
    if template == "alpaca":
        form = _ALPACA_WITH_INPUT if record["input"] else _ALPACA_NO_INPUT
        return lm.encode(form.format(**record))
    if template == "chat":
        if not getattr(lm.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {lm.name} has no chat template: use the 'alpaca' template")
        content = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        text = lm.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        # SmolLM2's BOS is the chat template's own <|im_start|>: put it first exactly once
        return ids if lm.bos_id is None or ids[:1] == [lm.bos_id] else [lm.bos_id] + ids
    raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")


def tokenize_records(lm: LoadedModel, records: list[dict], *, template: str = "alpaca",
                     max_length: int = 512) -> list[dict]:
    """Model inputs with labels on the response (and the EOS token after it) only, cut to ``max_length``.

    Records whose prompt alone fills ``max_length`` predict nothing and are left out.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    eos = [lm.tokenizer.eos_token_id] if lm.tokenizer.eos_token_id is not None else []
    examples = []
    for record in records:
        prompt = prompt_ids(lm, record, template)
        response = lm.tokenizer(record["output"], add_special_tokens=False)["input_ids"] + eos
        ids = (prompt + response)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
        if any(label != IGNORE_INDEX for label in labels):
            examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not examples:
        raise DataError(f"no record has a response token within max_length={max_length}: raise max_length")
    return examples


def collator(tokenizer):
    """Right-pads a batch: ids with the pad token, labels with IGNORE_INDEX."""
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token is None:  # padding is masked out, so any token will do
        tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
