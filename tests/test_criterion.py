"""One Criterion decides "massive" everywhere: the scan, the massive-weight search, set C of the attention
analysis, MacDrop's refusal, and the same three CLI options on every command that decides."""

from __future__ import annotations

import inspect

import pytest
from conftest import build, plant_bos_embedding, plant_massive_weight, save_folder
from typer.testing import CliRunner

from cardhouse.analysis import Criterion, find_massive_weights, scan
from cardhouse.analysis.massive_tokens import massive_tokens
from cardhouse.capture import tokenize_prompts
from cardhouse.cli import app
from cardhouse.finetuning import NoMassiveWeightsError, detect_massive_rows

DECIDING = {"scan": [], "attention": [], "trace": [], "attack": ["topk-zero"], "intervene": ["set-zero"], "sweep": [],
            "report": [], "finetune": [], "finetune-compare": [], "moe": [], "longctx": [], "generate": [],
            "encoder": ["--images", "builtin"], "quantize": [], "export": ["never-written"]}  # command -> arguments


def test_a_criterion_says_what_it_means():
    assert Criterion().describe() == "|a| > 100 and > 1000x the layer median"
    assert Criterion.relative(50).describe() == "|a| > 50x the layer median"


def test_options_give_the_default_relative_and_custom_criteria():
    assert Criterion.from_options() == Criterion() == Criterion(100.0, 1000.0, 10.0)
    assert Criterion.from_options(relative=True) == Criterion.relative() == Criterion(0.0, 100.0)
    assert Criterion.from_options(5.0, 20.0) == Criterion(5.0, 20.0)
    assert Criterion.from_options(None, 50.0, True) == Criterion(0.0, 50.0)
    with pytest.raises(ValueError, match="ratio-only"):
        Criterion.from_options(5.0, None, True)
    c = Criterion(100.0, 1000.0)
    assert c.is_massive(-150.0, 0.1) and not c.is_massive(150.0, 0.2)  # 0.2 x 1000 = 200 > 150
    assert c.token_cutoff(0.01, 50.0) == 500.0 and c.to_dict() == {"min_abs": 100.0, "min_ratio": 1000.0,
                                                                     "token_ratio": 10.0}


@pytest.mark.parametrize("command", DECIDING)
def test_every_deciding_command_takes_the_same_criterion_options(command):
    cmd = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == command)
    params = inspect.signature(cmd.callback).parameters
    assert {"min_abs", "min_ratio", "relative"} <= set(params), command
    result = CliRunner().invoke(app, [command, *DECIDING[command], "--relative", "--min-abs", "5"])
    assert result.exit_code == 1 and "ratio-only" in result.output and "Traceback" not in result.output


def test_the_weight_search_and_the_scan_read_the_criterion(tiny):
    lm = build("llama")
    plant_bos_embedding(lm)  # |h| = 1e4 on BOS in every layer
    assert find_massive_weights(lm, k=2).massive
    strict = Criterion(min_abs=1e6)
    assert not find_massive_weights(lm, k=2, criterion=strict).massive
    assert scan(lm, criterion=Criterion(), progress=False).found and not scan(lm, criterion=strict, progress=False).found


def test_set_c_uses_the_criterions_token_ratio():
    lm = build("llama")
    plant_bos_embedding(lm)
    tokens = tokenize_prompts(lm, ["The quick brown fox.", "Summer is warm."])
    positions, layers = massive_tokens(lm, tokens, Criterion())
    assert positions == [[0], [0]] and layers
    positions, layers = massive_tokens(lm, tokens, Criterion(token_ratio=1e9))
    assert positions == [[], []] and not layers


def test_macdrop_refuses_by_the_criterions_min_abs():
    lm = build("llama")
    plant_massive_weight(lm, layer=0, neuron=5)
    assert detect_massive_rows(lm, k=3)[1][0] == 5
    with pytest.raises(NoMassiveWeightsError, match="massive means"):
        detect_massive_rows(lm, k=3, criterion=Criterion(min_abs=1e9))


def test_quantize_and_export_pass_the_criterion_to_the_weight_search_and_record_it(tmp_path, tokenizer, monkeypatch):
    """quantize's targets and export's attack and protected rows are found by the options' Criterion, which the
    result records (quantize.json settings; the edit's entry in cardhouse-edit.json)."""
    import json

    import cardhouse.analysis
    import cardhouse.precision.quantize
    from cardhouse.data.corpora import CORPORA, Corpus
    from cardhouse.results import validate

    seen = []

    def spy(*args, criterion=Criterion(), **kwargs):
        seen.append(criterion)
        return find_massive_weights(*args, criterion=criterion, **kwargs)

    monkeypatch.setattr(cardhouse.analysis, "find_massive_weights", spy)  # export's attack
    monkeypatch.setattr(cardhouse.precision.quantize, "find_massive_weights", spy)  # find_targets
    monkeypatch.setenv("CARDHOUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(CORPORA, "tiny", Corpus("tiny", "test text", "this test", lambda: "A fox runs. " * 40))
    lm = build("llama", tokenizer)
    plant_massive_weight(lm, layer=1, neuron=5)
    folder = save_folder(lm, tmp_path / "tiny-llama")
    relative = Criterion.from_options(None, 50.0, True)
    runner = CliRunner()
    result = runner.invoke(app, ["quantize", "-m", str(folder), "--weights", "4g16", "--acts", "", "--corpus", "tiny",
                                 "--max-tokens", "126", "--context", "64", "--relative", "--min-ratio", "50",
                                 "-o", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "q" / "quantize.json").read_text())
    validate(data, "quantize")
    assert seen == [relative] and data["settings"]["criterion"] == relative.to_dict()
    result = runner.invoke(app, ["export", str(tmp_path / "e"), "-m", str(folder), "--attack", "topk-zero", "--k", "2",
                                 "--quantize", "4g16", "--protect", "massive-rows", "--min-abs", "7"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "e" / "cardhouse-edit.json").read_text())
    validate(data, "export")
    strict = Criterion.from_options(7.0)
    assert seen[1:] == [strict, strict]
    assert [e.get("criterion") for e in data["results"]["edit"]] == [strict.to_dict(), strict.to_dict()]
    # the default options: the default Criterion, as before
    result = runner.invoke(app, ["export", str(tmp_path / "d"), "-m", str(folder), "--attack", "topk-zero", "--k", "2"])
    assert result.exit_code == 0 and seen[3:] == [Criterion()], result.output
