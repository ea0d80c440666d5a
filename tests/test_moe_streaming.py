"""The MoE analysis of a streamed model (issue 15): one decoder block at a time, every batch through a block
before the next is read, it gives the ordinary load's router picture, carrier's expert and super experts —
on the planted tiny models of every MoE family (``test_moe``), and through ``cardhouse moe --stream``."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import MOE_FAMILIES
from test_moe import CARRIER_EXPERT, CARRIER_LAYER, DIM, NEURON, SUPER_EXPERT, SUPER_LAYER, build_moe, plant
from cardhouse.analysis.moe import analyze_moe
from cardhouse.cli import app
from cardhouse.models import load_model
from cardhouse.models.streaming import streamer_of
from cardhouse.results import validate


def save(family, folder, tokenizer):
    lm = build_moe(family, tokenizer)
    plant(lm)
    lm.model.save_pretrained(folder, max_shard_size="200KB")
    tokenizer.save_pretrained(folder)


def assert_same_analysis(a: dict, b: dict) -> None:
    """Equal up to float32 summation order (the routed experts' outputs are summed in another order)."""
    for key in ("moe_layers", "n_experts", "top_k", "shared_expert", "prompts", "collapse_layer", "collapsed_layers",
                "notes"):
        assert a[key] == b[key], key
    for ra, rb in zip(a["router"], b["router"], strict=True):
        for group in ("carrier", "ordinary"):
            x, y = ra[group], rb[group]
            assert (x["top1_expert"], x["tokens"], x["chosen"]) == (y["top1_expert"], y["tokens"], y["chosen"])
            assert x["probs"] == pytest.approx(y["probs"], rel=1e-5, abs=1e-9)
            assert (x["entropy"], x["top1"]) == pytest.approx((y["entropy"], y["top1"]), rel=1e-5, abs=1e-9)
    sa, sb = a["super_experts"], b["super_experts"]
    assert [(e["layer"], e["expert"]) for e in sa["flagged"]] == [(e["layer"], e["expert"]) for e in sb["flagged"]]
    for table in ("experts", "shared"):
        for x, y in zip(sa[table], sb[table], strict=True):
            assert x["max_abs"] == pytest.approx(y["max_abs"], rel=1e-5)
            assert {k: v for k, v in x.items() if k != "max_abs"} == {k: v for k, v in y.items() if k != "max_abs"}
    same = ("layer", "dim", "indices", "expert", "super_weight", "largest_down_entry")
    ma, mb = a["massive_weights"], b["massive_weights"]
    assert {k: ma[k] for k in same} == {k: mb[k] for k in same}
    assert [e["expert"] for e in ma["experts"]] == [e["expert"] for e in mb["experts"]]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_moe_analysis_equals_the_ordinary_one(family, tokenizer, tmp_path):
    save(family, tmp_path, tokenizer)
    ordinary = load_model(str(tmp_path), bos=True)
    streamed = load_model(str(tmp_path), bos=True, stream=True)
    assert streamer_of(streamed.model) is not None
    # batch_size 4: several batches, which a streamed run takes through each block in turn
    a = analyze_moe(ordinary, k=3, batch_size=4, progress=False).to_dict()
    b = analyze_moe(streamed, k=3, batch_size=4, progress=False).to_dict()
    assert all(p.is_meta for p in streamed.blocks.layers.parameters())  # no block left in memory
    assert a["collapse_layer"] == CARRIER_LAYER and a["super_experts"]["flagged"][0]["expert"] == SUPER_EXPERT
    assert_same_analysis(a, b)
    mw = b["massive_weights"]
    assert (b["collapse_layer"], mw["layer"], mw["dim"], mw["expert"], mw["indices"][0]) == \
        (CARRIER_LAYER, CARRIER_LAYER, DIM, CARRIER_EXPERT, NEURON)
    assert (b["super_experts"]["flagged"][0]["layer"], b["super_experts"]["flagged"][0]["expert"]) == \
        (SUPER_LAYER, SUPER_EXPERT)


def test_moe_command_streams(tokenizer, tmp_path):
    save("mixtral", tmp_path / "ckpt", tokenizer)
    runner = CliRunner()
    out = {}
    for name, extra in (("ordinary", []), ("streamed", ["--stream"])):
        result = runner.invoke(app, ["moe", "-m", str(tmp_path / "ckpt"), "--k", "3", "--limit", "12",
                                     "--batch-size", "4", "-o", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        out[name] = json.loads((tmp_path / name / "moe.json").read_text())
        validate(out[name], "moe")
    assert out["streamed"]["model"]["placement"]["stream"] is True
    assert_same_analysis(out["ordinary"]["results"], out["streamed"]["results"])
