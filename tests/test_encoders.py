"""Encoders on tiny random models of every encoder family (dinov2, dinov2_with_registers, vit,
clip_vision_model, bert) and on real photographs: inputs and roles, the scan, a planted carrier and its
FFN neuron, interventions that restore the weights, attention on the carrier, norm maps, test-time
registers, bad input, and the CLI's JSON against its schema."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import D_MODEL, ENCODER_TEXT_FAMILIES, N_LAYERS, N_REGISTERS, VISION_FAMILIES, all_params_digest, build
from cardhouse.analysis import Criterion
from cardhouse.analysis.massive_activations import scan_inputs
from cardhouse.analysis.tokens import PromptInputs
from cardhouse.capture import hook_name, record
from cardhouse.cli import app
from cardhouse.evaluation.metrics import metric_keys
from cardhouse.encoders import ImageInputs, SentenceInputs, augmented, builtin_photos, encoder_inputs, load_images
from cardhouse.encoders.analysis import (analyze_encoder, attention_on_carrier, carrier_weights, find_carrier,
                                         intervention_variants, norm_maps, run_interventions, token_profile)
from cardhouse.encoders.registers import test_time_register as register_on
from cardhouse.results import validate

PHOTOS = 3  # real photographs per tiny-model test
SENTENCES = ["The cat sat on the mat.", "Summer is warm, and the days are long!", "Is it raining?"]


@pytest.fixture(scope="module")
def photos():
    return builtin_photos()[:PHOTOS]


def inputs_for(lm, photos):
    return ImageInputs(lm, photos) if lm.inputs == "image" else SentenceInputs(lm, SENTENCES)


# ---- real photographs and image files -----------------------------------------------------------


def test_builtin_photographs_are_real_rgb_photographs():
    photos = builtin_photos()
    assert [p.name for p in photos] == ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins",
                                        "hubble_deep_field", "grace_hopper"]
    for p in photos:
        assert p.image.mode == "RGB" and min(p.size) >= 256
        assert np.asarray(p.image).std() > 20  # a picture, not a flat colour


def test_augmented_copies_are_deterministic_and_differ(photos):
    a, b = augmented(photos[0], 5), augmented(photos[0], 5)
    assert [x.name for x in a] == [f"astronaut:{n}" for n in ("flip", "crop", "rotate", "colour", "dark-crop")]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(photos[0].image))
    with pytest.raises(ValueError, match="copies"):
        augmented(photos[0], 6)


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, photos):
    photos[1].image.save(tmp_path / "cat.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.warns(UserWarning, match="skipping") as caught:
        loaded = load_images(tmp_path)
    assert [p.name for p in loaded] == ["cat"] and len(caught) == 2
    assert {str(w.message).split(":")[0] for w in caught} == {"skipping broken.jpg", "skipping notes.txt"}


def test_a_folder_without_images_stops(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no readable image"):
            load_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_images(tmp_path / "missing")


def test_an_image_smaller_than_one_patch_is_refused(tiny, tmp_path):
    Image.new("RGB", (10, 40), "white").save(tmp_path / "thin.png")
    lm = tiny("dinov2")
    with pytest.raises(ValueError, match=r"smaller than one 14x14 patch.*thin \(10x40\)"):
        ImageInputs(lm, load_images(tmp_path))
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        load_images(tmp_path, min_size=14)


# ---- inputs and roles -----------------------------------------------------------------------------


def test_image_roles_cls_registers_patches(tiny, photos):
    lm = tiny("dinov2_with_registers")
    inputs = ImageInputs(lm, photos)
    grid = inputs.grid
    assert inputs.pixel_values.shape[0] == PHOTOS and grid[0] * 14 == inputs.pixel_values.shape[-2]
    assert inputs.role_lists[0] == ["cls"] + ["register"] * N_REGISTERS + ["patch"] * (grid[0] * grid[1])
    assert inputs.token_text(0) == "CLS" and inputs.token_text(1) == "register 1"
    assert inputs.token_text(1 + N_REGISTERS + grid[1] + 1) == "patch (1, 1)"
    with record(lm.model, [hook_name(0, "hook_resid_post")]) as store:
        lm.model(**next(inputs.batches(8)).model_kwargs)
    assert store[hook_name(0, "hook_resid_post")].shape == (PHOTOS, inputs.positions, D_MODEL)


def test_sentence_roles_cls_sep_punctuation(tiny):
    lm = tiny("bert")
    inputs = SentenceInputs(lm, SENTENCES)
    roles = inputs.role_lists[0]
    assert roles[0] == "cls" and roles[-1] == "sep" and roles.count("punctuation") == 1  # the final "."
    assert inputs.token_at(0, len(roles) - 2) == "."
    assert inputs.role_lists[1].count("punctuation") == 2  # "," and "!"


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_image_models_refuse_text(tiny, family):
    lm = tiny(family)
    with pytest.raises(ValueError, match="reads images, not sentences"):
        SentenceInputs(lm, SENTENCES)
    with pytest.raises(ValueError, match="encoder.*cardhouse encoder"):
        PromptInputs(lm, SENTENCES)
    with pytest.raises(ValueError, match="reads images, not sentences"):
        encoder_inputs(lm, sentences="builtin")


def test_text_encoders_refuse_images(tiny, photos):
    lm = tiny("bert")
    with pytest.raises(ValueError, match="reads sentences, not images"):
        ImageInputs(lm, photos)
    with pytest.raises(ValueError, match="reads sentences, not images"):
        encoder_inputs(lm, images="builtin")
    with pytest.raises(ValueError, match="encoder"):
        PromptInputs(lm, SENTENCES)


def test_decoder_models_refuse_images(tiny, photos):
    with pytest.raises(ValueError, match="text prompts"):
        ImageInputs(tiny("llama"), photos)


# ---- the scan, a planted carrier, its FFN neuron -------------------------------------------------------


@pytest.mark.parametrize("family", VISION_FAMILIES + ENCODER_TEXT_FAMILIES)
def test_scan_over_encoder_inputs_is_well_formed(tiny, family, photos):
    lm = tiny(family)
    inputs = inputs_for(lm, photos)
    result = scan_inputs(lm, inputs, criterion=Criterion.relative(5.0), progress=False)
    assert result.prompts == len(inputs) and result.tokens == inputs.tokens
    assert [r["layer"] for r in result.layers] == list(range(N_LAYERS))
    for row in result.layers:
        assert row["top-1"] >= row["median"] > 0
        for entry in row["top_entries"]:
            assert entry["token"] == inputs.token_text(entry["token_id"])
    assert set(result.roles) <= {"cls", "register", "patch", "sep", "punctuation", "other"}
    assert result.roles["cls"]["prompts_with_role"] == len(inputs)


def plant_cls_neuron(lm, neuron: int = 5, dim: int = 7, down: float = 100.0) -> None:
    """CLS enters with a large vector u, so its layer-0 FFN input is nearly u's direction in every image;
    FFN neuron ``neuron`` of layer 0 reads that direction and writes ``down`` x its activation into ``dim``."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(D_MODEL, generator=g)
    u = 60.0 * u / u.norm()
    blocks = lm.blocks
    with torch.no_grad():
        lm.model.embeddings.cls_token[0, 0] = u
        normed = blocks.part(0, "resid_mid_norm")(u[None])[0]
        fc1 = blocks.mlp_part(0, "up")
        fc1.weight[neuron] = 8.0 * normed / normed.norm()
        fc1.bias[neuron] = 0.0
        blocks.down_weight(0)[dim, neuron] = down


@pytest.fixture(scope="module")
def planted(photos):
    lm = build("dinov2")
    plant_cls_neuron(lm)
    inputs = ImageInputs(lm, photos)
    scan = scan_inputs(lm, inputs, criterion=Criterion(min_abs=100, min_ratio=100), progress=False)
    profile = token_profile(lm, inputs, 7)
    return lm, inputs, scan, profile


def test_the_planted_carrier_is_cls_in_every_image(planted):
    lm, inputs, scan, profile = planted
    carrier = find_carrier(scan, inputs, profile)
    assert carrier.dim == 7 and carrier.role == "cls" and carrier.positions == [0] * PHOTOS
    assert carrier.value > 1000 and carrier.token == "CLS"
    assert scan.dims == [7] and scan.massive_layers == list(range(N_LAYERS))
    assert scan.roles["cls"]["prompts_with_massive"] == PHOTOS
    assert all(row["top_entries"][0]["token"] == "CLS" for row in scan.layers)
    assert profile["values"].shape == (N_LAYERS, PHOTOS, inputs.positions)


def test_carrier_weights_find_the_planted_neuron(planted):
    lm, inputs, scan, profile = planted
    carrier = find_carrier(scan, inputs, profile)
    mw = carrier_weights(lm, inputs, carrier, k=3)
    assert mw.layer == 0 and mw.indices[0] == 5 and mw.stable_across_prompts
    assert mw.dim == 7 and mw.super_weight["column"] == 5 and mw.super_weight["value"] == pytest.approx(100.0)
    assert mw.trace[0]["ffn"] > 1000 and abs(mw.trace[1]["ffn"]) < mw.trace[0]["ffn"] / 10
    assert mw.activations[0] > 10 * abs(mw.activations[1])


def test_interventions_restore_the_weights_and_break_only_what_they_should(planted):
    lm, inputs, scan, profile = planted
    carrier = find_carrier(scan, inputs, profile)
    mw = carrier_weights(lm, inputs, carrier, k=3)
    digest = all_params_digest(lm)
    from cardhouse.encoders import measures

    reference = measures.features(lm, inputs)
    rows = run_interventions(intervention_variants(lm, carrier, mw, profile, k=1, seed=0),
                             lambda: measures.cosine_to(reference, measures.features(lm, inputs)))
    assert all_params_digest(lm) == digest
    by = {r["variant"]: r for r in rows}
    assert by["original"]["cos_min"] == pytest.approx(1.0)
    assert by["set-zero"]["replaced"] == PHOTOS and by["set-mean"]["replaced"] == PHOTOS
    assert by["set-zero"]["cos_mean"] < 0.9  # the CLS output without its planted value
    assert by["set-mean"]["cos_min"] > 0.999  # the value is nearly the same in every image
    assert by["topk-zero k=1"]["cos_mean"] < 0.9 and by["random-zero k=1"]["cos_min"] > 0.99
    # typed rows from the attack registry, and their measures picked by spec
    assert (by["random-zero k=1"]["kind"], by["random-zero k=1"]["control_of"], by["topk-zero k=1"]["k"]) == \
        ("random-zero", "topk-zero", 1)
    assert metric_keys(rows[0]) == ["cos_mean", "cos_min"]


def test_attention_on_the_carrier_is_a_distribution_share(planted):
    lm, inputs, scan, profile = planted
    carrier = find_carrier(scan, inputs, profile)
    rows = attention_on_carrier(lm, inputs, carrier)
    assert [r["layer"] for r in rows] == list(range(N_LAYERS))
    for r in rows:
        assert 0 <= r["on_carrier"] <= 1 and r["on_cls"] == pytest.approx(r["on_carrier"])  # the carrier is CLS
        assert r["uniform"] == pytest.approx(1 / inputs.positions)
    assert lm.model.config._attn_implementation != "eager"  # restored


def test_norm_maps_are_the_patch_norms_on_the_grid(planted):
    lm, inputs, scan, profile = planted
    maps = norm_maps(profile, inputs)
    assert maps.shape == (PHOTOS, *inputs.grid)
    with record(lm.model, [hook_name(N_LAYERS - 1, "hook_resid_post")]) as store:
        lm.model(**next(inputs.batches(8)).model_kwargs)
    last = store[hook_name(N_LAYERS - 1, "hook_resid_post")]
    row, col = 1, 1
    torch.testing.assert_close(maps[0, row, col], last[0, 1 + row * inputs.grid[1] + col].norm())


def test_a_test_time_register_takes_the_neurons(planted):
    lm, inputs, scan, profile = planted
    digest = all_params_digest(lm)
    name = hook_name(0, "mlp.hook_post")
    with record(lm.model, [name]) as plain:
        lm.model(**next(inputs.batches(8)).model_kwargs)
    with register_on(lm, 0, [5]) as seen, record(lm.model, [name, hook_name(N_LAYERS - 1, "hook_resid_post")]) as moved:
        out = lm.model(**next(inputs.batches(8)).model_kwargs).last_hidden_state
    assert seen["passes"] == 1 and out.shape[1] == inputs.positions + 1
    before, after = plain[name], moved[name]
    assert torch.all(after[:, :-1, 5] == 0)
    torch.testing.assert_close(after[:, -1, 5], before[:, :, 5].amax(1))
    assert after[:, -1, 5].min() > 10  # the planted CLS neuron now fires on the register
    last = moved[hook_name(N_LAYERS - 1, "hook_resid_post")]
    assert last[:, -1, 7].abs().min() > 1000 and last[:, 0, 7].abs().max() < 100  # the outlier left CLS
    assert all_params_digest(lm) == digest
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.model.modules())


def test_registers_need_an_image_model(tiny):
    with pytest.raises(ValueError, match="image models"):
        with register_on(tiny("bert"), 0, [1]):
            pass


# ---- the whole analysis and the CLI -----------------------------------------------------------------


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_analyze_encoder_runs_on_every_image_family(tiny, family, photos):
    lm = tiny(family)
    digest = all_params_digest(lm)
    result = analyze_encoder(lm, ImageInputs(lm, photos[:2]), criterion=Criterion.relative(5.0), k=3, copies=2)
    assert all_params_digest(lm) == digest
    assert result["inputs"] == {"kind": "image", "count": 2, "tokens": 2 * result["scan"]["tokens"] // 2,
                                "names": ["astronaut", "chelsea"]}
    assert [r["variant"] for r in result["interventions"]["rows"]] == [
        "original", "set-zero", "set-mean", "topk-zero k=2", "random-zero k=2"]
    assert result["interventions"]["rows"][0]["top1"] == result["registers"]["measures"]["without"]["top1"]
    assert len(result["norm_maps"]["maps"]) == 2


def _save_tiny(lm, folder):
    lm.model.save_pretrained(folder)
    if lm.inputs == "image":
        from cardhouse.encoders.inputs import default_processor

        default_processor(lm.model.config).save_pretrained(folder)
    else:
        lm.tokenizer.save_pretrained(folder)
    return str(folder)


def test_cli_encoder_on_images_writes_json_that_validates(tmp_path, photos):
    lm = build("dinov2_with_registers")
    folder = _save_tiny(lm, tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for p in photos[:2]:
        p.image.save(images / f"{p.name}.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["encoder", "-m", folder, "--images", str(images), "--relative",
                                      "--min-ratio", "5", "--copies", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "encoder.json").read_text())
    validate(data)
    validate(data, "encoder")
    assert data["results"]["inputs"]["names"] == ["astronaut", "chelsea"]
    assert set(data["plots"]) == {"top_magnitudes", "carrier", "norm_maps"}
    assert all((out / f"{n}.png").read_bytes().startswith(b"\x89PNG") for n in ("scan", "carrier", "norm_map"))
    assert "Carrier: dim" in result.output


def test_cli_encoder_on_sentences(tmp_path):
    lm = build("bert")
    folder = _save_tiny(lm, tmp_path / "model")
    text = tmp_path / "s.txt"
    text.write_text("\n".join(SENTENCES))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["encoder", "-m", folder, "--sentences", str(text), "--relative",
                                      "--min-ratio", "5", "--mrpc-pairs", "12", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "encoder.json").read_text())
    validate(data, "encoder")
    rows = data["results"]["interventions"]["rows"]
    assert rows[0]["spearman_to_original"] == pytest.approx(1.0) and 0 <= rows[0]["auc_paraphrase"] <= 1
    assert "norm_maps" not in data["results"] and "registers" not in data["results"]


@pytest.mark.parametrize("args, message", [
    (["-m", "minilm-l6", "--images", "builtin"], "minilm-l6 reads sentences, not images"),
    (["-m", "dinov2-s", "--sentences", "builtin"], "dinov2-s reads images, not sentences"),
    (["-m", "smollm2-135m", "--images", "builtin"], "decoder LM: use `cardhouse scan`"),
    (["-m", "dinov2-s"], "give --images"),
    (["-m", "dinov2-s", "--images", "builtin", "--sentences", "builtin"], "give --images"),
    (["-m", "dinov2-s", "--images", "/nonexistent/folder"], "not found"),
    (["-m", "dinov2-s", "--images", "builtin", "--copies", "9"], "--copies"),
])
def test_cli_bad_input_is_one_error_line_before_loading(args, message, monkeypatch):
    import cardhouse.cli.encoder as cli_encoder

    monkeypatch.setattr(cli_encoder, "load", lambda *a: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(app, ["encoder", *args])
    assert result.exit_code == 1
    assert "error:" in result.output and message in " ".join(result.output.split())


def test_cli_empty_image_folder_stops(tmp_path, monkeypatch):
    import cardhouse.cli.encoder as cli_encoder

    (tmp_path / "readme.txt").write_text("no pictures here")
    monkeypatch.setattr(cli_encoder, "load", lambda *a: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(app, ["encoder", "-m", "dinov2-s", "--images", str(tmp_path)])
    assert result.exit_code == 1 and "no readable image" in result.output
