"""Instruction data: JSON / JSONL records, clear errors naming the bad record, the split, the labels."""

from __future__ import annotations

import json

import pytest

from cardhouse.finetuning.data import (IGNORE_INDEX, DataError, collator, load_records, parse_records, split_records,
                                       tokenize_records)
from conftest import BOS_ID, EOS_ID

GOOD = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_json_and_jsonl_give_the_same_records(tmp_path):
    records = [GOOD, {"instruction": "Say hi.", "output": "hi"}]  # input is optional
    from_json = load_records(write(tmp_path, "a.json", json.dumps(records)))
    from_jsonl = load_records(write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n"))
    assert from_json == from_jsonl
    assert from_json[1] == {"instruction": "Say hi.", "input": "", "output": "hi"}


@pytest.mark.parametrize("name, text, message", [
    ("a.json", json.dumps([GOOD, GOOD, {"instruction": "x", "input": ""}]), r"record 3 of a.json has no 'output'"),
    ("a.json", json.dumps([GOOD, {"input": "y"}]), r"record 2 of a.json has no 'instruction' and no 'output'"),
    ("a.json", json.dumps([GOOD, {**GOOD, "output": 5}]), r"record 2 of a.json: field 'output' is a int"),
    ("a.json", json.dumps([GOOD, "text"]), r"record 2 of a.json is a str"),
    ("a.json", json.dumps({"data": [GOOD]}), r"JSON dict, not a list of records"),
    ("a.json", "[" + json.dumps(GOOD) + ",", r"not valid JSON"),
    ("a.json", "[]", r"no records"),
    ("a.jsonl", json.dumps(GOOD) + "\n{oops\n", r"line 2 of a.jsonl is not valid JSON"),
    ("a.jsonl", json.dumps(GOOD) + "\n\n" + json.dumps({"instruction": "x"}), r"line 3 of a.jsonl has no 'output'"),
    ("a.csv", "instruction,output\n", r"unknown data format '.csv'"),
])
def test_bad_data_names_the_bad_record(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message):
        load_records(write(tmp_path, name, text))


def test_missing_file_and_unknown_format():
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_records("/nonexistent/records.json")
    with pytest.raises(DataError, match="unknown data format"):
        parse_records("[]", "x", "yaml")


def test_split_holds_out_five_percent_seeded():
    records = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(100)]
    train, val = split_records(records, seed=1)
    assert len(val) == 5 and len(train) == 95
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in val}
    assert split_records(records, seed=1) == (train, val)
    assert split_records(records, seed=2) != (train, val)
    train, val = split_records(records, limit=40)
    assert (len(train), len(val)) == (38, 2)
    with pytest.raises(ValueError, match="validation fraction"):
        split_records(records, val_fraction=1.0)


def test_labels_cover_the_response_and_eos_only(tiny):
    lm = tiny("llama")
    (example,) = tokenize_records(lm, [GOOD], max_length=400)
    ids, labels = example["input_ids"], example["labels"]
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    predicted = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert lm.tokenizer.decode(predicted[:-1]) == "5" and predicted[-1] == EOS_ID
    assert lm.tokenizer.decode(ids).endswith("### Input:\n2 and 3\n\n### Response:\n5<eos>")
    # cut to max_length; a prompt that fills it predicts nothing and is left out
    long = {**GOOD, "output": "x" * 500}
    (cut,) = tokenize_records(lm, [long, GOOD], max_length=300)[:1]
    assert len(cut["input_ids"]) == 300
    with pytest.raises(DataError, match="max_length"):
        tokenize_records(lm, [GOOD], max_length=20)
    with pytest.raises(ValueError, match="unknown template"):
        tokenize_records(lm, [GOOD], template="vicuna")
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_records(lm, [GOOD], template="chat")


def test_collator_pads_labels_with_ignore_index(tiny):
    lm = tiny("llama")
    batch = collator(lm.tokenizer)(tokenize_records(lm, [GOOD, {**GOOD, "output": "five"}], max_length=400))
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["labels"][0, -3:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, -3:] == 0).all()


def test_bundled_alpaca_records():
    records = load_records("alpaca")  # LLaMA-Factory's sdist, cached by `cardhouse download --eval-data`
    assert len(records) == 999
    assert all(r["instruction"] and r["output"] for r in records)


@pytest.mark.parametrize("args, message", [
    (["--p0", "1.5"], "--p0 must be a number in 0.0..1.0"),
    (["--schedule", "cosine"], "unknown MacDrop schedule"),
    (["--scope", "rows"], "unknown MacDrop scope"),
    (["--method", "qlora"], "unknown method"),
    (["--data", "{bad}"], "record 2 of bad.json has no 'output'"),
    (["--data", "{csv}"], "unknown data format '.csv'"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, monkeypatch, args, message):
    from saved_models import save_tiny
    from typer.testing import CliRunner

    from cardhouse.cli import app

    bad = write(tmp_path, "bad.json", json.dumps([GOOD, {"instruction": "x"}]))
    csv = write(tmp_path, "a.csv", "instruction,output\n")
    args = [a.format(bad=bad, csv=csv) for a in args]
    out = tmp_path / "out"
    model = save_tiny(tmp_path / "model", plant=False)
    monkeypatch.setattr("cardhouse.models.loading._load_auto", lambda *a, **k: pytest.fail("weights loaded"))
    result = CliRunner().invoke(app, ["finetune", "--model", str(model), "--max-length", "64", "--context", "64",
                                      "-o", str(out), *args])
    assert result.exit_code == 1
    assert "error:" in result.output and message in " ".join(result.output.split())
    assert not out.exists()  # nothing written; the model was never loaded
