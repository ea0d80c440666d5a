"""The massive activation off position 0 (issue 15): models trained without BOS (Qwen2.5) put it on the
first delimiter or first word. The massive-weight search must follow the token that carries it, and
the BOS default must follow what the tokenizer says the model saw in training."""

from __future__ import annotations

import pytest
import torch
from conftest import SANDWICH_FAMILIES, TEXT_FAMILIES, build, build_tokenizer, forward, plant_neuron

from cardhouse.analysis import find_massive_weights, scan
from cardhouse.capture import hook_name, record
from cardhouse.models.loading import default_bos, from_pretrained_objects

DISTINCT = 3  # the embedding dimension that makes "." recognisable to the planted neuron


def plant_on_delimiter(lm, layer: int = 0, neuron: int = 5, dim: int = 7, scale: float = 12.0, down: float = 100.0):
    """Make FFN neuron ``neuron`` of ``layer`` fire hugely on every "." token and write into ``dim``:
    "."'s embedding becomes one distinct direction, the neuron's W_gate/W_up rows read that direction."""
    dot = lm.tokenizer.convert_tokens_to_ids(".")
    embedding = lm.model.get_input_embeddings().weight
    with torch.no_grad():
        embedding[dot] = 0.0
        embedding[dot, DISTINCT] = 1.0
    ids = lm.encode("Summer is warm.")
    assert ids[-1] == dot and ids[0] != dot
    name = hook_name(layer, "mlp.hook_in")
    with record(lm.model, [name]) as store:
        forward(lm, {"input_ids": torch.tensor([ids]), "use_cache": False})
    x = store[name][0, -1].clone()
    plant_neuron(lm, x / x.norm(), layer=layer, neuron=neuron, dim=dim, scale=scale, down=down)
    return dot


def plant_delimiter_embedding(lm, dim: int = 7, value: float = 1e4) -> int:
    """A huge "." embedding entry: a massive activation on every "." in every layer (for sandwich-norm
    models, whose post-FFN norm hides how large one token's FFN output is)."""
    dot = lm.tokenizer.convert_tokens_to_ids(".")
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[dot, dim] = value
    return dot


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_massive_weights_follow_a_delimiter_carrier(family, tokenizer):
    """No BOS, the massive activation planted on "." (not on position 0): the search must find the
    planted layer, dimension and neuron through the "." tokens, and say so."""
    lm = build(family, tokenizer)
    lm.bos = False
    sandwich = family in SANDWICH_FAMILIES
    plant_delimiter_embedding(lm) if sandwich else plant_on_delimiter(lm)
    result = scan(lm, progress=False)
    assert 7 in result.dims
    mw = find_massive_weights(lm, k=3)
    assert mw.massive and mw.dim == 7
    assert mw.carrier["token"] == "." and all(p > 0 for p in mw.carrier["positions"])
    assert sum(mw.carrier["roles"].values()) == 8 and "first token" not in mw.carrier["roles"]
    assert any("not on position 0" in note for note in mw.notes)
    if not sandwich:  # the planted FFN neuron is what writes it
        assert (mw.layer, mw.indices[0]) == (0, 5) and abs(mw.activations[0]) > 10 * abs(mw.activations[1])
        assert mw.super_weight["row"] == 7 and mw.super_weight["column"] == 5
        assert mw.trace[0]["ffn"] > 1000


def test_position_zero_stays_the_carrier_when_it_is_massive(tokenizer):
    """With BOS carrying the massive activation, nothing moves (the documented SmolLM2 behaviour)."""
    from conftest import plant_massive_weight

    lm = build("llama", tokenizer)
    plant_massive_weight(lm, layer=0, neuron=5, dim=7)
    mw = find_massive_weights(lm, k=3)
    assert mw.carrier["positions"] == [0] * 8 and mw.carrier["token"] == "<bos>"
    assert mw.carrier["roles"] == {"bos": 8} and (mw.layer, mw.dim, mw.indices[0]) == (0, 7, 5)


def test_no_massive_activation_keeps_position_zero(tiny):
    mw = find_massive_weights(tiny("llama"), k=2)
    assert not mw.massive and mw.carrier["positions"] == [0] * 8


# ---- the BOS default ------------------------------------------------------------------------------


def test_bos_default_follows_the_tokenizer():
    tok = build_tokenizer()  # a BOS token, add_bos_token False, no chat template: nothing says no
    assert default_bos(tok)
    tok.chat_template = "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{% endfor %}"
    assert default_bos(tok)  # the chat format it was trained on opens with BOS (SmolLM2's <|im_start|>)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert not default_bos(tok)  # its training format has no BOS first
    tok.chat_template = None
    tok.add_bos_token = True  # Gemma's tokenizer adds it when encoding
    assert default_bos(tok)
    tok = build_tokenizer()
    tok.bos_token = None  # Qwen2.5: no BOS token at all
    assert not default_bos(tok)


def test_bos_override_and_default_on_a_loaded_model(tokenizer):
    from conftest import build_text_model

    model = build_text_model("qwen2")
    assert from_pretrained_objects(model, tokenizer).bos_id == tokenizer.bos_token_id
    qwen_like = build_tokenizer()
    qwen_like.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
    assert from_pretrained_objects(model, qwen_like).bos_id is None  # what the tokenizer says
    assert from_pretrained_objects(model, qwen_like, bos=True).bos_id == qwen_like.bos_token_id  # --bos


def test_the_weights_table_claims_by_construction_only_for_bos(tokenizer):
    # regression: with --no-bos the scan printed "the same in every prompt: False (position 0 sees only itself
    # under causal attention, so this holds by construction)" and titled the table "BOS intermediate indices"
    from rich.console import Console

    from cardhouse.reports.tables import weights_table

    from dataclasses import replace

    lm = build("llama", tokenizer)
    lm.bos = False
    plant_on_delimiter(lm)
    found = find_massive_weights(lm, k=3)  # carried by "." (first delimiter), not BOS
    for mw, bos in ((found, False), (replace(found, carrier={**found.carrier, "roles": {"bos": 8}}), True)):
        console = Console(record=True, width=300)
        weights_table(mw, console)
        text = console.export_text()
        assert ("by construction" in text) == bos and ("BOS intermediate indices" in text) == bos
