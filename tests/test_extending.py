"""README "Extending": a new attack and a new metric are one registry entry each, and every consumer
(attack(), the sweep, the tables, the plots, the CLI's checks, the measurer) picks them up."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

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


# ---- no consumer goes around the registries ------------------------------------------------------------

ROW_KEY = re.compile(r"(ppl|acc)_")  # a per-source metric key written out, or its prefix
KEYS_ALLOWED = {
    "evaluation/metrics.py": "the registry itself",
    "evaluation/zeroshot.py": "lm-eval's own result names (acc, acc_norm), read before they become row keys",
}


def registry_bypasses(root: Path) -> list[str]:
    """Row keys spelled out (``"ppl_" + corpus``, ``"acc_mean"``) instead of read from a ``MetricSpec``, and tests
    on a variant's name (``"weight" in row["variant"]``, ``row["kind"].endswith(...)``, ``name.split(" k=")``)
    instead of its typed fields."""
    found = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and ROW_KEY.match(node.value) \
                    and where not in KEYS_ALLOWED:
                found.append(f"{where}:{node.lineno}: metric key {node.value!r}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("startswith", "endswith", "split", "removeprefix", "removesuffix"):
                of = node.func.value
                if isinstance(of, ast.Subscript) and isinstance(of.slice, ast.Constant) and \
                        of.slice.value in ("variant", "kind"):
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
                if any(isinstance(a, ast.Constant) and isinstance(a.value, str) and " k=" in a.value for a in node.args):
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) and \
                    any(isinstance(c, ast.Subscript) and isinstance(c.slice, ast.Constant) and c.slice.value == "variant"
                        for c in node.comparators):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_consumers_read_the_registries_not_names(tmp_path):
    import cardhouse

    assert not registry_bypasses(Path(cardhouse.__file__).parent), registry_bypasses(Path(cardhouse.__file__).parent)
    (tmp_path / "x.py").write_text('keys = [k for k in row if k.startswith("ppl_")]\nrow["acc_mean"]\n'
                                   'rows = [r for r in rows if "weight" not in r["variant"]]\n'
                                   'kind, k = name.split(" k=")\nr["kind"].endswith("experts")\n')
    assert len(registry_bypasses(tmp_path)) == 5  # each convention the issue named is seen
