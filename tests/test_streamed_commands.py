"""--stream on attack, intervene and sweep (issue 15): a streamed model's variants score as the same
variants of the model in memory (float32, relative difference <= 1e-5), each weight edit made to its
block as the block is loaded and the blocks before the first edited layer read once for all variants;
hidden states spilled to disk give the same numbers and leave no file behind, whatever ends the run."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import MOE_FAMILIES, SANDWICH_FAMILIES, TEXT_FAMILIES, build, plant_massive_weight
from test_carrier import plant_delimiter_embedding, plant_on_delimiter
from typer.testing import CliRunner

from cardhouse.analysis import find_massive_weights, scan
from cardhouse.cli import app
from cardhouse.evaluation.measure import Budget, measurer
from cardhouse.interventions import ATTACKS, attack, intervention, original, run_variants
from cardhouse.models import load_model
from cardhouse.models.spill import HiddenStates, spilling
from cardhouse.models.streaming import Streamer
from cardhouse.results import validate

DENSE = [f for f in TEXT_FAMILIES if f not in MOE_FAMILIES]
BUDGET = dict(corpora=["wikipedia"], max_tokens=189, context=64)  # 3 windows


def save(family, folder, delimiter=False):
    lm = build(family)
    if delimiter:  # the massive activation on "." tokens, no BOS (a Qwen2.5-like model)
        lm.bos = False
        plant_delimiter_embedding(lm) if family in SANDWICH_FAMILIES else plant_on_delimiter(lm)
    else:
        plant_massive_weight(lm, layer=1, neuron=5, dim=7)
    lm.model.save_pretrained(folder, max_shard_size="20KB")
    lm.tokenizer.save_pretrained(folder)


def variant_rows(lm, layer=1, **budget):
    """Every registered attack on ``layer`` and both activation interventions, measured."""
    mw = find_massive_weights(lm, k=3, layer=layer)
    variants = [original()] + [attack(lm, mw, kind, k=3) for kind in ATTACKS]
    result = scan(lm, progress=False)
    if result.found:
        variants += [intervention(lm, result, "set-zero"), intervention(lm, result, "set-mean")]
    return run_variants(lm, variants, measurer(lm, Budget(**(BUDGET | budget)), progress=False))


def same_rows(a, b):
    assert [r["variant"] for r in a] == [r["variant"] for r in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "ppl_wikipedia"} == {k: v for k, v in y.items()
                                                                        if k != "ppl_wikipedia"}
        a, b = x["ppl_wikipedia"], y["ppl_wikipedia"]
        assert a == b or abs(a / b - 1) <= 1e-5, (x["variant"], a, b)  # equal: a huge planted value gives inf


@pytest.fixture
def block_loads(monkeypatch):
    """How often each block was read from the checkpoint."""
    loads: dict[int, int] = {}
    inner = Streamer.block

    def counting(self, layer):
        loads[layer] = loads.get(layer, 0) + 1
        return inner(self, layer)

    monkeypatch.setattr(Streamer, "block", counting)
    return loads


@pytest.mark.parametrize("family", DENSE)
def test_streamed_variants_equal_the_model_in_memory(family, tmp_path, block_loads):
    save(family, tmp_path)
    ordinary, streamed = load_model(str(tmp_path), bos=True), load_model(str(tmp_path), bos=True, stream=True)
    expected = variant_rows(ordinary)
    block_loads.clear()
    rows = variant_rows(streamed)
    same_rows(rows, expected)
    assert len({round(r["ppl_wikipedia"], 6) for r in rows}) >= 3  # the edits change something
    assert all(p.is_meta for p in streamed.blocks.layers.parameters())  # every block freed, edits undone


@pytest.mark.parametrize("family", DENSE)
def test_a_delimiter_carrier_streams_like_the_model_in_memory(family, tmp_path):
    """The massive activation on "." without BOS: the scan, the search and the interventions follow it the
    same way streamed."""
    save(family, tmp_path, delimiter=True)
    ordinary, streamed = load_model(str(tmp_path), bos=False), load_model(str(tmp_path), bos=False, stream=True)
    a, b = scan(ordinary, progress=False), scan(streamed, progress=False)
    assert a.found and a.dims == b.dims and a.roles == b.roles and a.massive_layers == b.massive_layers
    same_rows(variant_rows(streamed, layer=0), variant_rows(ordinary, layer=0))


def test_blocks_before_the_attacked_layer_are_read_once_for_all_variants(tmp_path, block_loads):
    save("llama", tmp_path)
    lm = load_model(str(tmp_path), bos=True, stream=True)
    mw = find_massive_weights(lm, k=3, layer=1)
    variants = [original()] + [attack(lm, mw, kind, k=3) for kind in ATTACKS]
    block_loads.clear()
    run_variants(lm, variants, measurer(lm, Budget(**BUDGET), progress=False))
    assert block_loads == {0: 1, 1: len(variants)}
    block_loads.clear()
    run_variants(lm, variants, measurer(lm, Budget(**BUDGET), progress=False), reuse=False)
    assert block_loads == {0: len(variants), 1: len(variants)}


def test_streamer_refuses_an_edit_the_shared_states_would_miss(tmp_path):
    from cardhouse.models.streaming import streamer_of

    save("llama", tmp_path)
    streamer = streamer_of(load_model(str(tmp_path), bos=True, stream=True).model)
    with streamer.share_prefix(1), pytest.raises(ValueError, match="edit of layer 0 inside share_prefix"):
        with streamer.editing(0, lambda: torch.no_grad()):
            pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_states_round_trip_through_the_spill(tmp_path, dtype):
    shapes = [(2, 5, 8), (1, 3, 8)]
    values = [torch.randn(s).to(dtype) for s in shapes]
    with spilling(tmp_path / "spill"):
        states = HiddenStates(shapes, dtype)
        assert states.spilled and list(states) == [None, None]
        for i, v in enumerate(values):
            states[i] = v
        copy = states.copy()
        states[0] = torch.zeros(shapes[0], dtype=dtype)
        assert torch.equal(copy[0], values[0]) and torch.equal(copy[1], values[1])
        assert torch.equal(states[0], torch.zeros(shapes[0], dtype=dtype))
        # no file is visible even while the states live: each is unlinked as soon as it is mapped
        assert [f for _, _, files in os.walk(tmp_path) for f in files] == []
        with pytest.raises(ValueError, match="shape"):
            states[1] = torch.zeros(2, 2, dtype=dtype)
    assert not (tmp_path / "spill").exists()  # made by the run, removed by it


def test_spilled_run_equals_the_run_in_memory_and_leaves_nothing(tmp_path, monkeypatch):
    save("llama", tmp_path / "ckpt")
    lm = load_model(str(tmp_path / "ckpt"), bos=True, stream=True)
    in_memory = variant_rows(lm)
    spilled = []
    inner = Streamer.states_for
    monkeypatch.setattr(Streamer, "states_for", lambda self, b: spilled.append(inner(self, b)) or spilled[-1])
    (tmp_path / "spill").mkdir()
    with spilling(tmp_path / "spill"):
        on_disk = variant_rows(lm)
    assert spilled and all(s.spilled for s in spilled)
    same_rows(on_disk, in_memory)
    assert list((tmp_path / "spill").iterdir()) == []  # the folder was the user's: kept, empty


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_or_ctrl_c_mid_run_leaves_no_spill_files(tmp_path, error):
    save("llama", tmp_path / "ckpt")
    lm = load_model(str(tmp_path / "ckpt"), bos=True, stream=True)
    mw = find_massive_weights(lm, k=3, layer=1)
    measure = measurer(lm, Budget(**BUDGET), progress=False)
    calls = []

    def failing(lm):
        calls.append(measure(lm))
        if len(calls) == 2:
            raise error("stopped mid-run")
        return calls[-1]

    with pytest.raises(error), spilling(tmp_path / "spill"):
        run_variants(lm, [original(), attack(lm, mw, "topk-zero", k=3), attack(lm, mw, "random-zero", k=3)], failing)
    assert len(calls) == 2 and not (tmp_path / "spill").exists()
    assert all(p.is_meta for p in lm.blocks.layers.parameters())


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_attack_and_intervene_commands_stream(tmp_path):
    save("llama", tmp_path / "ckpt")
    common = ["-m", tmp_path / "ckpt", "--context", 64, "--max-tokens", 189]
    for command, kind in (["attack", "all"], "attack"), (["intervene", "set-zero"], "attack"):
        files = {}
        for mode, extra in (("memory", []), ("streamed", ["--stream"]),
                            ("spilled", ["--stream", "--spill-dir", tmp_path / "spill"])):
            files[mode] = tmp_path / f"{command[0]}-{mode}.json"
            _cli(*command, *common, *extra, "--json", files[mode])
        data = {mode: json.loads(path.read_text()) for mode, path in files.items()}
        for mode in data:
            validate(data[mode], kind)
        assert data["streamed"]["model"]["placement"]["stream"] is True
        same_rows(data["streamed"]["results"], data["memory"]["results"])
        same_rows(data["spilled"]["results"], data["memory"]["results"])
    assert not (tmp_path / "spill").exists()


def test_sweep_command_streams_the_same_rows(tmp_path):
    save("llama", tmp_path / "ckpt")
    common = ["-m", tmp_path / "ckpt", "--context", 64, "--max-tokens", 189, "--ks", "1,3,48", "--layer", 1]
    _cli("sweep", *common, "-o", tmp_path / "memory")
    _cli("sweep", *common, "--stream", "--spill-dir", tmp_path / "spill", "-o", tmp_path / "streamed")
    a, b = (json.loads((tmp_path / f / "sweep.json").read_text()) for f in ("memory", "streamed"))
    validate(b, "sweep")
    same_rows(b["results"], a["results"])
    assert len(b["results"]) == 1 + 3 * 4
    _cli("sweep", *common, "--stream", "-o", tmp_path / "streamed")  # resumes: every row is there already
    assert json.loads((tmp_path / "streamed" / "sweep.json").read_text())["results"] == b["results"]


def test_report_streams_every_section_with_the_same_numbers(tmp_path):
    """`cardhouse report --stream`: every section runs (attention too) and the attack and sweep rows equal
    those of the report on the model in memory."""
    save("llama", tmp_path / "ckpt")
    common = ["report", "-m", tmp_path / "ckpt", "--context", 64, "--max-tokens", 189, "--with", "attention"]
    _cli(*common, "-o", tmp_path / "memory")
    _cli(*common, "--stream", "--spill-dir", tmp_path / "spill", "-o", tmp_path / "streamed")
    a, b = (json.loads((tmp_path / f / "results.json").read_text()) for f in ("memory", "streamed"))
    validate(b, "report")
    sections = {s["key"]: s for s in b["results"]["models"][0]["sections"]}
    assert set(sections) >= {"scan", "activations", "weights", "attacks", "attention"}
    assert all(s["status"] == "ok" for s in sections.values()) and not b["results"]["failures"]
    rows = [s["data"]["results"] for r in (a, b) for s in r["results"]["models"][0]["sections"] if s["key"] == "attacks"]
    same_rows(rows[1], rows[0])
    assert not (tmp_path / "spill").exists()


def test_memory_command_says_what_a_spilled_run_needs(tmp_path):
    save("llama", tmp_path / "ckpt")
    output = _cli("memory", tmp_path / "ckpt", "--tokens", 1000, "--dtype", "float32").output
    assert "--spill-dir" in output and "disk" in output


@pytest.mark.real
def test_smollm2_streamed_attack_and_interventions_equal_the_model_in_memory():
    ordinary, streamed = load_model("smollm2-135m"), load_model("smollm2-135m", stream=True)
    budget = dict(max_tokens=511, context=256)
    a, b = variant_rows(ordinary, layer=None, **budget), variant_rows(streamed, layer=None, **budget)
    same_rows(b, a)
    by = {r["kind"]: r["ppl_wikipedia"] for r in b}
    assert by["topk-zero"] > 2 * by["original"] and by["random-zero"] < 1.05 * by["original"]  # House of Cards


@pytest.mark.real
def test_smollm2_streamed_sweep_rows_equal_the_ordinary_sweep():
    from cardhouse.interventions.sweep import sweep

    rows = []
    for stream in (False, True):
        lm = load_model("smollm2-135m", stream=stream)
        mw = find_massive_weights(lm, k=lm.blocks.intermediate_size(3), layer=3)
        measure = measurer(lm, Budget(corpora=["wikipedia"], max_tokens=255, context=256), progress=False)
        rows.append(sweep(lm, mw, measure, [1, 2, 5], progress=False))
    same_rows(rows[1], rows[0])
    assert len(rows[1]) == 1 + 3 * 4


def test_the_attacked_block_is_read_once_for_all_variants(tmp_path, monkeypatch):
    """Inside the shared prefix the block the variants edit is kept after its first read: each variant's
    edit is made to it and undone bit-identically (the rows equal the ordinary model's:
    ``test_streamed_variants_equal_the_model_in_memory``); it is freed with the context."""
    save("llama", tmp_path)
    lm = load_model(str(tmp_path), bos=True, stream=True)
    mw = find_massive_weights(lm, k=3, layer=1)
    variants = [original()] + [attack(lm, mw, kind, k=3) for kind in ATTACKS]
    reads: dict[int, int] = {}
    inner = Streamer._read

    def counting(self, layer):
        reads[layer] = reads.get(layer, 0) + 1
        return inner(self, layer)

    monkeypatch.setattr(Streamer, "_read", counting)
    rows = run_variants(lm, variants, measurer(lm, Budget(**BUDGET), progress=False))
    assert reads == {0: 1, 1: 1}
    assert len({round(r["ppl_wikipedia"], 6) for r in rows}) >= 3  # the edits of the kept block took effect
    assert all(p.is_meta for p in lm.blocks.layers.parameters())
    streamer = lm.model._cardhouse_streamer
    assert streamer.prefix is None
    reads.clear()
    run_variants(lm, variants, measurer(lm, Budget(**BUDGET), progress=False), reuse=False)
    assert reads == {0: len(variants), 1: len(variants)}
