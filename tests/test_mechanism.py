"""Unit tests of the mechanism analyses on tiny random models: attention sinks, concentration and the
value-update decomposition, the BOS trace, the BOS position study, and their commands."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cardhouse.analysis.attention import analyze_attention
from cardhouse.analysis.attention_map import attention_map
from cardhouse.analysis.massive_tokens import massive_tokens
from cardhouse.analysis.value_updates import decompose_update
from cardhouse.analysis.position import MIN_TOKENS, PLACEMENTS, placed, position_study
from cardhouse.analysis.tokens import roles
from cardhouse.analysis.trace import STATES, qkv_trajectories, trace_bos
from cardhouse.capture import hook_name, record
from cardhouse.cli import app
from conftest import BOS_ID, N_LAYERS, build, plant_bos_embedding, plant_massive_weight

PROMPTS = ["The quick brown fox. It jumps over the lazy dog.", "Summer is warm, winter is cold."]
ATTENTION_FAMILIES = ["llama", "qwen3", "gemma3_text", "mixtral"]  # GQA (4 query heads, 2 kv heads); q/k norms; sandwich; MoE


@pytest.fixture(scope="module")
def planted(tokenizer):
    """Tiny models whose BOS token carries a massive activation in every layer (set C = {0})."""
    cache = {}

    def get(family):
        if family not in cache:
            lm = build(family, tokenizer)
            plant_bos_embedding(lm)
            cache[family] = lm
        return cache[family]

    return get


# ---- eager attention --------------------------------------------------------------------------------


def test_an_implementation_without_probabilities_is_an_error(tiny):
    lm = tiny("llama")
    before = lm.model.config._attn_implementation
    with pytest.raises(ValueError, match="returns no attention probabilities"):
        analyze_attention(lm, PROMPTS, implementation="sdpa", progress=False)
    with pytest.raises(ValueError, match="returns no attention probabilities"):
        attention_map(lm, PROMPTS[0], 1, 0, implementation="sdpa")
    with pytest.raises(ValueError, match="cannot switch"):
        analyze_attention(lm, PROMPTS, implementation="no-such-kernel", progress=False)
    assert lm.model.config._attn_implementation == before


def test_attention_map_is_a_causal_probability_map(tiny):
    lm = tiny("gemma3_text")
    amap = attention_map(lm, PROMPTS[1], 1, 3)
    n = len(lm.encode(PROMPTS[1]))
    assert amap.probs.shape == amap.logits.shape == (n, n) and len(amap.tokens) == n
    assert torch.allclose(amap.probs.sum(-1), torch.ones(n), atol=1e-5)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    assert (amap.probs[upper] == 0).all() and amap.logits[upper].isnan().all()
    # the logits are what the softmax saw: softmax(logits) reproduces the probabilities
    assert torch.allclose(torch.softmax(amap.logits.nan_to_num(float("-inf")), -1), amap.probs, atol=1e-6)
    assert any("eager" in note for note in amap.notes)


@pytest.mark.parametrize("layer, head, error", [(N_LAYERS, 0, "layer 2 is out of range"), (-1, 0, "out of range"),
                                                (0, 4, "head 4 is out of range")])
def test_layer_or_head_out_of_range(tiny, layer, head, error):
    with pytest.raises(IndexError, match=error):
        attention_map(tiny("llama"), PROMPTS[0], layer, head)


# ---- the value-update decomposition --------------------------------------------------------------


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_decomposition_sums_back_to_the_attention_output(planted, family):
    lm = planted(family)
    parts = decompose_update(lm, PROMPTS[0], 1)
    assert parts.massive_positions == [0]
    n, d = len(lm.encode(PROMPTS[0])), lm.model.config.hidden_size
    assert parts.from_c.shape == parts.rest.shape == parts.output.shape == (n, d)
    scale = parts.output.abs().max()
    assert ((parts.from_c + parts.rest) - parts.output).abs().max() <= 1e-6 * scale
    # the output is the model's own attention output (hook_attn_out), not a recomputation
    name = hook_name(1, "hook_attn_out")
    with torch.inference_mode(), record(lm.model, [name]) as store:
        lm.model.base_model(input_ids=torch.tensor([lm.encode(PROMPTS[0])]), use_cache=False)
    assert torch.allclose(parts.output, store[name][0], atol=1e-6)
    # the BOS query sees only itself, which is in set C: its whole update (less o_proj's bias) is the set-C part
    assert torch.allclose(parts.from_c[0] + parts.rest[0], parts.output[0], atol=1e-6)


def test_decomposition_needs_the_output_projection(tiny):
    from cardhouse.models.adapters import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="o_proj"):  # GPT-2's c_proj is a Conv1D: not in the table
        decompose_update(tiny("gpt2"), PROMPTS[0], 1, [0])


@pytest.mark.parametrize("family", ["phi3", "deepseek_v3"])
def test_decomposition_reads_fused_and_latent_attention_at_the_hook_points(tiny, family):
    """Values come from attn.hook_v, so fused qkv (Phi-3) and latent attention (DeepSeek) decompose too."""
    lm = tiny(family)
    parts = decompose_update(lm, PROMPTS[0], 1, [0])
    assert ((parts.from_c + parts.rest) - parts.output).abs().max() <= 1e-6 * parts.output.abs().max()
    assert parts.from_c.abs().max() > 0 and parts.rest.abs().max() > 0


def test_decomposition_with_an_empty_set_c_is_all_rest(tiny):
    parts = decompose_update(tiny("llama"), PROMPTS[0], 0, [])
    assert parts.from_c.abs().max() == 0
    assert torch.allclose(parts.rest, parts.output, atol=1e-6)


# ---- the streaming analysis ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_analysis_shapes_and_set_c(planted, family):
    lm = planted(family)
    r = analyze_attention(lm, PROMPTS, progress=False)
    n_heads = lm.blocks.heads[0]
    assert r.massive_positions == [[0], [0]] and r.massive_layer == 0
    assert r.massive_layers == list(range(N_LAYERS))
    assert len(r.layers) == N_LAYERS
    for row in r.layers:
        assert len(row["concentration"]) == n_heads
        assert set(row["sink"]) == {"massive", "bos", "first delimiter", "other"}
        assert all(len(v) == n_heads and all(0 <= x <= 1 for x in v) for v in row["sink"].values())
        assert row["update"]["max_relative_sum_error"] < 1e-6
        assert -1 <= row["update"]["cos_c_all"] <= 1 and 0 <= row["update"]["norm_share_c"] <= 1
    assert r.summary["after"]["layers"] == [1]
    assert lm.model.config._attn_implementation != "eager"
    json.dumps(r.to_dict())


def test_streamed_numbers_match_the_full_map(planted):
    """The on-the-fly reduction gives what the full probability map gives."""
    lm = planted("llama")
    prompt = PROMPTS[0]
    r = analyze_attention(lm, [prompt], progress=False)
    for head in range(lm.blocks.heads[0]):
        probs = attention_map(lm, prompt, 1, head).probs  # [query, key]
        n = probs.shape[0]
        share_on_bos = probs[1:, 0].mean()  # ordinary queries (all but BOS) on set C = {BOS}
        assert r.layers[1]["concentration"][head] == pytest.approx(float(share_on_bos), abs=1e-5)
        received = probs.sum(0) / torch.arange(n, 0, -1)  # key k is seen by the n - k queries after it
        assert r.layers[1]["sink"]["bos"][head] == pytest.approx(float(received[0]), abs=1e-5)
        assert r.layers[1]["sink"]["massive"][head] == pytest.approx(float(received[0]), abs=1e-5)
        others = [k for k, role in enumerate(roles(lm.tokenizer, lm.encode(prompt), lm.bos_id)) if role == "other"]
        assert r.layers[1]["sink"]["other"][head] == pytest.approx(float(received[others].mean()), abs=1e-5)


def test_padding_does_not_change_the_numbers(planted):
    lm = planted("llama")
    one = analyze_attention(lm, [PROMPTS[1]], progress=False)
    padded = analyze_attention(lm, [PROMPTS[1], PROMPTS[0]], batch_size=2, progress=False)  # PROMPTS[1] padded
    alone = analyze_attention(lm, [PROMPTS[1], PROMPTS[0]], batch_size=1, progress=False)
    assert padded.layers[1]["concentration"] == pytest.approx(alone.layers[1]["concentration"], abs=1e-5)
    assert padded.layers[1]["sink"]["other"] == pytest.approx(alone.layers[1]["sink"]["other"], abs=1e-5)
    assert one.massive_positions == [[0]]


def test_no_massive_activation_means_an_empty_set_c(tiny):
    lm = tiny("llama")
    positions, layers = massive_tokens(lm, [lm.encode(p) for p in PROMPTS])
    assert positions == [[], []] and layers == []
    r = analyze_attention(lm, PROMPTS, progress=False)
    assert r.massive_layer is None and any("set C is empty" in n for n in r.notes)
    assert all(x == 0 for x in r.layers[1]["concentration"])


def test_bad_threshold(tiny):
    with pytest.raises(ValueError, match="threshold"):
        analyze_attention(tiny("llama"), PROMPTS, threshold=1.5, progress=False)


# ---- the BOS trace ----------------------------------------------------------------------------


def test_trace_finds_a_planted_massive_weight(tokenizer):
    lm = build("llama", tokenizer)
    plant_massive_weight(lm, layer=1, neuron=5, dim=7, scale=6.0, down=100.0)
    t = trace_bos(lm, PROMPTS, k=3)
    assert (t.layer, t.dim, t.indices[0]) == (1, 7, 5)
    assert len(t.states) == N_LAYERS and set(STATES) <= set(t.states[0])
    # the jump: the FFN of layer 1 writes dim 7, and h_l carries it
    assert t.states[1]["ffn out"]["top_dims"][0] == 7 and t.states[1]["h_l"]["top_dims"][0] == 7
    assert t.jump()[1] > 10 * t.jump()[0]
    assert t.intermediate[1]["indices"][0] == 5
    assert {"massive_q", "other_v"} <= set(t.qkv[1])  # set C is the BOS token from layer 1 on
    json.dumps(t.to_dict())


def test_trace_reads_fused_qkv_at_the_hook_points(tiny):
    t = trace_bos(tiny("phi3"), PROMPTS, k=2)  # one fused qkv_proj: no module boundary per q, k, v
    assert len(t.qkv) == N_LAYERS and all(row["other_q"] > 0 and row["other_v"] > 0 for row in t.qkv)
    assert not any("q/k/v" in n for n in t.notes)


def test_trace_qkv_norms_are_the_projections_norms_without_qk_norms(tiny):
    """Rotary embeddings rotate pairs of dimensions: the norms at attn.hook_q/k equal the projections'."""
    lm = tiny("llama")
    ids = [lm.encode(p) for p in PROMPTS]
    rows = qkv_trajectories(lm, ids, [[0], [0]])
    for layer in range(N_LAYERS):
        attn = lm.blocks.part(layer, "attn")
        for name in ("q", "k", "v"):
            with torch.inference_mode(), record(lm.model, [hook_name(layer, "attn.hook_in")]) as store:
                norms = [getattr(attn, f"{name}_proj")(_normed(lm, layer, i, store)).norm(dim=-1) for i in ids]
            massive = sum(float(n[0, 0]) for n in norms) / len(ids)
            other = sum(float(n[0, 1:].sum()) for n in norms) / sum(len(i) - 1 for i in ids)
            assert rows[layer][f"massive_{name}"] == pytest.approx(massive, rel=1e-5)
            assert rows[layer][f"other_{name}"] == pytest.approx(other, rel=1e-5)


def _normed(lm, layer, ids, store):
    lm.model.base_model(input_ids=torch.tensor([ids]), use_cache=False)
    return store[hook_name(layer, "attn.hook_in")]


# ---- the BOS position study -------------------------------------------------------------------


def test_placements():
    ids = [10, 11, 12, 13, 14]
    assert placed(ids, 1, "start") == ([1, 10, 11, 12, 13, 14], 0)
    assert placed(ids, 1, "middle") == ([10, 11, 1, 12, 13, 14], 2)
    assert placed(ids, 1, "end") == ([10, 11, 12, 13, 14, 1], 5)
    assert placed(ids, 1, "absent") == (ids, None)


def test_position_study_follows_a_planted_bos(tokenizer):
    lm = build("llama", tokenizer)
    plant_bos_embedding(lm)  # BOS's embedding is massive wherever BOS is placed
    s = position_study(lm, "Summer is warm.")
    assert set(s.summary) == set(PLACEMENTS) and len(s.layers) == N_LAYERS
    for placement in ("start", "middle", "end"):
        carrier = s.summary[placement]
        assert carrier["role"] == "bos" and carrier["position"] == s.bos_position[placement]
        assert s.tokens[placement][carrier["position"]] == tokenizer.decode([BOS_ID])
    assert s.summary["absent"]["role"] != "bos" and s.bos_position["absent"] is None


def test_position_study_needs_a_long_enough_prompt(tiny):
    with pytest.raises(ValueError, match="too short"):
        position_study(tiny("llama"), "abc")
    assert MIN_TOKENS == 4


# ---- the commands ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    lm = build("llama", tokenizer)
    plant_bos_embedding(lm)
    path = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_commands_write_json_and_plots(folder, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["attention", "-m", str(folder), "--limit", "3", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "attention.json").read_text())["results"]
    assert data["attention"]["massive_layer"] == 0 and data["map"]["layer"] == 1
    assert "set C: the tokens at position(s) 0" in " ".join(r.output.split())  # was "set C = [(0,)] ..."
    assert (tmp_path / "attention.png").stat().st_size > 0 and (tmp_path / "attention_map.png").stat().st_size > 0
    r = runner.invoke(app, ["trace", "-m", str(folder), "--k", "3", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "trace.png").exists() and json.loads((tmp_path / "trace.json").read_text())["results"]["trace"]["states"]
    r = runner.invoke(app, ["position", "-m", str(folder), "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "position.json").read_text())["results"]["position"]["summary"]["start"]["role"] == "bos"


@pytest.mark.parametrize("args, message", [
    (["attention", "--map-layer", "9"], "--map-layer must be an integer in 0..1, got 9"),
    (["attention", "--map-head", "7"], "--map-head must be an integer in 0..3, got 7"),
    (["attention", "--attn-implementation", "sdpa"], "--attn-implementation must be 'eager'"),
    (["trace", "--layer", "5"], "--layer must be an integer in 0..1, got 5"),
    (["position", "--prompt", "Hi"], "too short"),
])
def test_commands_bad_input_is_one_clear_error(folder, tmp_path, args, message):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, [args[0], "-m", str(folder), *args[1:], "-o", str(out)])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert not any(out.glob("*.json"))
