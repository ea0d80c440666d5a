"""Perplexity: window layout, agreement with a hand computation, overflow, corpus plumbing."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from cardhouse.data.corpora import CORPORA, Corpus
from cardhouse.evaluation import build_windows, perplexity
from cardhouse.evaluation.measure import Budget, measurer
from cardhouse.models.loading import from_pretrained_objects

VOCAB = 128  # covers the shared character tokenizer (about 100 ids)
BOS = 1


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def corpus_ids() -> torch.LongTensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (103,), generator=generator)  # ids >= 3: no BOS inside the corpus


def test_windows_put_bos_first_and_drop_the_tail():
    token_ids = torch.arange(10, 33)  # 23 corpus tokens
    windows = build_windows(token_ids, context=6, bos_id=BOS)
    # 5 corpus tokens per window: 4 full windows use 20 tokens, the last 3 are dropped
    assert windows.shape == (4, 6)
    assert windows[:, 0].tolist() == [BOS] * 4
    assert windows[:, 1:].flatten().tolist() == list(range(10, 30))


def test_windows_without_bos_are_plain_corpus_slices():
    windows = build_windows(torch.arange(10, 33), context=6, bos_id=None)
    assert windows.shape == (3, 6)
    assert windows.flatten().tolist() == list(range(10, 28))


def test_max_tokens_caps_the_corpus_prefix():
    windows = build_windows(torch.arange(10, 33), context=6, bos_id=BOS, max_tokens=11)
    assert windows.tolist() == [[BOS, 10, 11, 12, 13, 14], [BOS, 15, 16, 17, 18, 19]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(token_ids=torch.arange(4), context=6), "do not fill one window"),
    (dict(token_ids=torch.arange(40), context=1), "at least 2"),
    (dict(token_ids=torch.arange(40).reshape(4, 10), context=6), "1-D"),
])
def test_bad_window_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_windows(bos_id=BOS, **kwargs)


def hand_nll(model, corpus: list[int], context: int) -> tuple[float, int]:
    """Each window [BOS, c0..c_{k-1}] scores every corpus token c_j given BOS and c_0..c_{j-1}."""
    per_window = context - 1
    total, count = 0.0, 0
    for start in range(0, len(corpus) - per_window + 1, per_window):
        chunk = corpus[start : start + per_window]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([[BOS] + chunk])).logits[0].double(), dim=-1)
        for j, token in enumerate(chunk):
            total -= log_probs[j, token].item()  # position j has seen BOS and chunk[:j]
            count += 1
    return total, count


def test_perplexity_is_exp_of_the_hand_computed_mean_nll(model, corpus_ids):
    result = perplexity(model, corpus_ids, context=10, bos_id=BOS, batch_size=3, progress=False)
    nll, count = hand_nll(model, corpus_ids.tolist(), context=10)
    assert (result.n_windows, result.n_predicted_tokens, result.context) == (11, 99, 10)  # 103 // 9 = 11 windows
    assert result.n_predicted_tokens == count
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result.to_dict() == dict(ppl=result.ppl, nll_sum=result.nll_sum, n_predicted_tokens=99, n_windows=11,
                                    context=10)


def test_bos_is_fed_but_never_predicted(model, corpus_ids):
    seen_inputs = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen_inputs.append(kwargs["input_ids"]),
                                           with_kwargs=True)
    try:
        result = perplexity(model, corpus_ids, context=10, bos_id=BOS, batch_size=4, progress=False)
    finally:
        hook.remove()
    inputs = torch.cat(seen_inputs)
    assert inputs[:, 0].tolist() == [BOS] * result.n_windows
    assert inputs[:, 1:].flatten().tolist() == corpus_ids[:99].tolist()
    # predicted tokens = inputs[:, 1:]: all corpus tokens, no BOS among them
    assert result.n_predicted_tokens == inputs[:, 1:].numel() and BOS not in inputs[:, 1:]


def test_batch_size_does_not_change_the_result(model, corpus_ids):
    one = perplexity(model, corpus_ids, context=10, bos_id=BOS, batch_size=1, progress=False)
    many = perplexity(model, corpus_ids, context=10, bos_id=BOS, batch_size=8, progress=False)
    assert many.nll_sum == pytest.approx(one.nll_sum, rel=1e-6)


def test_every_model_variant_is_scored_on_the_same_tokens(model, corpus_ids):
    clean = perplexity(model, corpus_ids, context=10, bos_id=BOS, progress=False)
    other = perplexity(tiny_llama(seed=1), corpus_ids, context=10, bos_id=BOS, progress=False)
    assert (clean.n_windows, clean.n_predicted_tokens) == (other.n_windows, other.n_predicted_tokens)
    assert clean.ppl != other.ppl


def test_without_bos_the_first_token_of_each_window_is_context_only(model, corpus_ids):
    result = perplexity(model, corpus_ids, context=10, bos_id=None, progress=False)
    assert (result.n_windows, result.n_predicted_tokens) == (10, 90)


@pytest.mark.parametrize("break_head", [
    lambda head: head.weight.mul_(1e30),  # finite but enormous logits: exp(mean NLL) overflows
    lambda head: head.weight.fill_(float("inf")),  # inf logits: the NLL is nan
])
def test_overflowing_model_gives_inf_without_raising(corpus_ids, break_head):
    broken = tiny_llama()
    with torch.no_grad():
        break_head(broken.lm_head)
    result = perplexity(broken, corpus_ids, context=10, bos_id=BOS, progress=False)
    assert result.ppl == float("inf")
    assert result.n_predicted_tokens == 99


def test_the_measurer_uses_the_cached_corpus_tokens(model, tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("CARDHOUSE_CACHE", str(tmp_path))
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 3
    monkeypatch.setitem(CORPORA, "tiny", Corpus("tiny", "test text", "this test", lambda: text))
    lm = from_pretrained_objects(model, tokenizer, name="tiny", bos=True)
    assert lm.bos_id == BOS
    results = measurer(lm, Budget(corpora=["tiny"], context=16, max_tokens=200), progress=False)(lm)
    token_ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:200])
    expected = perplexity(model, token_ids, context=16, bos_id=BOS, progress=False)
    assert results == {"ppl_tiny": pytest.approx(expected.ppl, rel=1e-6), "tokens_tiny": 13 * 15}  # 200 // 15 windows
    assert len(list((tmp_path / "tokens").iterdir())) == 1


def test_the_budget_rejects_an_unknown_corpus_first():
    with pytest.raises(ValueError, match="unknown corpus 'pg19'"):
        Budget(corpora=["c4", "pg19"], context=16)


@pytest.mark.real
def test_smollm2_perplexities_on_real_text():
    from cardhouse.models import load_model

    lm = load_model("smollm2-135m")
    results = measurer(lm, Budget(corpora=["wikipedia", "c4", "austen"], context=512, max_tokens=1022),
                       progress=False)(lm)
    # measured on 2026-11-23 (float32, CPU): 2 windows of [BOS] + 511 tokens per corpus
    expected = {"wikipedia": 24.003, "c4": 25.484, "austen": 27.046}
    for name, ppl in expected.items():
        assert results[f"tokens_{name}"] == 1022
        assert results[f"ppl_{name}"] == pytest.approx(ppl, rel=2e-3), name
