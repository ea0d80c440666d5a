"""The command line: help everywhere, clear one-line errors before any model time, and the
attack / intervene / sweep commands end to end on the real SmolLM2 with a tiny token budget."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cardhouse.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_every_command_has_help():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"scan", "attack", "intervene", "sweep", "download", "models"} <= set(names)
    for name in names:
        result = run(name, "--help")
        assert result.exit_code == 0, (name, result.output)
        assert "Usage" in result.output


@pytest.mark.parametrize("args, message", [
    (["attack", "no-such-attack"], "unknown attack"),
    (["attack", "topk-zero", "--corpus", "nope"], "unknown corpus"),
    (["attack", "topk-zero", "--task", "nope"], "unknown zero-shot task"),
    (["attack", "topk-zero", "--max-tokens", "10"], "--max-tokens must be an integer >= 511"),
    (["attack", "topk-zero", "--task-limit", "0"], "--task-limit must be an integer >= 1"),
    (["intervene", "set-half"], "unknown intervention"),
    (["download", "no-such-model"], "unknown bundled model"),
    (["scan", "--model", "no-such-model"], "no-such-model"),
    (["attack", "topk-zero", "--json", "/proc/forbidden/out.json"], "--json must be a writable folder"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = run(*args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.real
def test_attack_writes_the_attack_and_its_control(tmp_path):
    out = tmp_path / "attack.json"
    result = run("attack", "topk-zero", "--k", "2", "--max-tokens", "511", "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    ppl = {row["variant"]: row["ppl_wikipedia"] for row in data["results"]}
    assert list(ppl) == ["original", "topk-zero k=2", "random-zero k=2"]
    assert data["massive_weights"]["layer"] == 11 and data["massive_weights"]["indices"][:2] == [1229, 1487]
    assert ppl["topk-zero k=2"] > 2 * ppl["original"]
    assert abs(ppl["random-zero k=2"] / ppl["original"] - 1) < 0.05
    assert all(row["tokens_wikipedia"] == 511 for row in data["results"])  # the same tokens for every row


@pytest.mark.real
@pytest.mark.parametrize("indices, message", [("1229,1229", "repeated"), ("1229,99999", "out of range")])
def test_attack_rejects_bad_indices(tmp_path, indices, message):
    out = tmp_path / "attack.json"
    result = run("attack", "topk-zero", "--indices", indices, "--max-tokens", "511", "--json", out)
    assert result.exit_code == 1 and message in result.output
    assert not out.exists()


@pytest.mark.real
def test_sweep_writes_table_and_plot_and_resumes(tmp_path):
    args = ("sweep", "--ks", "2", "--max-tokens", "511", "--out", tmp_path)
    first = run(*args)
    assert first.exit_code == 0, first.output
    from cardhouse.interventions.sweep import read_rows

    rows = read_rows(tmp_path / "sweep.jsonl")  # the rows after the settings line
    assert [r["variant"] for r in rows] == ["original", "topk-zero k=2", "random-zero k=2",
                                           "topk-retain k=2", "random-retain k=2"]
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 6
    ppl = {r["variant"]: r["ppl_wikipedia"] for r in rows}
    assert ppl["topk-zero k=2"] > 2 * ppl["original"] and ppl["random-retain k=2"] > ppl["topk-retain k=2"]

    # an interrupted sweep: the last row was cut mid-line; the rerun redoes only that one
    lines = (tmp_path / "sweep.jsonl").read_text().splitlines()
    (tmp_path / "sweep.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    second = run(*args)
    assert second.exit_code == 0, second.output
    again = read_rows(tmp_path / "sweep.jsonl")
    assert [r["variant"] for r in again] == [r["variant"] for r in rows]
    assert again[-1]["ppl_wikipedia"] == rows[-1]["ppl_wikipedia"]


def test_an_interrupted_attack_keeps_its_rows_and_restores_the_weights(tiny, tmp_path, monkeypatch):
    from conftest import all_params_digest

    from cardhouse.cli import attacks
    from cardhouse.evaluation.measure import Budget
    from cardhouse.interventions import Variant, original, zero_rows

    lm = tiny("llama")
    calls = []

    def measure(lm):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second variant
        return {"ppl_wikipedia": 1.0}

    monkeypatch.setattr("cardhouse.evaluation.measure.measurer", lambda lm, budget: measure)
    digest = all_params_digest(lm)
    variants = [original(), Variant("zeroed", "rows 1, 2", lambda: zero_rows(lm, 1, [1, 2]), 1)]
    out = tmp_path / "attack.json"
    with pytest.raises(KeyboardInterrupt):
        attacks._measure(lm, variants, Budget(), out, "title")
    data = json.loads(out.read_text())
    assert data["complete"] is False and [r["variant"] for r in data["results"]] == ["original"]
    assert all_params_digest(lm) == digest


def _options() -> dict[str, dict[str, str]]:
    """option name -> {command: its help without the parenthesised defaults}."""
    import re

    import typer.main

    found: dict[str, dict[str, str]] = {}
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            meaning = re.sub(r"\s*\([^)]*\)", "", getattr(param, "help", None) or "").strip()
            for opt in param.opts:
                if opt.startswith("--"):
                    found.setdefault(opt, {})[name] = meaning
    return found


# where one option name takes other values on one command (its meaning is the same); every other option name
# shared by two or more commands has one meaning everywhere, kept so by the shared options in cli/common.py
OTHER_VALUES = {
    ("--device", "emergence"): "trains its own small GPT: cpu or cuda, not an accelerate placement",
    ("--dtype", "memory"): "estimates a size: no checkpoint is loaded, so there is no 'auto' to read from it",
}
def test_one_meaning_per_option_name():
    shared = {option: {cmd: meaning for cmd, meaning in meanings.items()
                       if (option, cmd) not in OTHER_VALUES}
              for option, meanings in _options().items() if len(meanings) >= 2}
    assert {"--limit", "--k", "--layer", "--seed", "--out", "--json", "--batch-size", "--n"} <= set(shared)
    differ = {option: meanings for option, meanings in shared.items() if len(set(meanings.values())) > 1}
    assert not differ, differ
    assert all(m for meanings in shared.values() for m in meanings.values()), "an option without help"


def test_limit_counts_prompts_and_task_limit_zero_shot_examples():
    options = _options()
    assert {"scan", "attention"} <= set(options["--limit"]) and "prompts" in options["--limit"]["scan"]
    assert {"attack", "intervene", "sweep", "report", "finetune", "finetune-compare"} <= set(options["--task-limit"])
    assert "--records" in {o for o, cmds in options.items() if "finetune" in cmds}


def test_the_attack_help_names_every_registered_weight_attack():
    # regression: largest-down-entry was registered (and accepted) but missing from the help
    import typer.main

    from cardhouse.interventions import ATTACKS

    text = next(p for p in typer.main.get_command(app).commands["attack"].params if p.name == "kind").help
    assert [name for name in ATTACKS if name not in text] == []
