"""Long-context retrieval: prompts of exactly the asked length with the needle where asked, clear
errors, and (real) a planted pass key retrieved by the unedited SmolLM2-135M."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cardhouse.cli import app
from cardhouse.evaluation import longctx


@pytest.fixture(scope="module")
def long_tiny():
    from test_lm_backend import long_lm

    return long_lm("llama")  # 512 positions


def test_prompts_have_the_length_and_the_needle_at_the_depth(long_tiny):
    lm = long_tiny
    items = longctx.build_items(lm, ["passkey", "needle"], [300, 400], [0.0, 1.0], 2, corpus="austen", seed=1)
    assert len(items) == 2 * 2 * 2 * 2
    decode = lambda ids: lm.tokenizer.decode(ids)  # noqa: E731  (character-level: one token per character)
    for item in items:
        assert len(item.ids) == item.length and item.ids[0] == lm.bos_id
        text = decode(item.ids[1:])
        assert item.answer in text and text.startswith(longctx.INSTRUCTION)
        before, after = text.split(item.answer, 1)
        if item.depth == 0.0:  # right after the instruction
            assert before[len(longctx.INSTRUCTION):].startswith(" The ")
        else:  # right before the question
            assert "\n\nWhat is" in after and len(after.split("\n\nWhat is")[0]) < 40
    keys = {i.answer for i in items if i.kind == "passkey"}
    assert len(keys) == 8 and all(len(k) == 5 and k.isdigit() for k in keys)


@pytest.mark.parametrize("kwargs, message", [
    ({"lengths": [600]}, r"context length\(s\) \[600\] plus 8 answer tokens exceed .* maximum of 512"),
    ({"kinds": ["summary"]}, "unknown long-context task"),
    ({"depths": [1.5]}, r"depths must lie in \[0, 1\]"),
    ({"n": 0}, "items per cell must be at least 1"),
])
def test_bad_settings_are_refused(long_tiny, kwargs, message):
    settings = {"kinds": ["passkey"], "lengths": [300], "depths": [0.5], "n": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        longctx.build_items(long_tiny, **settings)


def test_cli_refuses_a_length_above_the_maximum_before_any_evaluation(tmp_path, long_tiny):
    folder = tmp_path / "m"
    long_tiny.model.save_pretrained(folder)
    long_tiny.tokenizer.save_pretrained(folder)
    result = CliRunner().invoke(app, ["longctx", "-m", str(folder), "--lengths", "300,4096", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "error: context length(s) [4096]" in result.output
    assert not (tmp_path / "o" / "longctx.json").exists()


@pytest.mark.parametrize("variants", [3, 7])
def test_the_colour_bar_of_the_heat_maps_covers_no_panel(tmp_path, monkeypatch, variants):
    """Regression: with tight_layout the colour bar was drawn over a heat map (seen with 7 variants: original,
    attack, control and two adapters' pairs)."""
    from cardhouse.reports import plots

    cells = [{"kind": kind, "length": n, "depth": d, "n": 1, "accuracy": (n + d) % 2}
             for kind in ("passkey", "needle") for n in (256, 512) for d in (0.0, 0.5, 1.0)]
    rows = [{"variant": f"variant {i}", "cells": cells} for i in range(variants)]
    boxes = {}
    save = plots.save_figure

    def measured(fig, path, **kwargs):
        written = save(fig, path, **kwargs)  # the positions as drawn into the file, after any layout
        boxes["panels"] = [ax.get_position() for ax in fig.axes if ax.get_label() != "<colorbar>"]
        boxes["bar"] = next(ax.get_position() for ax in fig.axes if ax.get_label() == "<colorbar>")
        return written

    monkeypatch.setattr(plots, "save_figure", measured)
    assert plots.plot_longctx(rows, tmp_path / "longctx.png", "t").stat().st_size > 0
    assert len(boxes["panels"]) == 2 * variants
    assert not [box for box in boxes["panels"] if box.overlaps(boxes["bar"])]


@pytest.mark.real
def test_smollm2_retrieves_a_planted_pass_key_at_a_short_length():
    from cardhouse.models import load_model

    lm = load_model("smollm2-135m")
    items = longctx.build_items(lm, ["passkey"], [256], [0.0], 4, corpus="austen", seed=0)
    rows = longctx.score(lm, items, batch_size=4)
    assert sum(r["correct"] for r in rows) >= 3, rows  # 4 of 4 in the documented run
