"""The RTN quantizers against a straightforward reference, the protections, and the study on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import ALL_MODELS, TEXT_FAMILIES, all_params_digest, build, forward, plant_massive_weight, sample_inputs
from cardhouse.evaluation.measure import Budget
from cardhouse.precision.quantize import (Scheme, Targets, check_scheme, fake_quantize, linear_layers,
                                          quantize_activation, quantize_weight, quantized, quantized_weights,
                                          weight_keep_masks)
from cardhouse.precision.study import (foldable_scheme, parse_act_spec, parse_weight_spec, quantization_study,
                                     study_schemes)


def reference_rtn(values: list[float], bits: int, keep: list[bool] | None = None) -> list[float]:
    """Symmetric round-to-nearest of one group, written out: kept entries stay and do not set the scale."""
    keep = keep or [False] * len(values)
    qmax = 2 ** (bits - 1) - 1
    amax = max((abs(v) for v, k in zip(values, keep) if not k), default=0.0)
    scale = amax / qmax if amax > 0 else 1.0
    out = []
    for v, k in zip(values, keep):
        if k:
            out.append(v)
            continue
        q = v / scale
        q = math.floor(q + 0.5) if q - math.floor(q) != 0.5 else (math.floor(q) if math.floor(q) % 2 == 0 else math.ceil(q))
        out.append(max(-qmax, min(qmax, q)) * scale)
    return out


def reference_weight(w: torch.Tensor, bits: int, group: int | None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[out, in] weight: every row, group by group, through ``reference_rtn``."""
    out = torch.empty_like(w)
    group = group or w.shape[1]
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            vals = w[r, start:start + group].tolist()
            ks = keep[r, start:start + group].tolist() if keep is not None else None
            out[r, start:start + group] = torch.tensor(reference_rtn(vals, bits, ks), dtype=w.dtype)
    return out


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("group", [None, 4, 8])
def test_weight_quantizer_matches_the_reference(bits, group):
    g = torch.Generator().manual_seed(bits * 10 + (group or 0))
    w = torch.randn(6, 16, generator=g, dtype=torch.float64)
    w[2, 5] = 40.0  # an outlier that sets its group's scale
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[2, 5] = True
    torch.testing.assert_close(quantize_weight(w, bits, group=group), reference_weight(w, bits, group), rtol=0, atol=1e-12)
    torch.testing.assert_close(quantize_weight(w, bits, group=group, keep=keep), reference_weight(w, bits, group, keep),
                               rtol=0, atol=1e-12)
    # Conv1D layout: [in, out], input on axis 0
    torch.testing.assert_close(quantize_weight(w.T.contiguous(), bits, in_axis=0, group=group).T,
                               reference_weight(w, bits, group), rtol=0, atol=1e-12)


def test_quantized_values_are_on_the_grid():
    w = torch.randn(4, 32, dtype=torch.float64)
    q = quantize_weight(w, 4)
    scale = w.abs().amax(1, keepdim=True) / 7
    levels = q / scale
    assert torch.allclose(levels, levels.round(), atol=1e-9) and levels.abs().max() <= 7 + 1e-9
    assert len(torch.unique(q[0])) <= 15


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_activation_quantizer_matches_the_reference(granularity):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    x[:, 0, 3] = 500.0  # a massive activation on the first token
    keep_pos = torch.zeros(5, dtype=torch.bool)
    keep_pos[0] = True
    keep_ch = torch.zeros(8, dtype=torch.bool)
    keep_ch[3] = True
    for kp, kc in [(None, None), (keep_pos, None), (None, keep_ch)]:
        got = quantize_activation(x, 8, granularity, keep_positions=kp, keep_channels=kc)
        want = torch.empty_like(x)
        for b in range(2):
            keep = torch.zeros(5, 8, dtype=torch.bool)
            if kp is not None:
                keep |= kp[:, None]
            if kc is not None:
                keep |= kc[None, :]
            if granularity == "tensor":
                want[b] = torch.tensor(reference_rtn(x[b].flatten().tolist(), 8, keep.flatten().tolist()),
                                       dtype=x.dtype).reshape(5, 8)
            else:
                for t in range(5):
                    want[b, t] = torch.tensor(reference_rtn(x[b, t].tolist(), 8, keep[t].tolist()), dtype=x.dtype)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_per_tensor_scale_is_per_sequence():
    x = torch.randn(3, 4, 8)
    one = quantize_activation(x[1:2], 8, "tensor")
    assert torch.equal(quantize_activation(x, 8, "tensor")[1:2], one)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_bits=1), "bit width must be an integer in 2..8"),
    (dict(weight_bits=16), "bit width must be an integer in 2..8"),
    (dict(act_bits=8, act_granularity="channel"), "unknown activation granularity"),
    (dict(weight_bits=4, protect="everything"), "unknown protection"),
    (dict(act_bits=8, protect="super-weight"), "protects weights"),
    (dict(weight_bits=8, protect="bos-kv"), "protects activations"),
    (dict(), "quantizes weights, activations or both"),
    (dict(weight_bits=4, group=0), "must be >= 1"),
])
def test_bad_schemes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Scheme(**kwargs)


def test_group_that_does_not_divide_the_dims_is_refused(tiny):
    lm = tiny("llama")  # d_model 32, d_mlp 48
    check_scheme(lm, Scheme(weight_bits=4, group=16))
    with pytest.raises(ValueError, match="group size 12 does not divide the input width 32"):
        check_scheme(lm, Scheme(weight_bits=4, group=12))
    with pytest.raises(ValueError, match="does not divide the width"):
        fake_quantize(torch.zeros(2, 10), 4, group=3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "qwen2_moe", "phi3"])
def test_the_spec_and_the_loaded_model_refuse_the_same_groups(tmp_path, family):
    """``check_scheme`` on a ``ModelSpec`` (the meta model, before any weight loads) agrees with the loaded model
    on every group size up to the widest input: the command line refuses exactly what the study would."""
    from conftest import save_folder

    from cardhouse.models.spec import probe

    lm = build(family)
    spec = probe(str(save_folder(lm, tmp_path / family)))
    for group in range(1, 97):
        outcomes = []
        for target in (spec, lm):
            try:
                check_scheme(target, Scheme(weight_bits=4, group=group))
                outcomes.append(None)
            except ValueError as e:
                outcomes.append(str(e))
        assert outcomes[0] == outcomes[1], (group, outcomes)


def test_foldable_schemes():
    assert foldable_scheme("4g64", "super-weight") == Scheme(weight_bits=4, group=64, protect="super-weight")
    for spec in ("8:tensor", "a8", "A8:token"):
        with pytest.raises(ValueError, match="no form as weights"):
            foldable_scheme(spec)
    with pytest.raises(ValueError, match="--protect massive-dims"):
        foldable_scheme("8", "massive-dims")
    with pytest.raises(ValueError, match="bit width"):
        foldable_scheme("9")


@pytest.mark.parametrize("spec, parsed", [("8", (8, None)), ("4g64", (4, 64)), ("W4g32", (4, 32))])
def test_weight_specs(spec, parsed):
    assert parse_weight_spec(spec) == parsed


def test_bad_specs():
    with pytest.raises(ValueError, match="BITSgGROUP"):
        parse_weight_spec("four")
    assert parse_act_spec("8:tensor") == (8, "tensor")
    with pytest.raises(ValueError, match="BITS:tensor"):
        parse_act_spec("x:token")


@pytest.mark.parametrize("family", ALL_MODELS)
def test_every_family_weights_quantized_and_restored(family):
    lm = build(family)
    linears = linear_layers(lm)
    assert linears and all(lin.weight.dim() in (2, 3) for lin in linears)
    digest = all_params_digest(lm)
    inputs = sample_inputs(lm)
    before = forward(lm, inputs)
    with quantized_weights(lm, Scheme(weight_bits=4)):
        changed = forward(lm, inputs)
        lin = linears[0]
        w = lin.weight
        # every quantized row has at most 15 distinct values (4 bits, symmetric)
        assert len(torch.unique(w.movedim(lin.in_axis, -1).reshape(-1, w.shape[lin.in_axis])[0])) <= 15
    assert not torch.equal(before, changed)
    assert all_params_digest(lm) == digest


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_every_family_activations_quantized_and_hooks_removed(family):
    lm = build(family)
    inputs = sample_inputs(lm)
    before = forward(lm, inputs)
    with quantized(lm, Scheme(act_bits=4, act_granularity="tensor")) as info:
        changed = forward(lm, inputs)
        assert info["inputs"] > 0
    assert not torch.equal(before, changed)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())
    torch.testing.assert_close(forward(lm, inputs), before, rtol=0, atol=0)


def planted_targets(lm, info) -> Targets:
    return Targets(layer=0, rows=[5], super_weight=(7, 5), massive_channels={"0.mlp.down_proj": [5]})


def test_protected_weights_are_kept_exactly():
    lm = build("llama")
    planted = plant_massive_weight(lm, layer=0, neuron=5, dim=7)
    targets = planted_targets(lm, planted)
    linears = linear_layers(lm)
    up = lm.blocks.mlp_part(0, "up").weight
    down = lm.blocks.mlp_part(0, "down").weight
    row_up, sw = up[5].detach().clone(), float(down[7, 5])
    with quantized_weights(lm, Scheme(weight_bits=4, protect="massive-rows"), targets) as kept:
        assert kept == 2 * up.shape[1] and torch.equal(up[5], row_up)
    with quantized_weights(lm, Scheme(weight_bits=4, protect="super-weight"), targets) as kept:
        assert kept == 1 and float(down[7, 5]) == sw
        # the rest of row 7 is quantized with a scale that the super weight (100) no longer sets
        others = torch.cat([down[7, :5], down[7, 6:]])
        assert len(torch.unique(others)) > 3
    with quantized_weights(lm, Scheme(weight_bits=4), targets):
        assert float(down[7, 5]) == pytest.approx(sw, rel=1e-6)  # the largest entry sits on the grid's end
        assert len(torch.unique(torch.cat([down[7, :5], down[7, 6:]]))) <= 3  # crushed to ~0 by its scale
    masks = weight_keep_masks(lm, Scheme(weight_bits=4, protect="random-rows"), targets, linears)
    assert sum(int(m.sum()) for m in masks.values()) == 2 * up.shape[1]
    masks = weight_keep_masks(lm, Scheme(weight_bits=4, protect="random-weight"), targets, linears)
    (mask,) = masks.values()
    assert int(mask.sum()) == 1 and not mask[7, 5] and mask[7].any()


def test_bos_kv_kept_and_massive_channel_kept():
    lm = build("llama")
    targets = Targets(layer=0, rows=[5], super_weight=(7, 5), massive_channels={"0.mlp.down_proj": [5]})
    k_proj = lm.blocks.attn_part(0, "k_proj")
    inputs = sample_inputs(lm)
    out = {}
    for protect in ("bos-kv", "none"):
        with quantized(lm, Scheme(act_bits=4, act_granularity="token", protect=protect), targets):
            # registered after the quantizing hook, so it sees the quantized keys
            h = k_proj.register_forward_hook(lambda m, a, o, p=protect: out.__setitem__(p, o.clone()))
            forward(lm, inputs)
            h.remove()
    # the BOS keys are not rounded (their input still is), every other position is rounded the same way
    assert not torch.equal(out["bos-kv"][:, 0], out["none"][:, 0])
    assert torch.equal(out["bos-kv"][:, 1:], out["none"][:, 1:])
    with quantized(lm, Scheme(act_bits=8, act_granularity="tensor", protect="massive-dims"), targets) as info:
        assert info["protected_channels"] == 1
    with quantized(lm, Scheme(act_bits=8, act_granularity="tensor", protect="random-dims"), targets) as info:
        assert info["protected_channels"] == 1


def test_random_kv_on_a_one_token_input():
    """Regression: a one-token input (a zero-shot continuation) made random-kv pick from an empty range."""
    lm = build("llama")
    targets = Targets(layer=0, rows=[5], super_weight=(7, 5), massive_channels={})
    with quantized(lm, Scheme(act_bits=8, act_granularity="token", protect="random-kv"), targets):
        with torch.inference_mode():
            out = lm.model(input_ids=torch.tensor([[lm.bos_id]]), use_cache=False).logits
    assert torch.isfinite(out).all()


def test_study_on_a_tiny_model(tiny, monkeypatch):
    """The study runs end to end on the same tokens, rows in order, weights restored (run_variants checks)."""
    import cardhouse.evaluation.metrics as metrics  # where the perplexity measure reads its tokens

    lm = build("llama")
    text = "The quick brown fox jumps over the lazy dog. " * 20
    ids = torch.tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(metrics, "tokenize_corpus", lambda tok, name, max_tokens=None: ids[:max_tokens])
    targets = Targets(layer=0, rows=[5], super_weight=(7, 5), massive_channels={"0.mlp.down_proj": [5]})
    schemes = study_schemes(["8", "4g16"], ["8:tensor"])
    result = quantization_study(lm, schemes, Budget(corpora=["wikipedia"], max_tokens=127, context=64), targets)
    assert [r["variant"] for r in result.rows] == ["original"] + [s.name for s in schemes]
    table = result.table("ppl_wikipedia")
    assert set(table) == {"W8 per-channel", "W4 g16", "A8 per-tensor"}
    assert set(table["W4 g16"]) == {"none", "massive-rows", "random-rows", "super-weight", "random-weight"}
    assert all(math.isfinite(v) for row in table.values() for v in row.values())
    json.dumps(result.rows)  # JSON-ready


def test_quantize_command_scores_zero_shot_beside_perplexity(tmp_path, tokenizer, monkeypatch):
    """--task: every row carries the task's accuracy and the mean, the file validates, the table and plot show it."""
    from typer.testing import CliRunner

    from conftest import save_folder
    from cardhouse.cli import app
    from cardhouse.data.corpora import CORPORA, Corpus
    from cardhouse.results import validate

    monkeypatch.setenv("CARDHOUSE_CACHE", str(tmp_path / "cache"))  # the test corpus is never cached for real use
    monkeypatch.setitem(CORPORA, "tiny", Corpus("tiny", "test text", "this test", lambda: "A fox runs. " * 40))
    folder = save_folder(build("llama", tokenizer), tmp_path / "tiny-llama")
    result = CliRunner().invoke(app, ["quantize", "-m", str(folder), "--weights", "4g16", "--acts", "",
                                      "--no-protect", "--corpus", "tiny", "--max-tokens", "126", "--context", "64",
                                      "--task", "arc_easy", "--task-limit", "4", "-o", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "q" / "quantize.json").read_text())
    validate(data, "quantize")
    rows = data["results"]["rows"]
    assert [r["variant"] for r in rows] == ["original", "W4 g16"]
    for row in rows:
        assert 0 <= row["acc_arc_easy"] <= 1 and row["acc_mean"] == row["acc_arc_easy"]
        assert math.isfinite(row["ppl_tiny"])
    assert data["settings"]["budget"]["tasks"] == ["arc_easy"] and data["settings"]["budget"]["limit"] == 4
    assert "mean zero-shot accuracy" in " ".join(result.output.split())  # the table's title (wrapped by rich)
    assert (tmp_path / "q" / "quantize_tasks.png").is_file()
    # quantized activations: whole sequences (hflm) only
    args = ["quantize", "-m", str(folder), "--weights", "", "--acts", "8:tensor", "--no-protect", "--corpus", "tiny",
            "--max-tokens", "126", "--context", "64", "--task", "arc_easy", "--task-limit", "2"]
    refused = CliRunner().invoke(app, args + ["-o", str(tmp_path / "r")])
    assert refused.exit_code == 1 and "--backend hflm" in refused.output
    result = CliRunner().invoke(app, args + ["--backend", "hflm", "-o", str(tmp_path / "h")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "h" / "quantize.json").read_text())
    validate(data, "quantize")
    assert [0 <= r["acc_arc_easy"] <= 1 for r in data["results"]["rows"]] == [True, True]


def test_massive_channels_are_decided_by_a_criterion_and_recorded():
    """The activation protections' channels: a planted BOS neuron's down_proj input channel is found by the
    ratio-only ``CHANNEL_CRITERION`` (20x the median channel), no channel by an unreachable ratio; the targets
    say which criterion decided (quantize.json records them)."""
    from cardhouse.analysis import load_prompts
    from cardhouse.analysis.criterion import Criterion
    from cardhouse.capture import tokenize_prompts
    from cardhouse.precision.quantize import CHANNEL_CRITERION, find_targets

    lm = build("llama")
    plant_massive_weight(lm, layer=0, neuron=5)
    tokens = tokenize_prompts(lm, load_prompts(limit=4))
    targets = find_targets(lm, tokens, k=1)
    down = next(name for name in targets.massive_channels if name.startswith("0.") and "down" in name)
    assert 5 in targets.massive_channels[down]
    assert targets.channel_criterion == CHANNEL_CRITERION.to_dict() and CHANNEL_CRITERION.min_abs == 0
    assert find_targets(lm, tokens, k=1, channel_criterion=Criterion.relative(1e12)).massive_channels == {}
    assert find_targets(lm, k=1).channel_criterion is None  # weight protections only: no channel search
