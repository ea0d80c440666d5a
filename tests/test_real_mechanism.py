"""Integration tests of the mechanism analyses on the real SmolLM2-135M (and one fast Gemma-3-270M contrast).

Measured with the functions below on the first 16 built-in prompts (BOS first), 2026-11-23:
SmolLM2: set C = {BOS} in every prompt, massive from layer l = 11. Layers > 11: ordinary tokens put
0.71 of their attention on BOS (0.34 in layers <= 11), BOS is a sink (> 0.3) in 0.99 of the heads
(0.62 before), the set-C part of the attention output has mean pairwise cosine 0.95 across all queries
and prompts against 0.29 for the rest. The BOS trace jumps from 29 to 24,926 in layer 11 (+24,882 from
the FFN). Position study: without BOS at position 0 the first word carries ~23,000 in dim 507, and BOS
in the middle or at the end has only ~100 there.
Gemma-3-270M: BOS is a sink in every head of every layer and carries the massive activation wherever it
is placed (~88,000 in dim 163 at layer 9, start, middle or end).
"""

import pytest

from cardhouse import load_model
from cardhouse.analysis import load_prompts
from cardhouse.analysis.attention import analyze_attention
from cardhouse.analysis.attention_map import attention_map
from cardhouse.analysis.value_updates import decompose_update
from cardhouse.analysis.position import position_study
from cardhouse.analysis.trace import trace_bos

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def lm():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def result(lm):
    return analyze_attention(lm, load_prompts(limit=16), progress=False)


def test_set_c_is_the_bos_token_from_layer_11(result):
    assert result.massive_layer == 11
    assert result.massive_positions == [[0]] * 16
    assert result.massive_layers[:17] == list(range(11, 28))


def test_bos_becomes_the_sink_after_layer_l(result):
    before, after = result.summary["before"], result.summary["after"]
    # measured: share on C 0.34 -> 0.71; heads with BOS as sink 0.62 -> 0.99; ordinary tokens never sinks
    assert after["concentration"] > 0.6 and after["concentration"] > before["concentration"] + 0.25
    assert after["sink_heads"]["bos"] > 0.95 and before["sink_heads"]["bos"] < 0.75
    assert after["sink_heads"]["other"] == 0
    assert after["sink"]["bos"] > 5 * after["sink"]["other"]
    # measured: in layers 10 and 11, where BOS is neither large (dim 507 ~ 30-40) nor massive yet, no head sinks on it
    assert result.layers[10]["sink_heads"]["bos"] == result.layers[11]["sink_heads"]["bos"] == 0
    for row in result.layers[12:28]:
        assert row["sink_heads"]["bos"] >= 8 / 9


def test_set_c_updates_are_an_implicit_bias(result):
    after = result.summary["after"]
    # measured: cos 0.95 (set C) vs 0.29 (rest) across all queries and prompts; norm share of set C 0.46
    assert after["cos_c_all"] > 0.9 and after["cos_rest_all"] < 0.5
    assert after["cos_c_within_prompt"] > 0.9
    assert 0.3 < after["norm_share_c"] < 0.7
    assert all(row["update"]["max_relative_sum_error"] < 1e-5 for row in result.layers)


def test_decomposition_of_one_prompt(lm):
    parts = decompose_update(lm, "The capital of France is Paris, and it is big.", 15)
    assert parts.massive_positions == [0]
    assert ((parts.from_c + parts.rest) - parts.output).abs().max() < 1e-5 * parts.output.abs().max()
    # queries 1.. all receive nearly the same set-C update
    c = parts.from_c[1:]
    unit = c / c.norm(dim=-1, keepdim=True)
    assert (unit @ unit.mean(0)).min() > 0.9


def test_attention_map_of_a_sink_head(lm):
    amap = attention_map(lm, "Summer is warm. Winter is cold.", 12, 8)
    assert amap.probs[1:4, 0].min() > 0.9  # measured: ~1.0 on BOS for the first words
    # the logits say the same before the softmax: BOS has the largest logit in most rows
    largest_other = amap.logits[1:, 1:].nan_to_num(float("-inf")).amax(-1)
    assert (amap.logits[1:, 0] > largest_other).float().mean() > 0.5


def test_trace_jumps_at_layer_11(lm):
    t = trace_bos(lm, n_prompts=2)
    assert (t.layer, t.dim, t.indices[:2]) == (11, 507, [1229, 1487])
    jump = t.jump()
    assert jump[10] < 100 and jump[11] > 24_000  # measured: 29 -> 24,926
    layer11 = t.states[11]
    assert layer11["ffn update"]["at_dim"] > 24_000 and abs(layer11["attention update"]["at_dim"]) < 100
    assert layer11["h_{l-1}"]["max_abs"] < 100 and layer11["h_l"]["top_dims"][0] == 507
    assert t.intermediate[11]["indices"][:2] == [1229, 1487]
    # Sun Fig. 7: once massive, the BOS token's q, k and v are small next to the other tokens'
    q = t.qkv[15]
    assert q["massive_k"] < 0.5 * q["other_k"] and q["massive_v"] < 0.5 * q["other_v"]


@pytest.mark.parametrize("prompt", load_prompts(limit=3))
def test_position_not_identity_carries_it(lm, prompt):
    s = position_study(lm, prompt)
    assert s.dim == 507
    assert s.summary["start"]["role"] == "bos" and s.summary["start"]["value"] > 24_000
    for placement in ("middle", "end", "absent"):
        carrier = s.summary[placement]
        # measured: the first word, 22,500-24,300; BOS elsewhere only ~100
        assert carrier["role"] == "first token" and carrier["position"] == 0
        assert 20_000 < carrier["value"] < 26_000
    for placement in ("middle", "end"):
        assert abs(s.summary[placement]["at_dim"]["bos"]) < 300


def test_gemma_contrast():
    gemma = load_model("gemma3-270m")
    r = analyze_attention(gemma, load_prompts(limit=4), progress=False)
    # measured: BOS in set C from layer 0 (2,984 there), a sink in all heads of almost all layers
    assert r.massive_layer == 0 and all(p[0] == 0 for p in r.massive_positions)
    assert sum(row["sink_heads"]["bos"] for row in r.layers) / len(r.layers) > 0.9
    s = position_study(gemma, load_prompts()[0])
    # measured: unlike SmolLM2, BOS carries it wherever it is (~88,000 at layer 9), and the largest
    # activation without BOS is on a delimiter, 3.4x smaller
    for placement in ("start", "middle", "end"):
        assert s.summary[placement]["role"] == "bos" and s.summary[placement]["value"] > 80_000
    assert s.summary["absent"]["role"] != "bos" and s.summary["absent"]["value"] < 40_000
