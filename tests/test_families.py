"""Every family of the adapter table on a tiny random model: hook points, the residual algebra,
the FFN intermediate state, neuron slices, and the scan / massive-weight search end to end."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from conftest import (ALL_FAMILIES, BOS_ID, D_MLP, D_MODEL, EXPECTED_D_MLP, MOE_D_MLP, MOE_FAMILIES, N_EXPERTS,
                      N_LAYERS, SANDWICH_FAMILIES, TEXT_FAMILIES, build, forward, plant_bos_embedding,
                      plant_massive_weight, sample_inputs, text_config, d_mlp)
from cardhouse.analysis import Criterion, MassiveWeights, ScanResult, find_massive_weights, scan
from cardhouse.analysis.prompts import builtin_prompts
from cardhouse.analysis.tokens import ROLES
from cardhouse.capture import POINTS, hook_name, hooks, parse_hook_name, record
from cardhouse.models.adapters import ADAPTERS, Blocks, UnsupportedModelError, adapter_for, get

RESID_POINTS = ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_in", "mlp.hook_out",
                "hook_resid_post"]


def record_all(lm, inputs, points=None):
    points = points or [p for p in POINTS if not (lm.blocks.is_moe and p == "mlp.hook_post")]
    names = [hook_name(layer, p) for layer in range(len(lm.blocks)) for p in points]
    with record(lm.model, names) as store:
        forward(lm, inputs)
    assert set(store) == set(names), f"hooks that never fired: {sorted(set(names) - set(store))}"
    return store


def n_positions(lm, inputs):
    # image models: CLS, registers, 2 x 2 patches
    return inputs["input_ids"].shape[1] if "input_ids" in inputs else 1 + lm.blocks.n_registers + (28 // 14) ** 2


def test_every_adapter_family_has_a_tiny_model():
    # nanogpt is cardhouse's own from-scratch decoder: tests/test_emergence.py runs it through the hooks and the scan
    assert set(ALL_FAMILIES) | {"nanogpt"} == set(ADAPTERS), "add a tiny model to tests/conftest.py for every adapter"


def test_adapter_parts_resolve(lm):
    blocks = lm.blocks
    adapter = adapter_for(lm.model)
    assert adapter.family == lm.family and len(blocks) == N_LAYERS
    assert adapter.final_norm is None or isinstance(get(lm.model, adapter.final_norm), nn.Module)
    assert (adapter.final_norm is None) == adapter.post_norm
    for layer in range(N_LAYERS):
        for part in ("attn", "mlp", "resid_mid_norm"):
            assert isinstance(blocks.part(layer, part), nn.Module), part
        for part in ("up", "down", "gate", "router"):
            if getattr(adapter, part) is not None:
                assert isinstance(blocks.mlp_part(layer, part), (nn.Module, torch.Tensor)), part
        assert callable(blocks.mlp_part(layer, "act"))
        assert blocks.intermediate_size(layer) == d_mlp(lm)
        for expert in range(N_EXPERTS) if blocks.is_moe else [None]:
            down = blocks.down_weight(layer, expert)
            assert down.shape == (D_MODEL, d_mlp(lm))
            # a view of the stored parameter, not a copy: the attacks write through it
            stored = blocks.mlp_part(layer, "down")
            stored = stored if isinstance(stored, torch.Tensor) else stored.weight
            assert down.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()


def test_dinov2_layout_follows_its_config(tiny):
    assert tiny("dinov2").blocks.adapter.mlp_layout == "linear"
    swiglu = tiny("dinov2_swiglu").blocks
    assert swiglu.adapter.family == "dinov2" and swiglu.adapter.mlp_layout == "gated" and swiglu.is_gated
    assert len(swiglu.neuron_slices(0)) == 4  # gate and up rows, and their biases


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_moe_families_mixing_dense_layers_get_a_layout_per_layer(family, tokenizer):
    """Qwen-MoE with ``mlp_only_layers``: layer 0 is a dense gated FFN, layer 1 an MoE layer; each layer's
    parts resolve in its own layout (regression: such models were refused)."""
    from transformers import AutoModelForCausalLM

    from cardhouse.models.loading import from_pretrained_objects

    config = text_config(family)
    config.mlp_only_layers = [0]
    torch.manual_seed(0)
    lm = from_pretrained_objects(AutoModelForCausalLM.from_config(config).eval(), tokenizer, bos=True)
    blocks = lm.blocks
    assert blocks.is_moe and blocks.moe_layers == [1] and not blocks.is_moe_layer(0)
    assert blocks.ffn(0).mlp_layout == "gated" and blocks.ffn(1).mlp_layout == "experts"
    assert blocks.intermediate_size(0) == D_MLP and blocks.intermediate_size(1) == MOE_D_MLP
    assert blocks.n_experts(0) == 0 and blocks.n_experts(1) == N_EXPERTS
    assert blocks.down_weight(0).shape == (D_MODEL, D_MLP)
    store = record_all(lm, sample_inputs(lm), ["mlp.hook_in"])
    with record(lm.model, [hook_name(0, "mlp.hook_post")]) as post:  # the dense layer has the module boundary
        forward(lm, sample_inputs(lm))
    with torch.inference_mode():
        computed = blocks.intermediate(0, store[hook_name(0, "mlp.hook_in")])
    torch.testing.assert_close(computed, post[hook_name(0, "mlp.hook_post")], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dense FFN layer"):
        blocks.check_expert(0, 1)
    with pytest.raises(ValueError, match="dense FFN layer"):
        blocks.router_choice(0, store[hook_name(0, "mlp.hook_in")])
    with pytest.raises(ValueError, match="Mixture-of-Experts.*intermediate"):
        with hooks(lm.model, {hook_name(1, "mlp.hook_post"): lambda name, t: None}):
            pass


def test_shared_expert_is_addressed_like_a_dense_ffn(tiny):
    from cardhouse.models.adapters import SHARED

    blocks = tiny("qwen2_moe").blocks
    shared = blocks.part(0, "mlp").shared_expert
    assert blocks.intermediate_size(0, SHARED) == D_MLP  # shared_expert_intermediate_size
    assert blocks.down_weight(0, SHARED) is shared.down_proj.weight
    assert [t for t, _, _ in blocks.neuron_slices(0, SHARED)] == [shared.gate_proj.weight, shared.up_proj.weight]
    x = torch.randn(3, D_MODEL)
    with torch.inference_mode():
        torch.testing.assert_close(blocks.intermediate(0, x, SHARED),
                                   nn.functional.silu(shared.gate_proj(x)) * shared.up_proj(x))
    with pytest.raises(ValueError, match="no shared expert"):
        tiny("mixtral").blocks.check_expert(0, SHARED)


def test_expert_index_out_of_range(tiny):
    blocks = tiny("mixtral").blocks
    for bad in (N_EXPERTS, -1):
        with pytest.raises(IndexError, match=rf"expert {bad} is out of range: layer 0 has experts 0..{N_EXPERTS - 1}"):
            blocks.neuron_slices(0, bad)
    with pytest.raises(ValueError, match="dense FFN layer"):
        tiny("llama").blocks.check_expert(0, 0)


def test_moe_needs_an_expert(tiny):
    blocks = tiny("mixtral").blocks
    with pytest.raises(ValueError, match="expert"):
        blocks.down_weight(0)
    with pytest.raises(ValueError, match="expert"):
        blocks.neuron_slices(0)


def test_layer_out_of_range(lm):
    with pytest.raises(IndexError, match=f"0..{N_LAYERS - 1}"):
        lm.blocks.part(N_LAYERS, "mlp")
    with pytest.raises(IndexError):
        lm.blocks.check_layer(-1)


# ---- hook points -------------------------------------------------------------------------------


def test_hook_points_exist_with_documented_shapes(lm):
    inputs = sample_inputs(lm)
    store = record_all(lm, inputs)
    batch, pos = 2, n_positions(lm, inputs)
    for layer in range(N_LAYERS):
        for point in RESID_POINTS:
            assert store[hook_name(layer, point)].shape == (batch, pos, D_MODEL), point
        if not lm.blocks.is_moe:
            assert store[hook_name(layer, "mlp.hook_post")].shape == (batch, pos, d_mlp(lm))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_has_no_hook_post(tiny, family):
    lm = tiny(family)
    with pytest.raises(ValueError, match="Mixture-of-Experts.*intermediate"):
        with hooks(lm.model, {hook_name(0, "mlp.hook_post"): lambda name, t: None}):
            pass
    assert _no_hooks_left(lm.model)


def test_resid_post_is_next_resid_pre_and_final_norm_input(lm):
    inputs = sample_inputs(lm)
    store = record_all(lm, inputs, ["hook_resid_pre", "hook_resid_post"])
    for layer in range(N_LAYERS - 1):
        assert torch.equal(store[hook_name(layer, "hook_resid_post")], store[hook_name(layer + 1, "hook_resid_pre")])
    if lm.blocks.adapter.final_norm is None:
        return  # post-norm blocks end in their own norm
    seen = {}
    final_norm = get(lm.model, lm.blocks.adapter.final_norm)
    handle = final_norm.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    try:
        with record(lm.model, [hook_name(N_LAYERS - 1, "hook_resid_post")]) as last:
            forward(lm, inputs)
    finally:
        handle.remove()
    last = last[hook_name(N_LAYERS - 1, "hook_resid_post")]
    # CLIP's post_layernorm normalizes only the pooled CLS token
    assert torch.equal(last[:, 0] if lm.family == "clip_vision_model" else last, seen["x"])


def test_residual_decomposition(lm):
    """resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out (through the post-norms of
    sandwich-norm models and DINOv2's layer scales), and mlp.hook_in is the adapter's norm of resid_mid.
    Post-norm blocks (BERT): attn_out = norm(resid_mid) and resid_post = norm(mlp_in + mlp_out)."""
    store = record_all(lm, sample_inputs(lm))
    for layer in range(N_LAYERS):
        s = {p: store[hook_name(layer, p)] for p in RESID_POINTS}
        block = lm.blocks.layers[layer]
        attn, mlp = s["hook_attn_out"], s["mlp.hook_out"]
        with torch.inference_mode():
            if lm.family in SANDWICH_FAMILIES:
                attn, mlp = block.post_attention_layernorm(attn), block.post_feedforward_layernorm(mlp)
            elif lm.family.startswith("dinov2"):
                attn, mlp = block.layer_scale1(attn), block.layer_scale2(mlp)
            normed = lm.blocks.part(layer, "resid_mid_norm")(s["hook_resid_mid"])
            if lm.blocks.adapter.post_norm:
                after_ffn = block.output.LayerNorm(s["mlp.hook_in"] + mlp)
        if lm.blocks.adapter.post_norm:
            torch.testing.assert_close(attn, normed, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s["hook_resid_post"], after_ffn, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s["mlp.hook_in"], normed, rtol=1e-5, atol=1e-6)
            continue
        torch.testing.assert_close(s["hook_resid_mid"], s["hook_resid_pre"] + attn, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["hook_resid_post"], s["hook_resid_mid"] + mlp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["mlp.hook_in"], normed, rtol=1e-5, atol=1e-6)
        assert s["hook_attn_out"].abs().max() > 0 and s["mlp.hook_out"].abs().max() > 0


def test_hook_post_equals_blocks_intermediate(lm):
    if lm.blocks.is_moe:
        pytest.skip("MoE: see test_moe_intermediate_matches_the_experts")
    store = record_all(lm, sample_inputs(lm), ["mlp.hook_in", "mlp.hook_post"])
    for layer in range(N_LAYERS):
        with torch.inference_mode():
            computed = lm.blocks.intermediate(layer, store[hook_name(layer, "mlp.hook_in")])
        torch.testing.assert_close(computed, store[hook_name(layer, "mlp.hook_post")], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_intermediate_matches_the_experts(tiny, family):
    """Blocks.intermediate, down_weight and router_choice reproduce what the model's experts compute."""
    lm = tiny(family)
    blocks = lm.blocks
    for layer in range(N_LAYERS):
        experts = blocks.part(layer, "mlp").experts
        seen = {}

        def keep(mod, args, kwargs, output):
            seen["x"], seen["index"], seen["weights"] = (a.detach() for a in args[:3])
            seen["out"] = output.detach()

        handle = experts.register_forward_hook(keep, with_kwargs=True)
        try:
            forward(lm, sample_inputs(lm))
        finally:
            handle.remove()
        x, index, weights, out = seen["x"], seen["index"], seen["weights"], seen["out"]
        with torch.inference_mode():
            top1 = index.gather(1, weights.argmax(-1, keepdim=True))[:, 0]  # the largest-weight expert per token
            assert torch.equal(blocks.router_choice(layer, x), top1)
            expected = torch.zeros_like(out)
            for j in range(index.shape[1]):
                for expert in index[:, j].unique().tolist():
                    rows = index[:, j] == expert
                    inter = blocks.intermediate(layer, x[rows], expert)
                    # by hand: the fused [gate; up] rows of this expert
                    fused = blocks.mlp_part(layer, "up")[expert]
                    gate, up = (x[rows] @ fused.T).chunk(2, dim=-1)
                    torch.testing.assert_close(inter, nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-6)
                    assert inter.shape == (int(rows.sum()), EXPECTED_D_MLP[family])
                    expected[rows] += weights[rows, j, None] * (inter @ blocks.down_weight(layer, expert).T)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)


# ---- neuron slices -------------------------------------------------------------------------------


def _experts(lm):
    return range(N_EXPERTS) if lm.blocks.is_moe else [None]


def test_neuron_slices_are_rows_of_d_model(lm):
    blocks = lm.blocks
    n = d_mlp(lm)
    for layer in range(N_LAYERS):
        for expert in _experts(lm):
            slices = blocks.neuron_slices(layer, expert)
            matrices = [s for s in slices if s[0].dim() == 2]
            assert len(matrices) == (2 if blocks.is_gated else 1)
            for tensor, axis, offset in slices:
                assert offset + n <= tensor.shape[axis]
                row = tensor.select(axis, offset + n - 1)
                assert row.shape == ((D_MODEL,) if tensor.dim() == 2 else ())
            # gate and up rows of one neuron are different rows (fused layouts: offset n apart)
            pointers = {(t.select(a, o).data_ptr()) for t, a, o in matrices}
            assert len(pointers) == len(matrices)


def test_zeroing_neuron_slices_zeroes_the_intermediate_state(lm):
    """Zeroing neuron i's input-side rows (and bias) makes the intermediate state at i act(0)*0 = 0
    (gated) or act(0) (non-gated, = 0 for GELU), on every token, and leaves the other neurons alone."""
    blocks, layer, neuron = lm.blocks, N_LAYERS - 1, 3
    expert = 1 if blocks.is_moe else None
    inputs = sample_inputs(lm)
    points = ["mlp.hook_in"] if blocks.is_moe else ["mlp.hook_in", "mlp.hook_post"]

    def intermediate():
        store = record_all(lm, inputs, points)
        x = store[hook_name(layer, "mlp.hook_in")]
        if blocks.is_moe:
            with torch.inference_mode():
                return x, blocks.intermediate(layer, x, expert)
        return x, store[hook_name(layer, "mlp.hook_post")]

    x_before, before = intermediate()
    assert before[..., neuron].abs().max() > 0
    slices = blocks.neuron_slices(layer, expert)
    saved = [t.select(a, o + neuron).clone() for t, a, o in slices]
    try:
        with torch.no_grad():
            for t, a, o in slices:
                t.select(a, o + neuron).zero_()
        x_after, after = intermediate()
    finally:
        with torch.no_grad():
            for (t, a, o), s in zip(slices, saved):
                t.select(a, o + neuron).copy_(s)
    assert torch.equal(x_after, x_before)  # only this layer's FFN input side changed
    if blocks.is_gated:
        assert torch.all(after[..., neuron] == 0)
    else:
        act_of_zero = blocks.mlp_part(layer, "act")(torch.zeros(()))
        assert torch.all(after[..., neuron] == act_of_zero)
    others = [i for i in range(before.shape[-1]) if i != neuron]
    torch.testing.assert_close(after[..., others], before[..., others], rtol=0, atol=0)


# ---- hooks -----------------------------------------------------------------------------------------


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["blocks.0.hook_resid_post", "blocks.11.mlp.hook_post", "blocks.3.mlp.hook_in"])
def test_parse_hook_name_accepts_good_names(name):
    layer, point = parse_hook_name(name)
    assert hook_name(layer, point) == name and point in POINTS


@pytest.mark.parametrize("name", ["", "blocks.0", "blocks.x.hook_resid_post", "blocks.-1.hook_resid_post",
                                  "block.0.hook_resid_post", "blocks.0.hook_nope", "blocks.0.hook_post",
                                  "blocks.0.mlp.hook_post.x", " blocks.0.hook_resid_post", "0.hook_resid_post",
                                  "blocks.0.mlp_hook_in"])
def test_parse_hook_name_rejects_bad_names(name):
    with pytest.raises(ValueError, match="unknown hook name"):
        parse_hook_name(name)


def test_hooks_reject_a_layer_out_of_range_and_attach_nothing(tiny):
    lm = tiny("llama")
    fine = hook_name(0, "hook_resid_post")
    with pytest.raises(IndexError):
        with hooks(lm.model, [(fine, lambda n, t: None), (hook_name(N_LAYERS, "hook_resid_post"), lambda n, t: None)]):
            pass
    assert _no_hooks_left(lm.model)


def test_hooks_detach_after_an_exception(tiny):
    lm = tiny("gpt2")
    with pytest.raises(KeyError):
        with hooks(lm.model, {hook_name(0, p): (lambda n, t: None) for p in POINTS}):
            assert not _no_hooks_left(lm.model)
            raise KeyError("body failed")
    assert _no_hooks_left(lm.model)


def test_hook_return_value_replaces_the_tensor(lm):
    """Output side: a replaced resid_post is what the next block receives. Input side: a replaced
    mlp.hook_in is what the MLP computes on."""
    inputs = sample_inputs(lm)
    pos = n_positions(lm, inputs)
    z = torch.linspace(-1, 1, 2 * pos * D_MODEL).reshape(2, pos, D_MODEL)
    with hooks(lm.model, {hook_name(0, "hook_resid_post"): lambda n, t: z}):
        store = record_all(lm, inputs, ["hook_resid_pre"])
    assert torch.equal(store[hook_name(1, "hook_resid_pre")], z)

    with hooks(lm.model, {hook_name(0, "mlp.hook_in"): lambda n, t: z}):
        store = record_all(lm, inputs, ["mlp.hook_out"])
    with torch.inference_mode():
        direct = lm.blocks.part(0, "mlp")(z)
        direct = direct[0] if isinstance(direct, tuple) else direct
        if lm.blocks.adapter.mlp_out:  # an FFN over two modules (BERT): the second one's output
            direct = lm.blocks.mlp_out(0)(direct)
    torch.testing.assert_close(store[hook_name(0, "mlp.hook_out")], direct, rtol=1e-5, atol=1e-6)
    assert _no_hooks_left(lm.model)


def test_unknown_family_names_how_to_add_it():
    class Strange(nn.Module):
        config = types.SimpleNamespace(model_type="falcon_mamba")

    with pytest.raises(UnsupportedModelError, match="falcon_mamba") as err:
        Blocks.of(Strange())
    message = str(err.value)
    assert "adapters.py" in message and "Adapter(" in message and "llama" in message
    assert isinstance(err.value, ValueError)
    with pytest.raises(UnsupportedModelError):
        with hooks(Strange(), {}):
            pass


# ---- scan and the massive-weight search end to end ---------------------------------------------------


def test_scan_runs_and_is_well_formed(text_lm):
    prompts = builtin_prompts()
    result = scan(text_lm, criterion=Criterion.relative(50.0), progress=False, top_k=20)
    assert isinstance(result, ScanResult)
    assert result.prompts == len(prompts)
    assert result.tokens == sum(len(text_lm.encode(p)) for p in prompts)
    assert result.model["family"] == text_lm.family and result.model["layers"] == N_LAYERS
    assert [layer["layer"] for layer in result.layers] == list(range(N_LAYERS))
    for layer in result.layers:
        ranks = [layer[f"top-{k}"] for k in (1, 2, 3, 4, 5, 10)]
        assert ranks == sorted(ranks, reverse=True) and ranks[-1] > 0
        assert layer["top-1"] >= layer["top 1%"] >= layer["top 10%"] >= layer["median"] > 0
        assert all(0 <= d < D_MODEL for d in layer["massive_dims"])
        for entry in layer["top_entries"]:
            assert 0 <= entry["dim"] < D_MODEL and 0 <= entry["prompt"] < len(prompts)
            assert 0 <= entry["position"] < len(text_lm.encode(prompts[entry["prompt"]]))
        mags = [abs(e["value"]) for e in layer["top_entries"]]
        assert mags == sorted(mags, reverse=True) and mags[0] >= layer["top-1"] * (1 - 1e-6)
        assert layer["threshold"] == pytest.approx(max(0.0, 50.0 * layer["median"]))
    assert set(result.massive_layers) <= set(range(N_LAYERS))
    assert all(0 <= d < D_MODEL for d in result.dims)
    for v in result.values:
        assert v["count"] >= 1 and abs(v["mean"]) <= v["max_abs"] + 1e-6 and v["role"] in ROLES
        assert v["dim"] in result.layers[v["layer"]]["massive_dims"]
    assert result.roles["bos"]["prompts_with_role"] == len(prompts)
    assert result.to_dict()["point"] == "hook_resid_post"


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_scan_finds_a_planted_massive_activation(family, tokenizer):
    """A huge BOS embedding entry rides the residual stream through every layer: the scan must report
    exactly that dimension, on the BOS token of every prompt, in every layer."""
    lm = build(family, tokenizer)
    dim = plant_bos_embedding(lm, dim=11, value=1e4)
    n = len(builtin_prompts())
    result = scan(lm, progress=False)
    assert result.found and result.massive_layers == list(range(N_LAYERS))
    assert result.first_layer == 0 and result.vanish_layer is None
    assert result.dims == [dim]
    assert {v["role"] for v in result.values} == {"bos"}
    assert all(v["count"] == n and v["dim"] == dim and v["max_abs"] > 1e3 for v in result.values)
    assert result.roles["bos"] == {"prompts_with_massive": n, "prompts_with_role": n}
    assert result.token_strings[0] == {"token": "<bos>", "token_id": BOS_ID, "count": n}
    for layer in result.layers:
        assert layer["massive_count"] == n and layer["massive_dims"] == [dim]
        assert layer["top_entries"][0]["dim"] == dim and layer["top_entries"][0]["position"] == 0
        assert layer["top_entries"][0]["token"] == "<bos>"


def test_find_massive_weights_is_well_formed(text_lm):
    mw = find_massive_weights(text_lm, k=4)
    assert isinstance(mw, MassiveWeights)
    size = d_mlp(text_lm) if mw.expert != "shared" else D_MLP  # qwen2_moe's shared expert is wider
    assert 0 <= mw.layer < N_LAYERS and 0 <= mw.dim < D_MODEL and mw.intermediate_size == size
    assert mw.k == 4 and len(mw.indices) == 4 == len(set(mw.indices)) == len(mw.activations) == len(mw.rows)
    assert all(0 <= i < size for i in mw.indices)
    mags = [abs(a) for a in mw.activations]
    assert mags == sorted(mags, reverse=True)
    assert mw.gated == text_lm.blocks.is_gated
    assert mw.n_weights == (2 if mw.gated else 1) * 4 * D_MODEL
    assert [r["index"] for r in mw.rows] == mw.indices
    # Yu et al.'s super weight: the FFN output's largest dim, the largest intermediate index (position 0)
    assert 0 <= mw.super_weight["row"] < D_MODEL and mw.super_weight["column"] == mw.indices[0]
    assert mw.largest_down_entry["row"] == mw.dim and mw.largest_down_entry["column"] in mw.indices
    assert [t["layer"] for t in mw.trace] == list(range(N_LAYERS))
    if text_lm.blocks.is_moe:
        assert mw.expert in [*range(N_EXPERTS), "shared"] and mw.experts[0]["expert"] == mw.expert
    else:
        assert mw.expert is None
    assert mw.to_dict()["n_weights"] == mw.n_weights
    assert not mw.massive and any(n.startswith("no massive activation") for n in mw.notes)  # random weights
    assert mw.not_massive in mw.notes and "layer" in mw.not_massive  # the note a command warns with


def test_find_massive_weights_k_out_of_range_names_the_size(tiny):
    for family in ("llama", "gpt2", "qwen2_moe"):
        size = find_massive_weights(tiny(family), k=1, n_prompts=2).intermediate_size  # the chosen expert's
        assert size in {EXPECTED_D_MLP[family], D_MLP}  # qwen2_moe: a routed expert's, or the shared expert's
        for k in (size + 1, 0):
            with pytest.raises(ValueError, match=rf"k={k}.*{size} intermediate"):
                find_massive_weights(tiny(family), k=k, n_prompts=2)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_find_massive_weights_recovers_planted_rows(family, tokenizer):
    """Plant neuron 5 of layer 0 to fire hugely on BOS and write into dim 7: the search must find
    layer 0, dim 7, neuron 5 first, and W_down[7, 5] as the super weight."""
    lm = build(family, tokenizer)
    plant = plant_massive_weight(lm, layer=0, neuron=5, dim=7)
    mw = find_massive_weights(lm, k=3)
    assert (mw.layer, mw.dim, mw.indices[0]) == (0, 7, 5)
    assert mw.stable_across_prompts
    assert mw.super_weight == {"layer": 0, "row": 7, "column": 5, "value": pytest.approx(plant["down"]),
                               "matrix": "W_down"}
    assert mw.largest_down_entry == mw.super_weight  # here the largest entry of the row is the super weight too
    assert abs(mw.activations[0]) > 10 * abs(mw.activations[1])
    assert mw.expert == plant["bos_expert"]
    if family not in SANDWICH_FAMILIES:
        assert mw.trace[0]["ffn"] > 1000 and abs(mw.trace[1]["resid_post"]) > 1000
