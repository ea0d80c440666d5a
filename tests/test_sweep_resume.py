"""Fix 1 of issue 14: a resumed sweep reused rows measured under other settings and reported them under
the new labels. Now each sweep file says which settings its rows were measured under, a rerun resumes
only under the same ones, and any difference is refused, naming it; ``--ks 2,2`` measures k = 2 once."""

from __future__ import annotations

import json

import pytest
from conftest import build
from saved_models import save_tiny
from typer.testing import CliRunner

from cardhouse.cli import app
from cardhouse.interventions.sweep import read_rows, resumable_sweep
from cardhouse.journal import Journal, SettingsMismatch

BUDGET = {"corpora": ["wikipedia"], "max_tokens": 510, "context": 256, "tasks": [], "limit": None}


class Counter:
    """A measurement that counts its calls; its number depends on the weights (so a stale row would show)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, lm) -> dict:
        self.calls += 1
        return {"ppl_wikipedia": float(sum(p.detach().double().abs().sum() for p in lm.model.parameters()))}


@pytest.fixture
def lm():
    return build("llama")


def test_a_rerun_with_the_same_settings_measures_only_what_is_new(lm, tmp_path):
    path, first, second = tmp_path / "sweep.jsonl", Counter(), Counter()
    rows = resumable_sweep(lm, first, path, ks=[2], settings=BUDGET, progress=False)
    assert first.calls == 5 and len(rows) == 5
    rows = resumable_sweep(lm, second, path, ks=[2, 3], settings=BUDGET, progress=False)
    assert second.calls == 4  # only the four k = 3 variants
    assert [r["variant"] for r in rows][:5] == [r["variant"] for r in read_rows(path)][:5]


@pytest.mark.parametrize("change, named", [
    (dict(settings={**BUDGET, "max_tokens": 1020, "context": 128}), ["max_tokens: 510", "1020", "context: 256"]),
    (dict(settings={**BUDGET, "corpora": ["c4"]}), ["corpora"]),
    (dict(settings={**BUDGET, "tasks": ["piqa"], "limit": 10}), ["tasks", "limit"]),
    (dict(seed=7), ["seed: 0 (in the file) vs 7 (now)"]),
    (dict(layer=0), ["layer: null (in the file) vs 0 (now)"]),
])
def test_rows_of_other_settings_are_refused_naming_the_difference(lm, tmp_path, change, named):
    path = tmp_path / "sweep.jsonl"
    resumable_sweep(lm, Counter(), path, ks=[2], settings=BUDGET, progress=False)
    before = path.read_text()
    again = Counter()
    kwargs = {"settings": BUDGET, **change}
    with pytest.raises(SettingsMismatch) as info:
        resumable_sweep(lm, again, path, ks=[2], progress=False, **kwargs)
    for word in named:
        assert word in str(info.value)
    assert again.calls == 0 and path.read_text() == before  # nothing measured, the file untouched


def test_another_model_or_other_weights_are_refused(lm, tmp_path):
    path = tmp_path / "sweep.jsonl"
    resumable_sweep(lm, Counter(), path, ks=[2], settings=BUDGET, progress=False)
    other = build("llama", seed=1)  # same name, same architecture, other weights
    with pytest.raises(SettingsMismatch, match="weights"):
        resumable_sweep(other, Counter(), path, ks=[2], settings=BUDGET, progress=False)
    renamed = build("llama")
    renamed.name = "another-model"
    with pytest.raises(SettingsMismatch, match="model: \"tiny-llama\""):
        resumable_sweep(renamed, Counter(), path, ks=[2], settings=BUDGET, progress=False)


def test_duplicate_ks_are_measured_once(lm, tmp_path):  # --ks 2,2 measured every variant twice
    counter = Counter()
    rows = resumable_sweep(lm, counter, tmp_path / "sweep.jsonl", ks=[2, 2], settings=BUDGET, progress=False)
    assert counter.calls == 5 and len({r["variant"] for r in rows}) == len(rows) == 5


def test_a_file_without_settings_is_not_trusted(lm, tmp_path):
    path = tmp_path / "sweep.jsonl"
    path.write_text(json.dumps({"variant": "original", "ppl_wikipedia": 1.0}) + "\n")  # an older cardhouse's file
    with pytest.raises(SettingsMismatch, match="does not say which settings"):
        resumable_sweep(lm, Counter(), path, ks=[2], settings=BUDGET, progress=False)


def test_a_line_cut_by_an_interruption_is_measured_again(lm, tmp_path):
    path = tmp_path / "sweep.jsonl"
    rows = resumable_sweep(lm, Counter(), path, ks=[2], settings=BUDGET, progress=False)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:15])  # the last row half written
    counter = Counter()
    again = resumable_sweep(lm, counter, path, ks=[2], settings=BUDGET, progress=False)
    assert counter.calls == 1 and again == rows
    assert all(json.loads(line) for line in path.read_text().splitlines())  # no cut line left in the file


def test_journal_check_before_the_weights_load(tmp_path):
    path = tmp_path / "rows.jsonl"
    Journal(path, {"a": 1, "weights": "x"}).append({"row": 1})
    Journal(path, {}).check({"a": 1})  # the settings known before loading agree: no error
    with pytest.raises(SettingsMismatch, match="a: 1 .* vs 2"):
        Journal(path, {}).check({"a": 2})


# ---- the reproduction, through the command line -------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-models")
    return save_tiny(root / "a", plant=False), save_tiny(root / "b", seed=1, plant=False)


def test_the_sweep_command_refuses_a_resume_under_other_settings_before_loading(folders, tmp_path, monkeypatch):
    runner = CliRunner()
    a, b = map(str, folders)
    first = runner.invoke(app, ["sweep", "-m", a, "--ks", "2,2", "--max-tokens", "127", "--context", "64",
                                "-o", str(tmp_path)])
    assert first.exit_code == 0, first.output
    rows = read_rows(tmp_path / "sweep.jsonl")
    assert len(rows) == 5  # k = 2 once
    saved = (tmp_path / "sweep.jsonl").read_text()

    def refuse(*args, **kwargs):
        pytest.fail("weights were loaded for a sweep that cannot resume")

    monkeypatch.setattr("cardhouse.models.loading._load_auto", refuse)
    for args, named in ((["-m", a, "--max-tokens", "255", "--context", "128", "--seed", "7"],
                         ["max_tokens: 127", "context: 64", "seed: 0"]),
                        (["-m", a, "-c", "c4", "--max-tokens", "127", "--context", "64"], ["corpora"]),
                        (["-m", b, "--max-tokens", "127", "--context", "64"], ["model:"])):
        result = runner.invoke(app, ["sweep", "--ks", "2", "-o", str(tmp_path), *args])
        assert result.exit_code == 1, result.output
        error = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "holds rows measured with other settings" in error[0]
        for word in named:
            assert word in error[0], (word, error[0])
    assert (tmp_path / "sweep.jsonl").read_text() == saved
