"""Headroom, the real float16 run and the function-preserving rescale, on tiny models of every family."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import ALL_FAMILIES, BOS_ID, TEXT_FAMILIES, all_params_digest, build, sample_inputs, save_folder
from cardhouse.capture import hook_name, record
from cardhouse.models import load_model
from cardhouse.models.adapters import get
from cardhouse.precision import (FORMATS, RescaleError, cast_copy, choose_power, first_nonfinite, headroom,
                                 logits_change, margin_bits, plan_rescale, rescaled)
from cardhouse.precision.headroom import default_points
from cardhouse.precision.rescale import scaled_points

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Summer is warm."]
RESCALABLE = TEXT_FAMILIES + ["dinov2", "dinov2_swiglu"]


def tokens(lm):
    return [lm.encode(t) for t in TEXTS]


def boost(lm, factor: float = 200.0) -> None:
    """Give the tiny model a residual stream of a real model's size (~4 instead of ~0.02): the norms' eps
    then plays the small part it plays in real models (its effect is tested on its own below)."""
    with torch.no_grad():
        for path in lm.blocks.adapter.embeddings:
            target = get(lm.model, path)
            for t in [target] if isinstance(target, torch.Tensor) else [target.weight]:
                t.mul_(factor)


def outputs(lm, inputs):
    with torch.inference_mode():
        out = lm.model(**inputs)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    mask = inputs.get("attention_mask")
    # padded positions (a zero embedding: all eps) are no function of the prompt worth comparing
    return out[mask.bool()] if mask is not None else out.flatten(0, 1)


def plant_bos(lm, value: float, dim: int = 3) -> None:
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[BOS_ID, dim] = value


def test_margin_bits():
    assert margin_bits(FORMATS["float16"] / 4, FORMATS["float16"]) == pytest.approx(2.0)
    assert margin_bits(448 * 2, FORMATS["fp8_e4m3"]) == pytest.approx(-1.0)
    assert margin_bits(0.0, 1.0) == math.inf and margin_bits(math.inf, 1.0) == -math.inf
    assert FORMATS["float16"] == 65504.0 and FORMATS["fp8_e4m3"] == 448.0


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_headroom_matches_the_recorded_tensors(tiny, family):
    lm = tiny(family)
    toks = tokens(lm)
    room = headroom(lm, toks, progress=False)
    points = default_points(lm)
    assert len(room.points) == len(points) * len(lm.blocks)
    # reference: every tensor recorded on its own (one prompt at a time: no padding), max |a| taken directly
    names = [hook_name(layer, p) for layer in range(len(lm.blocks)) for p in points]
    expected = dict.fromkeys(names, 0.0)
    for ids in toks:
        with record(lm.model, names) as store, torch.inference_mode():
            lm.model.base_model(input_ids=torch.tensor([ids]), use_cache=False)
        for name in names:
            expected[name] = max(expected[name], float(store[name].abs().max()))
    for p in room.points:
        assert p.max_abs == pytest.approx(expected[hook_name(p.layer, p.point)], rel=1e-5), (p.layer, p.point)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_headroom_of_a_streamed_model_equals_the_ordinary_one(family, tmp_path):
    """Regression: the hooks once read the batch from a dict that ``hooks_for`` overwrote, but a streamed
    model runs every batch through a block before the next, so all batches saw the last one's."""
    lm = build(family)
    save_folder(lm, tmp_path)
    ordinary, streamed = load_model(str(tmp_path), bos=True), load_model(str(tmp_path), bos=True, stream=True)
    toks = [ordinary.encode(t) for t in TEXTS + ["A third prompt, longer than the second one."]]
    a = headroom(ordinary, toks, batch_size=1, progress=False).to_dict()
    b = headroom(streamed, toks, batch_size=1, progress=False).to_dict()
    assert a == b and {p["prompt"] for p in a["points"]} != {0}


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_planted_overflow_found_in_the_embedding_and_where_it_sits(family):
    lm = build(family)
    plant_bos(lm, 1e5)  # beyond float16's 65,504
    room = headroom(lm, tokens(lm), progress=False)
    worst = room.worst()
    assert worst.position == 0 and worst.token_id == BOS_ID and worst.margins()["float16"] < 0
    assert room.overflows("float16") and not room.overflows("bfloat16")
    run = first_nonfinite(lm, tokens(lm))
    assert not run.finite and run.unsupported is None
    assert run.first_module == lm.blocks.adapter.embeddings[0].rsplit(".", 1)[0]  # the embedding, first to run
    assert run.first_kind == "inf" and run.first_layer is None


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_float16_run_of_an_ordinary_model_is_finite_and_leaves_it_alone(tiny, family):
    lm = tiny(family)
    digest = all_params_digest(lm)
    run = first_nonfinite(lm, tokens(lm))
    assert run.finite and run.first_module is None and run.modules_nonfinite == 0, run
    assert all_params_digest(lm) == digest and next(lm.model.parameters()).dtype == torch.float32


def test_cast_copy_keeps_ties_and_the_original():
    lm = build("gemma3_text")
    low = cast_copy(lm.model, torch.float16)
    assert low.lm_head.weight is low.model.embed_tokens.weight and low.lm_head.weight.dtype == torch.float16
    assert lm.model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("family", RESCALABLE)
def test_rescale_keeps_the_function_and_restores_the_bits(family):
    lm = build(family)
    boost(lm)
    inputs = sample_inputs(lm)
    before, digest = outputs(lm, inputs), all_params_digest(lm)
    with rescaled(lm, 3) as plan:
        after = outputs(lm, inputs)
        assert all_params_digest(lm) != digest and plan.tensors
    assert all_params_digest(lm) == digest
    scale = float(before.abs().max())
    assert float((after - before).abs().max()) <= 1e-4 * scale, family
    # the residual stream really is divided by 8 (the hook points that scale with it)
    name = hook_name(len(lm.blocks) - 1, "hook_resid_post")
    with record(lm.model, [name]) as a:
        outputs(lm, inputs)
    with rescaled(lm, 3), record(lm.model, [name]) as b:
        outputs(lm, inputs)
    mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else slice(None)
    a, b = a[name][mask], b[name][mask]
    torch.testing.assert_close(b * 8, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()))


def test_rescale_restores_the_bits_when_the_body_raises():
    lm = build("gemma3_text")
    digest = all_params_digest(lm)
    with pytest.raises(KeyError):
        with rescaled(lm, 4):
            raise KeyError("boom")
    assert all_params_digest(lm) == digest


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_eps_is_what_changes_the_function(family):
    """The norms' eps meets a stream divided by 2^p sooner: on a tiny model whose stream is ~0.02 the change
    grows with p; on the same model with a real-sized stream it is orders of magnitude smaller."""
    small = build(family)
    changes = [logits_change(small, p, tokens(small))["relative"] for p in (1, 6)]
    assert changes[1] > 10 * changes[0]
    big = build(family)
    boost(big)
    assert logits_change(big, 6, tokens(big))["relative"] < changes[1] / 10


def test_planted_overflow_fixed_by_the_chosen_power():
    lm = build("llama")  # an untied head: a planted embedding of a tied one is a planted logit, too big as well
    plant_bos(lm, 1e5)
    toks = tokens(lm)
    assert not first_nonfinite(lm, toks).finite
    power, unfixed = choose_power(headroom(lm, toks, progress=False), scaled_points(lm), margin=2)
    assert power >= 3 and not unfixed
    with rescaled(lm, power):
        assert first_nonfinite(lm, toks).finite
        assert headroom(lm, toks, progress=False).worst().margins()["float16"] >= 2 - 1e-6


def test_rescale_refuses_a_norm_that_is_not_scale_invariant():
    lm = build("llama")
    lm.model.model.layers[1].input_layernorm = nn.Identity()
    digest = all_params_digest(lm)
    with pytest.raises(RescaleError, match="layer 1 input_layernorm .*depends on the scale of its input"):
        with rescaled(lm, 2):
            pass
    assert all_params_digest(lm) == digest


def test_rescale_refuses_a_tied_head_without_a_final_scale():
    lm = build("gpt2")
    lm.model.transformer.ln_f = nn.LayerNorm(32, elementwise_affine=False)
    with pytest.raises(RescaleError, match="no scale to compensate"):
        plan_rescale(lm, 2)


def test_rescale_refuses_a_family_the_table_does_not_describe():
    from dataclasses import replace

    lm = build("llama")
    adapter = replace(lm.blocks.adapter, writers=None)
    from unittest import mock

    with mock.patch("cardhouse.models.adapters.adapter_for", return_value=adapter), \
            mock.patch("cardhouse.models.adapters.Blocks.of", return_value=type(lm.blocks)(lm.model, adapter)):
        with pytest.raises(RescaleError, match="does not say what writes into"):
            plan_rescale(lm, 1)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_table_alone_says_where_the_rescale_is_refused(family):
    """``check_rescalable`` (the command line's check from the config, before any weight loads) refuses exactly
    the families whose loaded model the rescale refuses; post-norm BERT says why."""
    from cardhouse.precision.rescale import check_rescalable

    lm = build(family)
    try:
        check_rescalable(lm.blocks.adapter)
        from_table = None
    except RescaleError as e:
        from_table = str(e)
    try:
        plan_rescale(lm, 1)
        loaded = None
    except RescaleError as e:
        loaded = str(e)
    assert from_table == loaded
    assert (loaded is None) == (family in RESCALABLE)
    if family == "bert":
        assert "post-norm" in loaded and "change the function" in loaded


@pytest.mark.parametrize("power", [-1, 1.5])
def test_rescale_power_must_be_a_natural_number(power):
    with pytest.raises(ValueError, match="non-negative integer"):
        plan_rescale(build("llama"), power)


def test_tied_head_compensated_in_the_final_norm():
    lm = build("gemma3_text")
    plan = plan_rescale(lm, 2)
    assert plan.compensated == ["model.norm.weight"] and plan.norm_offset == 1.0
    assert any("post_feedforward_layernorm" in n for n in plan.norms)
    assert "model.embed_tokens.weight" in plan.tensors


# ---- the command line -------------------------------------------------------------------------------------------

from typer.testing import CliRunner  # noqa: E402

from cardhouse.cli import app  # noqa: E402

runner = CliRunner()


# bad input of `cardhouse precision`: tests/test_bad_input.py's table


def test_cli_precision_on_a_planted_overflow(tmp_path):
    from cardhouse.export import EDIT_FILE
    from cardhouse.results import validate

    lm = build("llama")
    plant_bos(lm, 1e5)
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    result = runner.invoke(app, ["precision", "-m", str(tmp_path / "model"), "--limit", "4", "--rescale",
                                 "-o", str(tmp_path / "out"), "--export", str(tmp_path / "fixed")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "precision.json").read_text())
    validate(data)
    validate(data, "precision")
    r = data["results"]
    assert not r["run"]["finite"] and r["run"]["first_module"] == "model.embed_tokens"
    assert r["rescale"]["plan"]["power"] == 3 and r["rescale"]["after"]["run"]["finite"]
    assert (tmp_path / "out" / "precision.png").stat().st_size > 10_000
    edit = json.loads((tmp_path / "fixed" / EDIT_FILE).read_text())["results"]["edit"]
    assert edit["kind"] == "rescale" and edit["power"] == 3
