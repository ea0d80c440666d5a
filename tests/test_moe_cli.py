"""``cardhouse moe``, the MoE section of ``cardhouse scan`` and the MoE attacks, end to end on a planted tiny
Mixtral saved as a Hugging Face folder; their clear errors; moe.json against its schema."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import BOS_ID, build
from test_moe import CARRIER_EXPERT, CARRIER_LAYER, DIM, NEURON, N_EXPERTS, SUPER_EXPERT, SUPER_LAYER, build_moe, plant
from cardhouse.cli import app
from cardhouse.results import validate

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-moe")
    lm = build_moe("mixtral", tokenizer)
    plant(lm)
    lm.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-dense")
    lm = build("llama", tokenizer)
    lm.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_moe_command_writes_the_planted_truth_and_validates(folder, tmp_path):
    result = run("moe", "--model", folder, "--out", tmp_path, "--k", 3)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "moe.json").read_text())
    validate(data)
    validate(data, "moe")
    r = data["results"]
    assert r["collapse_layer"] == CARRIER_LAYER and r["collapsed_layers"] == [CARRIER_LAYER]
    assert [[e["layer"], e["expert"]] for e in r["super_experts"]["flagged"]] == [[SUPER_LAYER, SUPER_EXPERT]]
    mw = r["massive_weights"]
    assert (mw["layer"], mw["dim"], mw["expert"], mw["indices"][0]) == (CARRIER_LAYER, DIM, CARRIER_EXPERT, NEURON)
    assert data["settings"]["percentile"] == 99.5 and data["settings"]["fraction"] == 0.1
    for png in data["plots"].values():
        assert (tmp_path / png.split("/")[-1]).stat().st_size > 5000
    assert "collapses" in result.output and f"{CARRIER_LAYER}" in result.output


def test_scan_has_an_moe_section_for_an_moe_model(folder, dense_folder, tmp_path):
    result = run("scan", "--model", folder, "--out", tmp_path / "moe", "--limit", 8)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "moe" / "scan.json").read_text())
    validate(data, "scan")
    assert data["results"]["moe"]["collapse_layer"] == CARRIER_LAYER and "moe_router" in data["plots"]
    assert data["results"]["massive_weights"]["expert"] == CARRIER_EXPERT
    assert "router per MoE layer" in result.output
    dense = run("scan", "--model", dense_folder, "--out", tmp_path / "dense", "--limit", 4)
    assert dense.exit_code == 0, dense.output
    assert json.loads((tmp_path / "dense" / "scan.json").read_text())["results"]["moe"] is None
    assert "router per MoE layer" not in dense.output


def test_moe_attacks_beside_their_controls(folder, tmp_path):
    out = tmp_path / "attack.json"
    result = run("attack", "moe", "--model", folder, "--k", 1, "--max-tokens", 254, "--context", 128, "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    validate(data, "attack")
    ppl = {row["variant"]: row["ppl_wikipedia"] for row in data["results"]}
    assert list(ppl) == ["original", "expert-topk-zero k=1", "expert-random-zero k=1", "expert-other-zero k=1",
                         "expert-topk-retain k=1", "expert-random-retain k=1", "expert-other-retain k=1",
                         "expert-ablate", "random-expert-ablate", "super-experts", "random-experts"]
    assert data["complete"] and data["target"]["super_experts"] == [[SUPER_LAYER, SUPER_EXPERT]]
    base = ppl["original"]

    def moved(variant):
        return abs(ppl[variant] / base - 1)

    for attack, controls in {"expert-topk-zero k=1": ["expert-random-zero k=1", "expert-other-zero k=1"],
                             "expert-ablate": ["random-expert-ablate"],
                             "expert-random-retain k=1": ["expert-topk-retain k=1"]}.items():
        for control in controls:
            assert moved(attack) > 0.01 and moved(attack) > 10 * moved(control), (attack, control, ppl)


@pytest.mark.parametrize("args, message", [
    (["moe", "--percentile", "101"], "--percentile must be in 0..100"),
    (["moe", "--fraction", "2"], "--fraction must be in 0..1"),
    (["moe", "--collapse", "0"], "--collapse must be in (0, 1]"),
    (["attack", "expert-nope"], "unknown attack"),
    (["attack", "topk-zero", "--expert", "1"], "are for the Mixture-of-Experts attacks"),
    (["attack", "expert-ablate", "--expert", "x"], "--expert must be comma-separated integers"),
])
def test_bad_moe_input_is_one_clear_line_before_loading(args, message):
    result = run(*args, "--model", "/nonexistent/model")  # never loaded: the error comes first
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_moe_errors_that_need_the_model(folder, dense_folder, tmp_path):
    budget = ["--max-tokens", 254, "--context", 128]
    cases = [(["attack", "expert-ablate", "--model", folder, "--expert", N_EXPERTS, *budget],
              f"expert {N_EXPERTS} is out of range: layer {CARRIER_LAYER} has experts 0..{N_EXPERTS - 1}"),
             (["attack", "expert-ablate", "--model", dense_folder, "--max-tokens", 254, "--context", 128],
              "dense (no Mixture-of-Experts layers)"),
             (["moe", "--model", dense_folder, "--out", tmp_path], "dense (no Mixture-of-Experts layers)"),
             (["attack", "expert-topk-zero", "--model", folder, "--expert", "shared", "--max-tokens", 254,
               "--context", 128], "has no shared expert")]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 1, result.output
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output, result.output


def test_bos_token_is_the_carrier(folder, tmp_path):
    result = run("moe", "--model", folder, "--out", tmp_path, "--percentile", 90, "--limit", 8)
    assert result.exit_code == 0, result.output
    flagged = json.loads((tmp_path / "moe.json").read_text())["results"]["super_experts"]["flagged"]
    carrier = [e for e in flagged if e["layer"] == CARRIER_LAYER]
    assert carrier and carrier[0]["token_id"] == BOS_ID and carrier[0]["position"] == 0


def test_report_has_an_moe_section_for_an_moe_model_only(tokenizer, tiny, tmp_path):
    from cardhouse.reports.browser import parse_page, problems
    from cardhouse.reports.report import Settings, build_report

    lm = build_moe("mixtral", tokenizer)
    plant(lm)
    settings = Settings.quick(max_tokens=126, context=64, ks=(1,), prompt_limit=8)
    results = build_report([lm, tiny("llama")], tmp_path / "out", settings, progress=False)
    assert results["failures"] == []
    moe_model, dense = results["models"]
    assert [s["key"] for s in dense["sections"]][-1] == "attacks"  # no MoE section for a dense model
    section = moe_model["sections"][-1]
    assert section["key"] == "moe" and section["status"] == "ok"
    summary = dict(section["tables"][0]["rows"])
    assert summary["carrier routing collapses in layer"] == CARRIER_LAYER
    assert summary["expert holding the massive weights"] == CARRIER_EXPERT
    carrier = section["tables"][2]["rows"][0]
    assert carrier[0] == CARRIER_EXPERT and carrier[3][0] == NEURON
    assert section["tables"][3]["rows"][0][:2] == [SUPER_LAYER, SUPER_EXPERT]
    variants = [row[0] for row in section["tables"][4]["rows"]]
    assert variants[:4] == ["original", "expert-topk-zero k=2", "expert-random-zero k=2", "expert-other-zero k=2"]
    assert variants[-2:] == ["super-experts", "random-experts"]
    assert all((tmp_path / "out" / f["file"]).is_file() for f in section["figures"])
    assert problems(parse_page((tmp_path / "out" / "report.html").read_text()), results) == []


def test_readme_moe_commands_are_valid_command_lines(tmp_path, monkeypatch):
    """The MoE section's commands for the real models parse (every option exists): run with the model
    replaced by a missing folder, each fails on loading that model and on nothing else."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    monkeypatch.chdir(tmp_path)  # their output folders are made before the model is loaded
    section = readme[readme.index("## Mixture of Experts"):readme.index("## The report")]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    lines = [line for line in block.splitlines() if line.strip()]
    models = {shlex.split(line)[shlex.split(line).index("-m") + 1] for line in lines}
    assert len(lines) == 4 and models == {"mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen3-30B-A3B"}
    import torch

    for line in lines:
        args = shlex.split(line)[1:]
        args[args.index("-m") + 1] = "/nonexistent/moe-model"
        if not torch.cuda.is_available():  # GPU placements are refused up front here: run them on the CPU
            args = [a for a, prev in zip(args, [""] + args) if "--max-memory" not in (a, prev)]
            args = [("cpu" if prev == "--device" else a) for a, prev in zip(args, [""] + args)]
        result = run(*args)
        assert result.exit_code == 1 and "/nonexistent/moe-model" in result.output, (line, result.output)
        assert "No such option" not in result.output and "Traceback" not in result.output


@pytest.mark.real
def test_real_dense_model_has_no_moe_section_and_moe_is_a_clear_error(tmp_path):
    result = run("moe", "-m", "smollm2-135m", "-o", tmp_path)
    assert result.exit_code == 1 and "dense (no Mixture-of-Experts layers)" in " ".join(result.output.split())
    assert not (tmp_path / "moe.json").exists()
    result = run("attack", "expert-ablate", "-m", "smollm2-135m", "--max-tokens", 511)
    assert result.exit_code == 1 and "Traceback" not in result.output
