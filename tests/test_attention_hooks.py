"""The attention hook points (cardhouse/capture/attention.py) on tiny random models of every family in the
adapter table: the same probabilities and outputs as the model's own eager attention, the documented
shapes, replacement, and nothing left behind after the context, also on error."""

from __future__ import annotations

import copy

import pytest
import torch

from cardhouse.capture import ATTENTION_POINTS, hook_name, hooks, parse_hook_name, record
from cardhouse.capture.attention import _ACTIVE, IMPLEMENTATION
from cardhouse.models.adapters import UnsupportedModelError
from conftest import N_LAYERS, build, sample_inputs

LAST = N_LAYERS - 1


def _eager(lm, inputs):
    """The model's own eager attention: its probabilities (``output_attentions``) and last hidden state.

    Run on a copy: transformers records the attentions with forward hooks it leaves in place, and the
    tiny models are shared by the session (tests/test_families.py checks that no hook is left)."""
    model = copy.deepcopy(lm.model)
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        out = model.base_model(**inputs, output_attentions=True)
    return out.attentions, out.last_hidden_state


def _hooked(lm, inputs, names):
    with torch.inference_mode(), record(lm.model, names) as store:
        out = lm.model.base_model(**inputs)
    return store, out.last_hidden_state


def _clean(lm, before):
    return lm.model.config._attn_implementation == before and not _ACTIVE


def test_attention_points_parse():
    for point in ATTENTION_POINTS:
        assert parse_hook_name(f"blocks.3.{point}") == (3, point)
    with pytest.raises(ValueError, match="attn.hook_pattern"):  # the error lists them
        parse_hook_name("blocks.0.attn.hook_z")


def test_pattern_equals_the_models_own_eager_attention(lm):
    """Every family in the adapter table: probabilities within 1e-5 of ``output_attentions=True`` under eager
    attention, rows summing to 1, and the model's output unchanged."""
    inputs = sample_inputs(lm)
    weights, expected = _eager(lm, inputs)
    names = [hook_name(layer, "attn.hook_pattern") for layer in range(N_LAYERS)]
    store, hidden = _hooked(lm, inputs, names)
    for layer, name in enumerate(names):
        assert store[name].shape == weights[layer].shape
        assert (store[name] - weights[layer]).abs().max() <= 1e-5
        assert torch.allclose(store[name].sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(hidden, expected, atol=1e-6)


def test_shapes_and_scores(lm):
    inputs = sample_inputs(lm)
    names = {p: hook_name(LAST, p) for p in ATTENTION_POINTS}
    store, _ = _hooked(lm, inputs, names.values())
    n_heads, n_kv_heads = lm.blocks.heads
    q, k, v = (store[names[f"attn.hook_{x}"]] for x in "qkv")
    batch, pos = q.shape[0], q.shape[2]
    assert q.shape[:3] == (batch, n_heads, pos) and k.shape[:3] == v.shape[:3] == (batch, n_kv_heads, pos)
    assert q.shape[-1] == k.shape[-1]
    scores, pattern = store[names["attn.hook_scores"]], store[names["attn.hook_pattern"]]
    assert scores.shape == pattern.shape == (batch, n_heads, pos, pos)
    # the logits are what the softmax saw
    assert torch.allclose(torch.softmax(scores.float(), -1), pattern.float(), atol=1e-6)
    if lm.inputs == "causal":  # the model's own causal mask is in the scores
        future = torch.ones(pos, pos, dtype=torch.bool).triu(1)
        assert (scores[:, :, future] < torch.finfo(scores.dtype).min / 2).all()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "deepseek_v3", "gpt2", "bert"])
def test_scores_are_scaled_query_key_products(tiny, family):
    """hook_scores = q k^T * scaling (soft-capped for Gemma-2) where visible: q and k after q/k norms and rotary."""
    lm = tiny(family)
    inputs = sample_inputs(lm)
    names = {p: hook_name(LAST, p) for p in ATTENTION_POINTS}
    store, _ = _hooked(lm, inputs, names.values())
    q, k = store[names["attn.hook_q"]], store[names["attn.hook_k"]]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # query head h reads kv head h // group
    attn = next(m for m in lm.blocks.part(LAST, "attn").modules() if hasattr(m, "scaling"))
    expected = q @ k.transpose(-1, -2) * attn.scaling
    cap = getattr(lm.model.config, "attn_logit_softcapping", None)
    if cap:
        expected = torch.tanh(expected / cap) * cap
    scores = store[names["attn.hook_scores"]]
    seen = scores > torch.finfo(scores.dtype).min / 2
    assert torch.allclose(scores[seen], expected[seen], atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "bert", "dinov2", "llama", "gemma3_text"])
def test_bfloat16_probabilities_are_bit_identical(family):
    """The adapter table says where the softmax runs in float32 (GPT-2, BERT and DINOv2 do not upcast)."""
    lm = build(family)
    lm.model.to(torch.bfloat16)
    inputs = sample_inputs(lm)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    weights, expected = _eager(lm, inputs)
    names = [hook_name(layer, "attn.hook_pattern") for layer in range(N_LAYERS)]
    store, hidden = _hooked(lm, inputs, names)
    assert all(torch.equal(store[name], weights[layer]) for layer, name in enumerate(names))
    assert torch.equal(hidden, expected)


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_sliding_windows_come_from_the_models_mask(family):
    window = 4
    overrides = {"sliding_window": window} | ({"layer_types": ["sliding_attention"] * N_LAYERS}
                                             if family == "gemma3_text" else {})
    from transformers import AutoModelForCausalLM

    from cardhouse.models.loading import from_pretrained_objects
    from conftest import build_tokenizer, text_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(text_config(family, **overrides)).eval()
    lm = from_pretrained_objects(model, build_tokenizer(), name=f"tiny-{family}", bos=True)
    inputs = sample_inputs(lm)
    weights, _ = _eager(lm, inputs)
    store, _ = _hooked(lm, inputs, [hook_name(0, "attn.hook_pattern")])
    pattern = store[hook_name(0, "attn.hook_pattern")]
    assert (pattern - weights[0]).abs().max() <= 1e-5
    pos = pattern.shape[-1]
    outside = torch.ones(pos, pos, dtype=torch.bool).tril(-window)  # keys `window` or more positions back
    full = pattern[0]  # the unpadded prompt (a padded query that sees no key gets a uniform row)
    assert full[:, outside].abs().max() == 0 and full[:, ~outside].abs().max() > 0


def test_replacing_values_and_patterns_changes_the_output(tiny):
    lm = tiny("llama")
    inputs = sample_inputs(lm)
    out = hook_name(LAST, "hook_attn_out")
    with torch.inference_mode(), record(lm.model, [out]) as plain:
        lm.model.base_model(**inputs)
    with torch.inference_mode(), hooks(lm.model, {hook_name(LAST, "attn.hook_v"): lambda n, v: torch.zeros_like(v)}), \
            record(lm.model, [out]) as zeroed:
        lm.model.base_model(**inputs)
    assert zeroed[out].abs().max() == 0 and plain[out].abs().max() > 0  # llama's o_proj has no bias

    def uniform(name, pattern):  # every query attends evenly to key 0 and itself
        new = torch.zeros_like(pattern)
        idx = torch.arange(pattern.shape[-1])
        new[..., idx, idx] += 0.5
        new[..., 0] += 0.5
        return new

    with torch.inference_mode(), hooks(lm.model, {hook_name(LAST, "attn.hook_pattern"): uniform}), \
            record(lm.model, [out, hook_name(LAST, "attn.hook_pattern")]) as changed:
        lm.model.base_model(**inputs)
    assert not torch.allclose(changed[out], plain[out])
    seen = changed[hook_name(LAST, "attn.hook_pattern")]  # record, attached after, sees the replacement
    assert torch.equal(seen, uniform(None, seen))


def test_recorded_tensors_are_detached(tiny):
    lm = tiny("llama")
    inputs = sample_inputs(lm)
    names = [hook_name(0, p) for p in ATTENTION_POINTS]
    with torch.enable_grad(), record(lm.model, names) as store:
        lm.model.base_model(**inputs)
    assert all(not store[n].requires_grad and store[n].grad_fn is None for n in names)


def test_hooks_are_removed_after_the_context_also_on_error(tiny):
    lm = tiny("llama")
    before = lm.model.config._attn_implementation
    calls = []
    fn = lambda name, x: calls.append(name)  # noqa: E731
    with hooks(lm.model, {hook_name(0, "attn.hook_pattern"): fn, hook_name(1, "attn.hook_q"): fn}):
        assert lm.model.config._attn_implementation == IMPLEMENTATION
        lm.model.base_model(**sample_inputs(lm))
    assert calls == [hook_name(0, "attn.hook_pattern"), hook_name(1, "attn.hook_q")]
    assert _clean(lm, before)
    with pytest.raises(RuntimeError, match="boom"), hooks(lm.model, {hook_name(0, "attn.hook_k"): fn}):
        raise RuntimeError("boom")
    assert _clean(lm, before)

    def failing(name, x):
        raise ValueError("inside the forward")

    with pytest.raises(ValueError, match="inside the forward"), \
            hooks(lm.model, {hook_name(1, "attn.hook_scores"): failing}):
        lm.model.base_model(**sample_inputs(lm))
    assert _clean(lm, before)
    calls.clear()
    lm.model.base_model(**sample_inputs(lm))
    assert calls == []


def test_nested_contexts_both_fire_and_the_outer_restores(tiny):
    lm = tiny("llama")
    before = lm.model.config._attn_implementation
    name = hook_name(0, "attn.hook_pattern")
    with record(lm.model, [name]) as outer:
        with record(lm.model, [name]) as inner:
            lm.model.base_model(**sample_inputs(lm))
        assert lm.model.config._attn_implementation == IMPLEMENTATION and _ACTIVE
    assert torch.equal(outer[name], inner[name]) and _clean(lm, before)


def test_a_layer_out_of_range_attaches_nothing(tiny):
    lm = tiny("llama")
    before = lm.model.config._attn_implementation
    with pytest.raises(IndexError, match="out of range"), \
            hooks(lm.model, {hook_name(0, "attn.hook_q"): print, hook_name(N_LAYERS, "attn.hook_q"): print}):
        pass
    assert _clean(lm, before)


def test_a_model_without_the_attention_interface_is_refused(tokenizer):
    from cardhouse.emergence.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=300, n_layer=2, n_head=4, n_embd=32)).eval()  # cardhouse's own decoder
    with pytest.raises(UnsupportedModelError, match="AttentionInterface"), \
            hooks(model, {hook_name(0, "attn.hook_pattern"): print}):
        pass
    assert not _ACTIVE


def test_a_streamed_model_gives_the_same_attention_analysis(tmp_path, tokenizer):
    """Block by block from the checkpoint (models/streaming.py), the hook points fire while each block runs."""
    from cardhouse.analysis.attention import analyze_attention
    from cardhouse.models import load_model
    from cardhouse.models.streaming import streamer_of
    from conftest import plant_bos_embedding

    lm = build("llama", tokenizer)
    plant_bos_embedding(lm)
    lm.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ordinary, streamed = load_model(str(tmp_path), bos=True), load_model(str(tmp_path), bos=True, stream=True)
    assert streamer_of(streamed.model) is not None
    prompts = ["The quick brown fox. It jumps over the lazy dog.", "Summer is warm, winter is cold."]
    a, b = (analyze_attention(m, prompts, batch_size=1, progress=False) for m in (ordinary, streamed))
    assert a.massive_positions == b.massive_positions == [[0], [0]]
    for x, y in zip(a.layers, b.layers):
        assert x["concentration"] == pytest.approx(y["concentration"], abs=1e-6)
        assert x["sink"].keys() == y["sink"].keys()
        assert all(x["sink"][g] == pytest.approx(y["sink"][g], abs=1e-6) for g in x["sink"])
        assert x["update"]["cos_c_all"] == pytest.approx(y["update"]["cos_c_all"], abs=1e-6)
    assert not _ACTIVE and streamed.model.config._attn_implementation == ordinary.model.config._attn_implementation
