"""Every result file the tool writes, produced by its own command on a tiny model (the CLI where it
runs offline on one), validated against the envelope and the schema of its kind (cardhouse/schemas/)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from conftest import build, plant_bos_embedding, save_folder
from typer.testing import CliRunner

from cardhouse.cli import app
from cardhouse.data.corpora import CORPORA, Corpus
from cardhouse.evaluation.metrics import METRICS
from cardhouse.results import SCHEMAS, kinds, load_schema, validate

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want. "
BUDGET = ["--corpus", "tiny", "--max-tokens", "126", "--context", "64"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer):
    lm = build("llama", tokenizer)
    plant_bos_embedding(lm)  # massive on BOS in every layer: the interventions have something to act on
    lm.model.config.max_position_embeddings = 256  # fine-tuning's --max-length 200 must fit (it is checked)
    return save_folder(lm, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-mixtral")
    build("mixtral", tokenizer).model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def long_folder(tmp_path_factory, tokenizer):
    """A tiny llama with 512 positions: long-context prompts in characters need them."""
    from transformers import AutoModelForCausalLM

    from conftest import text_config

    config = text_config("llama")
    config.max_position_embeddings = 512
    path = tmp_path_factory.mktemp("tiny-llama-512")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def written(model_folder, moe_folder, long_folder, tmp_path_factory):
    """Run every command once; {kind: [paths of the files it wrote]}."""
    out = tmp_path_factory.mktemp("files")
    mp = pytest.MonkeyPatch()
    mp.setenv("CARDHOUSE_CACHE", str(out / "cache"))  # the test corpus is never cached for real use
    mp.setitem(CORPORA, "tiny", Corpus("tiny", "test text", "this test", lambda: TEXT * 12))
    records = out / "records.jsonl"
    records.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i} {i + 1}"})
                                 for i in range(24)))
    m = str(model_folder)
    encoder_folder = _tiny_image_model(out / "tiny-dinov2")
    finetune = ["--data", str(records), "--layer", "0", "--rows", "1,2,3", "--max-steps", "2", "--batch-size", "4",
                "--grad-accum", "1", "--max-length", "200", "--max-tokens", "126", "--context", "64",
                "--corpus", "tiny"]
    commands = {
        "scan": (["scan", "-m", m, "--limit", "4", "-o", out / "scan"], [out / "scan" / "scan.json"]),
        "attention": (["attention", "-m", m, "--limit", "3", "-o", out / "mech"], [out / "mech" / "attention.json"]),
        "trace": (["trace", "-m", m, "--k", "3", "-o", out / "mech"], [out / "mech" / "trace.json"]),
        "position": (["position", "-m", m, "-o", out / "mech"], [out / "mech" / "position.json"]),
        "attack": (["attack", "all", "-m", m, "--k", "2", *BUDGET, "--json", out / "attack.json"],
                   [out / "attack.json"]),
        "intervene": (["intervene", "set-zero", "-m", m, *BUDGET, "--json", out / "intervene.json"],
                      [out / "intervene.json"]),
        "sweep": (["sweep", "-m", m, "--ks", "1,2", *BUDGET, "-o", out / "sweep"], [out / "sweep" / "sweep.json"]),
        "longctx": (["longctx", "-m", str(long_folder), "--lengths", "320,400", "--depths", "0,1", "--n", "1", "--k", "2",
                     "--haystack", "tiny", "--max-new-tokens", "4", "-o", out / "longctx"],
                    [out / "longctx" / "longctx.json"]),
        "generate": (["generate", "-m", m, "--n", "2", "--max-new-tokens", "4", "--k", "2", "-o", out / "gen"],
                     [out / "gen" / "generation.json"]),
        "finetune": (["finetune", "-m", m, *finetune, "-o", out / "ft"],
                     [out / "ft" / "finetune.json", out / "ft" / "results.json"]),
        "finetune-compare": (["finetune-compare", "-m", m, "--methods", "lora", "--schedules", "step", *finetune,
                              "-o", out / "cmp"], [out / "cmp" / "compare.json", out / "cmp" / "lora" / "result.json"]),
        "report": (["report", "-m", m, "--quick", *BUDGET, "--ks", "1,2", "--out", out / "report"],
                   [out / "report" / "results.json"]),
        "encoder": (["encoder", "-m", encoder_folder, "--images", "builtin", "--limit", "2", "--relative",
                     "--min-ratio", "5", "--copies", "2", "-o", out / "enc"], [out / "enc" / "encoder.json"]),
        "moe": (["moe", "-m", moe_folder, "--limit", "4", "-o", out / "moe"], [out / "moe" / "moe.json"]),
        "scan-moe": (["scan", "-m", moe_folder, "--limit", "4", "-o", out / "scan-moe"],
                     [out / "scan-moe" / "scan.json", out / "scan-moe" / "moe.json"]),
        "attack-moe": (["attack", "moe", "-m", moe_folder, "--k", "2", *BUDGET, "--json", out / "attack-moe.json"],
                       [out / "attack-moe.json"]),
        "precision": (["precision", "-m", m, "--limit", "4", "--rescale", *BUDGET, "-o", out / "precision",
                       "--export", out / "rescaled"],
                      [out / "precision" / "precision.json", out / "rescaled" / "cardhouse-edit.json"]),
        "quantize": (["quantize", "-m", m, "--weights", "8,4g16", "--acts", "8:tensor", "--k", "2", *BUDGET,
                      "-o", out / "quantize"], [out / "quantize" / "quantize.json"]),
        "export": (["export", out / "export", "-m", m, "--attack", "topk-zero", "--k", "2"],
                   [out / "export" / "cardhouse-edit.json"]),
        "super-weight": (["super-weight", "-m", m, "--ratio", "1.5", "--candidates", "1", "--controls", "1",
                          "--no-lines", *BUDGET, "-o", out / "sw"], [out / "sw" / "super_weight.json"]),
    }
    runner = CliRunner()
    files = {}
    try:
        for name, (args, paths) in commands.items():
            result = runner.invoke(app, [str(a) for a in args])
            assert result.exit_code == 0, (name, result.output)
            files[name] = paths
        files["emergence"] = [_emergence(out / "emergence")]
    finally:
        mp.undo()
    return files


def _tiny_image_model(folder):
    """A tiny DINOv2 with registers saved with an image processor (what ``cardhouse encoder -m FOLDER`` reads)."""
    from cardhouse.encoders.inputs import default_processor

    lm = build("dinov2_with_registers")
    lm.model.save_pretrained(folder)
    default_processor(lm.model.config).save_pretrained(folder)
    return folder


def _emergence(out):
    """emergence.json through the API (the command trains on SmolLM2's tokenizer and the real corpora)."""
    import torch

    from conftest import build_tokenizer

    from cardhouse.analysis import builtin_prompts
    from cardhouse.emergence import TrainConfig, run, split_tokens

    tokenizer = build_tokenizer()
    ids = tokenizer("\n".join(builtin_prompts()), add_special_tokens=False)["input_ids"]
    data = split_tokens({"builtin": torch.tensor(ids)}, 0.2)
    config = TrainConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, batch_size=8, warmup=1, steps=2, every=2,
                         eval_windows=4, scan_prompts=4)
    run(config, out, variants=("standard",), tokenizer=tokenizer, data=data, progress=False)
    return out / "emergence.json"


KIND = {"scan": ["scan"], "attention": ["attention"], "trace": ["trace"], "position": ["position"],
        "attack": ["attack"], "intervene": ["attack"], "sweep": ["sweep"], "finetune": ["finetune", "finetune-results"],
        "finetune-compare": ["compare", "finetune-run"], "report": ["report"], "emergence": ["emergence"],
        "moe": ["moe"], "scan-moe": ["scan", "moe"], "attack-moe": ["attack"], "super-weight": ["super_weight"],
        "longctx": ["longctx"], "generate": ["generation"], "encoder": ["encoder"],
        "precision": ["precision", "export"], "quantize": ["quantize"], "export": ["export"]}


def test_every_schema_is_a_valid_schema_and_every_kind_is_checked():
    for path in SCHEMAS.glob("*.schema.json"):
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))
    assert sorted({kind for kinds_ in KIND.values() for kind in kinds_}) == kinds()


NO_RESULT_FILE = {"models", "download", "memory"}  # they print (a list, what they installed, a memory estimate)


def test_every_command_that_writes_a_result_file_is_checked():
    # a new command gets a row in ``written`` and ``KIND`` (its files validated against their schemas) or, if it
    # writes no result file, a place in NO_RESULT_FILE: never neither
    import typer.main

    commands = set(typer.main.get_command(app).commands)
    assert commands - NO_RESULT_FILE == {name.removesuffix("-moe") for name in KIND}, \
        sorted((commands - NO_RESULT_FILE) ^ {name.removesuffix("-moe") for name in KIND})


@pytest.mark.parametrize("command", list(KIND))
def test_each_command_writes_files_its_schemas_accept(written, command):
    for path, kind in zip(written[command], KIND[command], strict=True):
        data = json.loads(path.read_text())
        validate(data, kind)
        assert data["tool"] == "cardhouse" and isinstance(data["settings"], dict)
        if command != "emergence":  # written by the API: no command line
            assert data["command"].startswith(f"cardhouse {command.removesuffix('-moe')}"), data["command"]


def test_attack_all_reaches_every_registered_attack_and_its_control(written):
    from cardhouse.interventions import ATTACKS

    rows = json.loads(written["attack"][0].read_text())["results"]
    kinds_ = [r["kind"] for r in rows]
    assert kinds_ == ["original", *ATTACKS, "set-zero", "set-mean"]
    assert {r["kind"]: r["control_of"] for r in rows}["random-retain"] == "topk-retain"
    assert all(r["tokens_tiny"] == 126 for r in rows)


def test_attack_moe_reaches_every_moe_attack_and_its_controls(written):
    from cardhouse.interventions import EXPERT_ATTACKS, MOE_ATTACKS

    rows = json.loads(written["attack-moe"][0].read_text())["results"]
    assert [r["kind"] for r in rows] == ["original", *(k for a, cs in MOE_ATTACKS.items() for k in (a, *cs))]
    assert {r["kind"] for r in rows[1:]} == set(EXPERT_ATTACKS)
    assert {r["kind"]: r["control_of"] for r in rows}["expert-other-zero"] == "expert-topk-zero"


def test_every_registered_metric_has_a_key_pattern_in_the_row_schema():
    row = load_schema("defs")["$defs"]["variant_row"]["patternProperties"]
    for spec in METRICS.values():
        key = spec.key("wikipedia")
        assert any(re.search(pattern, key) for pattern in row), key


def test_a_broken_file_is_refused(written):
    data = json.loads(written["sweep"][0].read_text())
    data["results"][1]["k"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(data, "sweep")
    del data["settings"]
    with pytest.raises(jsonschema.ValidationError):
        validate(data, "sweep")
