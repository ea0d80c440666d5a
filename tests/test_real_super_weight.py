"""The super weight (Yu et al. 2024) of the real bundled models, detected the paper's way and ranked by damage.

Measured on 2026-11-30 with this file's budget (the 32 built-in prompts; 1,022 Wikipedia tokens in
two 512-token windows with BOS first; `cardhouse super-weight --max-tokens 1022` and
`cardhouse super-weight -m gemma3-270m --ratio 10 --max-tokens 1022`):

- SmolLM2-135M: spikes (max |input| and |output| of W_down > 20x the median over layers) in layers
  11, 28 and 29. Layer 11's super weight is W_down[507, 1229] = 5.88: a_1229 = 3,065 on BOS writes
  18,008 of the super activation 24,882 (72%). The row's largest entry of the top indices,
  W_down[507, 1487] = 6.07 (the "super weight" cardhouse used to report), writes 27%. Zeroing
  W_down[507, 1229]: perplexity 24.0 -> 146.5; W_down[507, 1487]: 27.2; random weights of layer 11:
  24.0. Restoring the super activation after zeroing it: 24.0 (all of the damage returns).
- Gemma-3-270M: no layer spikes at the default ratio; at ratio 10 layer 0 does (on a space token,
  not BOS), with W_down[540, 1405] writing about 5% of it; zeroing it changes nothing.
"""

import pytest

from cardhouse import load_model
from cardhouse.analysis.super_weight import find_super_weights
from cardhouse.evaluation.measure import Budget, measurer
from cardhouse.interventions import weights_digest
from cardhouse.interventions.damage import rank_damage

pytestmark = pytest.mark.real
BUDGET = Budget(corpora=["wikipedia"], max_tokens=1022, context=512)


@pytest.fixture(scope="module")
def smollm2():
    lm = load_model("smollm2-135m")
    return lm, find_super_weights(lm)


@pytest.fixture(scope="module")
def smollm2_damage(smollm2):
    lm, scan = smollm2
    (layer11,) = [sw for sw in scan.super_weights if sw.layer == 11]
    before = weights_digest(list(lm.model.parameters()))
    result = rank_damage(lm, [layer11], measurer(lm, BUDGET, progress=False), n=2, controls=3)
    assert weights_digest(list(lm.model.parameters())) == before
    return result


def test_smollm2_super_weight_coordinates_and_contribution(smollm2):
    _, scan = smollm2
    assert [sw.layer for sw in scan.super_weights] == [11, 28, 29]
    sw = scan.super_weights[0]
    assert (sw.row, sw.column) == (507, 1229)
    assert sw.carrier["position"] == 0 and sw.carrier["token_id"] == 1 and sw.same_token  # BOS
    assert 2_500 < sw.input < 3_600 and 20_000 < sw.output < 30_000
    assert 0.6 < sw.share < 0.85  # most of the super activation comes through this one product
    # the row's largest entry (cardhouse's former "super weight") is another channel, writing far less
    big = sw.largest_down_entry
    assert big["column"] == 1487 and abs(big["value"]) > abs(sw.value) and 0.15 < big["share"] < 0.4
    assert sw.contributions[0]["channel"] == 1229 and sw.contributions[1]["channel"] == 1487
    assert sum(c["share"] for c in sw.contributions[:2]) > 0.95


def test_smollm2_damage_of_the_super_weight_against_random_controls(smollm2_damage):
    by_name = {r["name"]: r for r in smollm2_damage["candidates"]}
    super_ = by_name["super weight"]
    largest = next(r for r in smollm2_damage["candidates"] if r["column"] == 1487 and r["kind"] == "scalar")
    assert super_["damage"] > 3.0  # measured 6.1
    assert largest["damage"] < 1.5 and super_["damage"] > 2 * largest["damage"]  # measured 1.13
    controls = [r for r in smollm2_damage["candidates"] if r["control"] and r["kind"] == "scalar"]
    assert len(controls) == 3 and all(abs(r["damage"] - 1) < 0.01 for r in controls)
    assert by_name["row"]["damage"] > 100  # the whole row of W_down[507, :] (measured ~17,000)


def test_smollm2_restoring_the_super_activation_brings_the_quality_back(smollm2_damage):
    (restore,) = smollm2_damage["restore"]
    assert (restore["layer"], restore["row"], restore["column"], restore["position"]) == (11, 507, 1229, 0)
    assert restore["damage_zeroed"] > 3.0 and restore["returned"] > 0.9  # measured: all of it


def test_gemma3_has_no_super_weight_of_this_kind():
    lm = load_model("gemma3-270m")
    assert not find_super_weights(lm).found  # default ratio 20
    scan = find_super_weights(lm, ratio=10)
    assert [(sw.layer, sw.row, sw.column) for sw in scan.super_weights] == [(0, 540, 1405)]
    sw = scan.super_weights[0]
    assert sw.carrier["position"] != 0 and abs(sw.share) < 0.15  # not on BOS, and a small part of the spike
    one_window = Budget(corpora=["wikipedia"], max_tokens=511, context=512)  # Gemma's 262k-token head is slow
    result = rank_damage(lm, scan.super_weights, measurer(lm, one_window, progress=False), n=1, controls=2,
                         lines=False, restore=False)
    by_name = {r["name"]: r for r in result["candidates"]}
    assert abs(by_name["super weight"]["damage"] - 1) < 0.02
