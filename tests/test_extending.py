"""README "Extending": a new attack and a new metric are one registry entry each, and every consumer
(attack(), the sweep, the tables, the plots, the CLI's checks, the measurer) picks them up."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import all_params_digest, build, plant_massive_weight
from typer.testing import CliRunner

from cardhouse.analysis import find_massive_weights
from cardhouse.cli import app
from cardhouse.data.corpora import CORPORA, Corpus
from cardhouse.evaluation.measure import Budget, measurer
from cardhouse.evaluation.metrics import METRICS, PPL, MetricSpec, curve_metrics, metric_keys, metric_of
from cardhouse.interventions import ATTACKS, AttackSpec, Edit, attack, overwrite_slices, run_variants, sweep_attacks
from cardhouse.interventions.sweep import sweep_table, sweep_variants
from cardhouse.reports.plots import plot_sweep


# ---- the README's attack entry (its control is a second entry) ------------------------------------------


def negate(rows):
    """An edit that flips the sign of W_up/W_gate rows ``rows(target)`` (restored bit-identically on exit)."""
    def edit(t):
        chosen = rows(t)
        slices = [(tensor, axis, torch.tensor([offset + i for i in chosen]), torch.neg)
                  for tensor, axis, offset in t.lm.blocks.neuron_slices(t.layer, t.expert)]
        return Edit(f"negate W_up/W_gate rows {chosen} of layer {t.layer}", lambda: overwrite_slices(slices), chosen)
    return edit


NEGATE = [AttackSpec("topk-negate", "flip the sign of the top-k rows", negate(lambda t: t.top), control="random-negate",
                     style="^-"),
          AttackSpec("random-negate", "control: flip the sign of k random rows", negate(lambda t: t.random), style="^:")]


@pytest.fixture
def registered(monkeypatch):
    for spec in NEGATE:
        monkeypatch.setitem(ATTACKS, spec.name, spec)


def test_a_new_attack_is_one_entry_everywhere(registered, tmp_path):
    lm = build("llama")
    plant_massive_weight(lm, layer=1, neuron=5)
    mw = find_massive_weights(lm, k=lm.blocks.intermediate_size(1))
    top, control = attack(lm, mw, "topk-negate", k=2), attack(lm, mw, "random-negate", k=2)
    assert (top.name, top.kind, top.k, top.indices[0], top.control_of) == ("topk-negate k=2", "topk-negate", 2, 5, None)
    assert control.control_of == "topk-negate" and 5 not in control.indices
    assert sweep_attacks()[-2:] == ["topk-negate", "random-negate"]
    assert {v.name for v in sweep_variants(lm, mw, [1])} >= {"topk-negate k=1", "random-negate k=1"}

    row = lm.blocks.neuron_slices(1)[0]
    before, digest = row[0].index_select(row[1], torch.tensor([row[2] + 5])).clone(), all_params_digest(lm)
    with top.apply():
        assert torch.equal(row[0].index_select(row[1], torch.tensor([row[2] + 5])), -before)
    assert all_params_digest(lm) == digest

    rows = run_variants(lm, [top, control], lambda lm: {"ppl_x": 1.0})
    assert [r["kind"] for r in rows] == ["topk-negate", "random-negate"]
    curves = sweep_table(rows, "ppl_x")
    assert curves["topk-negate"] == [(2, 1.0)] and curves["random-negate"] == [(2, 1.0)]
    assert plot_sweep({"ppl_x": curves}, tmp_path / "sweep.png").stat().st_size > 0  # the style is the spec's


def test_the_cli_accepts_a_registered_attack(registered):
    accepted = CliRunner().invoke(app, ["attack", "topk-negate", "--corpus", "nope"])
    assert accepted.exit_code == 1 and "unknown corpus" in accepted.output  # past the attack check
    refused = CliRunner().invoke(app, ["attack", "topk-twist"])
    assert refused.exit_code == 1 and "topk-negate" in refused.output  # the registry lists it


# ---- the README's metric entry ------------------------------------------------------------------------


def mean_nll(lm, budget, progress):
    """lm -> {nll_<corpus>: mean negative log-likelihood per predicted token}, on the budget's corpora."""
    ppl = PPL.measure(lm, budget, progress)
    if ppl is None:
        return None
    return lambda lm: {NLL.key(PPL.source(key)): math.log(value) for key, value in ppl(lm).items()
                       if metric_of(key) is PPL}


NLL = MetricSpec("nll", "mean NLL", higher_is_better=False, unit="nats/token", per="corpus", fmt=".4f", measure=mean_nll)


def test_a_new_metric_is_one_entry_everywhere(monkeypatch, tmp_path, tokenizer, capsys):
    monkeypatch.setitem(METRICS, "nll", NLL)
    monkeypatch.setenv("CARDHOUSE_CACHE", str(tmp_path))
    monkeypatch.setitem(CORPORA, "tiny", Corpus("tiny", "test text", "this test", lambda: "A tiny text to score. " * 20))
    lm = build("llama", tokenizer)
    row = measurer(lm, Budget(corpora=["tiny"], max_tokens=126, context=64), progress=False)(lm)
    assert row["nll_tiny"] == pytest.approx(math.log(row["ppl_tiny"]))
    assert metric_keys(row) == ["ppl_tiny", "nll_tiny"] and curve_metrics(row) == ["ppl_tiny", "nll_tiny"]
    assert metric_of("nll_tiny") is NLL and metric_of("nll_tiny").label("nll_tiny") == "mean NLL (tiny)"

    from cardhouse.cli.attacks import _results_table

    _results_table([{"variant": "original", **row}], "t")
    assert "nll_tiny" in capsys.readouterr().out
