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


@pytest.mark.real
def test_smollm2_retrieves_a_planted_pass_key_at_a_short_length():
    from cardhouse.models import load_model

    lm = load_model("smollm2-135m")
    items = longctx.build_items(lm, ["passkey"], [256], [0.0], 4, corpus="austen", seed=0)
    rows = longctx.score(lm, items, batch_size=4)
    assert sum(r["correct"] for r in rows) >= 3, rows  # 4 of 4 in the documented run
