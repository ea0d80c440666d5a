"""A MacDrop-fine-tuned adapter through ``cardhouse longctx`` and ``cardhouse generate`` (issue 16).

``cardhouse finetune`` writes a PEFT adapter to OUT/adapter; both commands take it with ``--adapter``
and measure it alone and under the attack, beside the original model, the attack and its control.
The adapter rows must be the numbers of the merged adapter measured directly, and the adapter must
really be in them (its weights differ from the base model's).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from test_lm_backend import long_lm

from cardhouse.cli import app
from cardhouse.cli.evaluate import with_adapter
from cardhouse.evaluation import longctx
from cardhouse.finetuning import generation
from cardhouse.finetuning.macdrop import MacDropConfig
from cardhouse.finetuning.train import FinetuneConfig, finetune
from cardhouse.interventions import weights_digest
from cardhouse.models import load_model

VARIANTS = ["original", "topk-zero k=2", "random-zero k=2", "adapter ft: original", "adapter ft: topk-zero k=2"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(model folder, MacDrop adapter folder): a tiny llama with 512 positions, fine-tuned 3 steps with MacDrop."""
    root = tmp_path_factory.mktemp("macdrop-eval")
    lm = long_lm("llama")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    records = root / "records.jsonl"
    records.write_text("\n".join(json.dumps({"instruction": f"Name colour {i}.", "input": "",
                                             "output": ["red", "green", "blue", "gold"][i % 4]}) for i in range(24)))
    config = FinetuneConfig(data=str(records), batch_size=4, grad_accum=1, max_steps=3, max_length=200, lr=1e-2,
                            save_steps=3, logging_steps=1, rank=4, lora_alpha=8)
    result = finetune(load_model(str(root / "model"), bos=True), config, MacDropConfig(layer=0, rows=[1, 2, 3], p0=0.9),
                      out=root / "ft", progress=False, evaluate_before=False)
    assert result.steps == 3
    return root / "model", root / "ft" / "adapter"


def rows_of(path):
    return {row["variant"]: row for row in json.loads(path.read_text())["results"]}


def test_the_merged_adapter_is_not_the_base_model(tuned):
    folder, adapter = tuned
    lm = load_model(str(folder), bos=True)
    assert weights_digest(list(with_adapter(lm, adapter).model.parameters())) != weights_digest(list(lm.model.parameters()))
    assert weights_digest(list(lm.model.parameters())) == weights_digest(list(load_model(str(folder), bos=True).model.parameters()))


def test_longctx_measures_the_macdrop_adapter_alone_and_attacked(tuned, tmp_path):
    folder, adapter = tuned
    args = ["longctx", "-m", str(folder), "--lengths", "320", "--depths", "0,1", "--n", "1", "--k", "2",
            "--kind", "passkey", "--max-new-tokens", "3", "--adapter", str(adapter), "-o", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = rows_of(tmp_path / "longctx.json")
    assert list(rows) == VARIANTS
    assert json.loads((tmp_path / "longctx.json").read_text())["settings"]["adapters"] == [str(adapter)]
    lm = load_model(str(folder), bos=True)
    items = longctx.build_items(lm, ["passkey"], [320], [0.0, 1.0], 1, corpus="austen", seed=0, max_new_tokens=3)
    direct = longctx.measurer(lm, items, max_new_tokens=3)(with_adapter(lm, adapter))
    assert rows["adapter ft: original"]["answers"] == direct["answers"]
    assert rows["adapter ft: original"]["adapter"] == str(adapter)


def test_generate_measures_the_macdrop_adapter_alone_and_attacked(tuned, tmp_path):
    folder, adapter = tuned
    args = ["generate", "-m", str(folder), "--n", "2", "--max-new-tokens", "4", "--k", "2", "--adapter", str(adapter),
            "-o", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = rows_of(tmp_path / "generation.json")
    assert list(rows) == VARIANTS
    lm = load_model(str(folder), bos=True)
    direct = generation.measurer(generation.held_out_records(2), 4)(with_adapter(lm, adapter))
    got = rows["adapter ft: original"]
    assert got["answers"] == direct["answers"]
    assert got["ref_loglik_per_token"] == pytest.approx(direct["ref_loglik_per_token"], abs=1e-6)
    # the fine-tuned weights change what the model assigns to the references
    assert abs(got["ref_loglik_per_token"] - rows["original"]["ref_loglik_per_token"]) > 1e-3


def test_several_adapters_get_one_pair_of_rows_each(tuned, tmp_path):
    """``--adapter`` repeats (LoRA with and without MacDrop in one run); each adapter is named by its run folder."""
    import shutil

    folder, adapter = tuned
    shutil.copytree(adapter, tmp_path / "ft-copy" / "adapter")
    args = ["longctx", "-m", str(folder), "--lengths", "320", "--depths", "1", "--n", "1", "--k", "2",
            "--kind", "passkey", "--max-new-tokens", "3", "--adapter", str(adapter),
            "--adapter", str(tmp_path / "ft-copy" / "adapter"), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = rows_of(tmp_path / "out" / "longctx.json")
    assert list(rows) == VARIANTS + ["adapter ft-copy: original", "adapter ft-copy: topk-zero k=2"]
    for variant in ("original", "topk-zero k=2"):  # the same adapter twice: the same answers
        assert rows[f"adapter ft-copy: {variant}"]["answers"] == rows[f"adapter ft: {variant}"]["answers"]


def test_two_adapters_with_the_same_name_are_refused_before_the_model_loads(tuned, tmp_path):
    import shutil

    folder, adapter = tuned
    shutil.copytree(adapter, tmp_path / "other" / "ft" / "adapter")
    result = CliRunner().invoke(app, ["generate", "-m", str(folder), "--adapter", str(adapter),
                                      "--adapter", str(tmp_path / "other" / "ft" / "adapter"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "error:" in result.output and "same name" in result.output, result.output
    assert not (tmp_path / "o").exists()
