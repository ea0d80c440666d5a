"""The super weight as Yu et al. define it, on tiny random models with super weights planted.

The detection must pick the coordinate where the down projection's input and output spikes
meet, not the largest entry of the massive row; damage must follow contribution, not size."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from conftest import (BOS_ID, MOE_FAMILIES, SANDWICH_FAMILIES, TEXT_FAMILIES, VARIANTS, VISION_FAMILIES,
                      all_params_digest, build, plant_massive_weight)
from cardhouse.analysis.super_weight import check_coordinate, find_super_weights
from cardhouse.interventions import weights_digest
from cardhouse.interventions.activations import pin_ffn_output
from cardhouse.interventions.damage import Candidate, candidates, check_pairs, rank_damage
from cardhouse.interventions.weights import zero_down_line
from cardhouse.models.adapters import UnsupportedModelError

DENSE = [f for f in TEXT_FAMILIES if f not in MOE_FAMILIES]
DEEP = 5  # layers: the spike criterion compares a layer with the median over layers, so it needs a few
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Summer is warm.", "A cat sat on the mat today.",
           "Numbers: 1, 2, 3 and 4."]
ROW, HUGE, QUIET = 7, 5, 9  # the massive row; a channel with a huge input; one with a tiny input
SIGNAL = 11  # the hidden dim only BOS's embedding has


def plant_both(lm, layer: int = 0, scale: float = 40.0) -> None:
    """In one massive row: a modest weight on a channel whose input is huge (the super weight), and a
    ten times larger weight on a channel whose input is tiny (the row's largest entry).

    The huge channel reads hidden dim ``SIGNAL``, which only BOS's embedding has (as a real super
    weight's channel fires only on the first token), so its super activation sits on BOS alone."""
    tables = [lm.model.get_input_embeddings().weight]
    wpe = getattr(lm.model.base_model, "wpe", None)  # GPT-2's position embeddings
    tables += [wpe.weight] if wpe is not None else []
    centred = isinstance(lm.blocks.part(0, "resid_mid_norm"), torch.nn.LayerNorm)  # GPT-2 subtracts the mean
    with torch.no_grad():
        for table in tables:
            table.mul_(50.0)  # unit-scale embeddings: the norms then do not amplify what attention leaks from BOS
            others = torch.cat([table[:, :SIGNAL], table[:, SIGNAL + 1:]], 1)
            table[:, SIGNAL] = others.mean(1) if centred else 0.0  # zero after the norm, on every token
        tables[0][BOS_ID, SIGNAL] += 50.0
    unit = torch.zeros(lm.model.config.hidden_size)
    unit[SIGNAL] = 1.0
    with torch.no_grad():
        for neuron, size, down in ((HUGE, scale, 5.0), (QUIET, 0.01, 50.0)):
            for tensor, axis, offset in lm.blocks.neuron_slices(layer):
                row = tensor.select(axis, offset + neuron)
                row.copy_(size * unit if row.dim() == 1 else torch.zeros(()))
            lm.blocks.down_weight(layer)[ROW, neuron] = down


def self_perplexity(lm):
    """A damage measure for random models: perplexity of the edited model on the original model's own
    greedy predictions (1 = the edit changes nothing the model says)."""
    ids = torch.stack([torch.tensor(([BOS_ID] + lm.tokenizer(p, add_special_tokens=False)["input_ids"] * 3)[:40])
                       for p in PROMPTS])
    with torch.inference_mode():
        labels = lm.model(input_ids=ids, use_cache=False).logits.argmax(-1)

    def measure(model):
        with torch.inference_mode():
            logits = model.model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"ppl_self": float(loss.exp())}

    return measure


@pytest.mark.parametrize("family", DENSE)
def test_detector_picks_the_huge_input_not_the_largest_entry(family, tokenizer):
    lm = build(family, tokenizer, n_layers=DEEP)
    plant_both(lm)
    scan = find_super_weights(lm, PROMPTS)
    assert [sw.layer for sw in scan.super_weights] == [0]
    sw = scan.super_weights[0]
    assert (sw.row, sw.column) == (ROW, HUGE)
    assert sw.value == pytest.approx(5.0) and sw.carrier["position"] == 0 and sw.same_token
    assert sw.largest_down_entry["column"] == QUIET and sw.largest_down_entry["value"] == pytest.approx(50.0)
    assert sw.contributions[0]["channel"] == HUGE and sw.share > 0.9  # it writes the super activation
    assert abs(sw.largest_down_entry["share"]) < 0.05 * sw.share
    shares = [abs(c["contribution"]) for c in sw.contributions]
    assert shares == sorted(shares, reverse=True)
    layer0 = scan.layers[0]
    assert layer0["spike"] and layer0["input_channel"] == HUGE and layer0["output_dim"] == ROW
    assert not any(row["spike"] for row in scan.layers[1:])


@pytest.mark.parametrize("family", DENSE)
def test_damage_follows_contribution_not_size_and_weights_are_restored(family, tokenizer):
    lm = build(family, tokenizer, n_layers=DEEP)
    plant_both(lm)
    sw = find_super_weights(lm, PROMPTS).super_weights[0]
    digest = all_params_digest(lm)
    result = rank_damage(lm, [sw], self_perplexity(lm), n=2, controls=2, pairs=2)
    assert all_params_digest(lm) == digest
    by_column = {r["column"]: r for r in result["candidates"] if r["kind"] == "scalar" and r["row"] == ROW}
    super_, largest = by_column[HUGE], by_column[QUIET]
    assert super_["name"] == "super weight" and "largest down entry" in largest["name"]
    # random models predict almost uniformly, so damage is small in absolute terms; what matters is the order
    assert super_["damage"] > 1.005 and super_["damage"] - 1 > 5 * abs(largest["damage"] - 1)
    assert all(abs(r["damage"] - 1) < 0.005 for r in result["candidates"] if r["control"])
    damages = [r["damage"] for r in result["candidates"]]
    assert damages == sorted(damages, reverse=True)
    assert len(result["pairs"]) == 1
    # Yu et al.: putting the super activation back undoes most of the super weight's damage
    (restored,) = result["restore"]
    assert restored["damage_zeroed"] == pytest.approx(super_["damage"])
    if family not in SANDWICH_FAMILIES:
        assert restored["returned"] > 0.8
    # (with sandwich norms the post-attention and post-FFN norms blow up what little of the huge channel leaks
    # to other tokens, so zeroing the weight also changes them and restoring BOS alone brings back little)


@pytest.mark.parametrize("family", DENSE)
def test_super_weights_planted_in_two_layers_are_both_found(family, tokenizer):
    lm = build(family, tokenizer, n_layers=DEEP)
    plant_massive_weight(lm, layer=0, neuron=HUGE, dim=ROW)
    plant_massive_weight(lm, layer=2, neuron=11, dim=3)  # planted second: it sees layer 0's activation
    scan = find_super_weights(lm, PROMPTS)
    assert [sw.coordinate for sw in scan.super_weights] == [(0, ROW, HUGE), (2, 3, 11)]
    assert [row["layer"] for row in scan.layers if row["spike"]] == [0, 2]


def test_the_largest_down_entry_attack_says_when_it_is_the_super_weight(tokenizer):
    # regression: Gemma-3's attack table listed super-weight and largest-down-entry as two edits of W_down[163, 188]
    from cardhouse.analysis import find_massive_weights
    from cardhouse.interventions import attack

    lm = build("llama", tokenizer, n_layers=DEEP)
    plant_massive_weight(lm, layer=0, neuron=HUGE, dim=ROW)
    mw = find_massive_weights(lm, k=3)
    same = (mw.largest_down_entry["row"], mw.largest_down_entry["column"]) == (mw.super_weight["row"],
                                                                              mw.super_weight["column"])
    assert same  # one planted weight: the row's largest entry over the top-k is the super weight
    assert attack(lm, mw, "largest-down-entry").description.endswith("(here the super weight itself)")
    other = replace(mw, largest_down_entry={**mw.largest_down_entry, "column": mw.indices[1]})
    assert "super weight" not in attack(lm, other, "largest-down-entry").description


def test_the_tables_say_when_the_rows_largest_entry_is_the_super_weight(tokenizer):
    # regression: SmolLM2's layer 28 printed "The row's largest entry (not the super weight): W_down[507, 678]",
    # the super weight's own coordinate
    from rich.console import Console

    from cardhouse.reports.super_weight import super_weight_tables

    lm = build("llama", tokenizer, n_layers=DEEP)
    plant_massive_weight(lm, layer=0, neuron=HUGE, dim=ROW)
    scan = find_super_weights(lm, PROMPTS)
    sw = scan.super_weights[0]
    assert sw.largest_down_entry["column"] == sw.column  # one planted weight: the largest entry is the super weight
    console = Console(record=True, width=200)
    super_weight_tables(scan, console)
    text = console.export_text()
    assert "largest entry is the super weight itself" in text and "(not the super weight)" not in text


@pytest.mark.parametrize("family", VISION_FAMILIES + VARIANTS)
def test_vision_encoder_super_weight_from_images(family):
    """DINOv2 (plain and SwiGLU FFN): a channel planted to fire hugely on the CLS token of layer 1 and to write
    hidden dim ROW; the detection runs on pixel values."""
    from cardhouse.capture import hook_name, record

    lm = build(family, n_layers=DEEP)
    images = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    name = hook_name(1, "mlp.hook_in")
    with torch.inference_mode(), record(lm.model, [name]) as store:
        lm.model(pixel_values=images)
    cls = store[name][0, 0].clone()  # the CLS token of the first image
    digest = all_params_digest(lm)
    with torch.no_grad():
        for tensor, axis, offset in lm.blocks.neuron_slices(1):
            row = tensor.select(axis, offset + HUGE)
            row.copy_(8.0 * cls / cls.norm() if row.dim() == 1 else torch.zeros(()))
        lm.blocks.down_weight(1)[ROW, HUGE] = 20.0
    assert all_params_digest(lm) != digest
    with pytest.raises(ValueError, match="give images"):
        find_super_weights(lm)
    scan = find_super_weights(lm, images=images)
    assert [sw.coordinate for sw in scan.super_weights] == [(1, ROW, HUGE)]
    sw = scan.super_weights[0]
    assert sw.carrier["position"] == 0 and sw.carrier["token"] is None and sw.share > 0.9
    assert scan.prompts == 4 and scan.tokens == 4 * (1 + lm.blocks.n_registers + 4)  # CLS, registers, 2 x 2 patches


def test_candidates_and_controls(tokenizer):
    lm = build("llama", tokenizer, n_layers=DEEP)
    plant_both(lm)
    sw = find_super_weights(lm, PROMPTS).super_weights[0]
    picked = candidates(lm, sw, n=3, controls=4, seed=1)
    assert picked[0].name == "super weight" and (picked[0].row, picked[0].column) == (ROW, HUGE)
    kinds = [(c.kind, c.control) for c in picked]
    assert kinds.count(("scalar", True)) == 4 and ("row", False) in kinds and ("column", False) in kinds
    assert ("row", True) in kinds and ("column", True) in kinds
    scalars = [(c.row, c.column) for c in picked if c.kind == "scalar"]
    assert len(scalars) == len(set(scalars))  # controls never repeat a candidate
    assert candidates(lm, sw, n=3, controls=4, seed=1) == picked  # seeded
    assert all(c.layer == 0 for c in picked)


def test_row_and_column_edits_restore_bit_identical(tokenizer):
    lm = build("gpt2", tokenizer)  # Conv1D: W_down is a transposed view
    down = lm.blocks.down_weight(0)
    before = weights_digest([down])
    with zero_down_line(lm, 0, row=3):
        assert torch.all(down[3] == 0) and torch.any(down[4] != 0)
    with pytest.raises(RuntimeError):
        with zero_down_line(lm, 0, column=5):
            assert torch.all(down[:, 5] == 0)
            raise RuntimeError("inside the edit")
    assert weights_digest([down]) == before
    with pytest.raises(ValueError, match="exactly one"):
        with zero_down_line(lm, 0, row=1, column=1):
            pass
    with pytest.raises(ValueError, match="W_down column values out of range"):
        with zero_down_line(lm, 0, column=down.shape[1]):
            pass


def test_pin_ffn_output_sets_one_entry(tokenizer):
    from cardhouse.capture import hook_name, record

    lm = build("llama", tokenizer)
    ids = torch.tensor([[BOS_ID, 40, 41, 42]])
    name = hook_name(0, "mlp.hook_out")
    with torch.inference_mode(), pin_ffn_output(lm, 0, 3, 123.0, position=0), record(lm.model, [name]) as store:
        lm.model(input_ids=ids)
    # the record hook runs after the pin: it sees the pinned output
    assert float(store[name][0, 0, 3]) == 123.0 and float(store[name][0, 1, 3]) != 123.0


def test_moe_has_no_single_down_projection(tokenizer):
    for family in MOE_FAMILIES:
        with pytest.raises(UnsupportedModelError, match="Mixture of Experts"):
            find_super_weights(build(family, tokenizer), PROMPTS)


def test_bad_coordinates_ratio_and_pairs(tokenizer):
    lm = build("llama", tokenizer)
    rows, columns = lm.blocks.down_weight(0).shape
    with pytest.raises(ValueError, match=f"row {rows} is out of range.*0..{rows - 1}"):
        check_coordinate(lm, 0, rows, 0)
    with pytest.raises(ValueError, match=f"column {columns} is out of range"):
        check_coordinate(lm, 0, 0, columns)
    with pytest.raises(IndexError, match="layer 9 is out of range"):
        check_coordinate(lm, 9, 0, 0)
    assert check_coordinate(lm, 1, 2, 3) == (1, 2, 3)
    with pytest.raises(ValueError, match="ratio must be greater than 1"):
        find_super_weights(lm, PROMPTS, ratio=1.0)
    assert check_pairs(6) == 15
    with pytest.raises(ValueError, match="pairs of 7 candidates take 21 variants, more than the budget of 15"):
        check_pairs(7)
    with pytest.raises(ValueError, match="at least 2"):
        check_pairs(1)


def test_a_given_coordinate_is_ranked_without_a_detection(tokenizer):
    lm = build("llama", tokenizer)
    digest = all_params_digest(lm)
    given = Candidate("given", "scalar", 1, 2, 3)
    result = rank_damage(lm, [], self_perplexity(lm), extra=[given], restore=True)
    assert [r["label"] for r in result["candidates"]] == ["layer 1 W_down[2, 3]"] and result["restore"] == []
    assert all_params_digest(lm) == digest
    with pytest.raises(ValueError, match="nothing to rank"):
        rank_damage(lm, [], self_perplexity(lm))


def test_no_spike_no_super_weight(tokenizer):
    scan = find_super_weights(build("llama", tokenizer, n_layers=DEEP), PROMPTS)
    assert not scan.found and "no layer" in scan.notes[0]
    assert len(scan.layers) == DEEP and all(row["input_max"] > 0 for row in scan.layers)


# ---- the command line ------------------------------------------------------------------------------

runner = CliRunner()


def cli(*args):
    from cardhouse.cli import app

    return runner.invoke(app, [str(a) for a in args])


def saved(lm, folder):
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1"], "--ratio must be a number > 1.0"),
    (["--pairs", "7"], "pairs of 7 candidates take 21 variants, more than the budget of 15"),
    (["--pairs", "4", "--max-pairs", "5"], "pairs of 4 candidates take 6 variants"),
    (["--weight", "11:507"], "LAYER:ROW:COLUMN"),
    (["--corpus", "nope"], "unknown corpus"),
    (["--prompts", "/no/such/file"], "prompt file not found"),
])
def test_bad_input_is_one_clear_line_before_the_model_loads(args, message, tmp_path):
    result = cli("super-weight", "--out", tmp_path, *args)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cli_refuses_a_model_without_one_down_projection_and_a_bad_coordinate(tokenizer, tmp_path):
    moe = saved(build("mixtral", tokenizer), tmp_path / "moe")
    result = cli("super-weight", "--model", moe, "--no-damage", "--out", tmp_path)
    assert result.exit_code == 1 and "Mixture of Experts" in result.output, result.output
    dense = saved(build("llama", tokenizer), tmp_path / "dense")
    result = cli("super-weight", "--model", dense, "--weight", "0:999:1", "--no-damage", "--out", tmp_path)
    assert result.exit_code == 1 and "W_down row 999 is out of range" in result.output, result.output
    assert not (tmp_path / "super_weight.json").exists()


def test_cli_end_to_end_on_a_planted_model(tokenizer, tmp_path):
    """Detection, contributions, damage with controls, pairs and the restoration, in a result file that
    validates against its schema (perplexity on real Wikipedia text, character tokens, tiny budget)."""
    from cardhouse.results import validate

    lm = build("llama", tokenizer, n_layers=DEEP)
    plant_both(lm)
    folder = saved(lm, tmp_path / "model")
    out = tmp_path / "out"
    result = cli("super-weight", "--model", folder, "--context", 64, "--max-tokens", 126, "--candidates", 2,
                 "--controls", 1, "--pairs", 2, "--weight", "1:2:3", "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "super_weight.json").read_text())
    validate(data, "envelope")
    validate(data, "super_weight")
    assert data["complete"] is True and (out / "super_weight.png").stat().st_size > 0
    (sw,) = data["results"]["detection"]["super_weights"]
    assert (sw["layer"], sw["row"], sw["column"]) == (0, ROW, HUGE)
    assert sw["largest_down_entry"]["column"] == QUIET
    damage = data["results"]["damage"]
    names = [c["name"] for c in damage["candidates"]]
    assert "super weight" in names and "given 1:2:3" in names and sum(c["control"] for c in damage["candidates"]) == 3
    assert len(damage["pairs"]) == 1 and len(damage["restore"]) == 1
    assert all(math.isfinite(c["damage"]) for c in damage["candidates"])
    assert "Super weight" in result.output and "W_down[7, 5]" in result.output
