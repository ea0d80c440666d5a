"""Export: edited tiny models of every family written as Hugging Face folders and reloaded by plain
``transformers`` in a fresh process (no cardhouse imported there): bit-identical weights, identical outputs."""

from __future__ import annotations

import json
from contextlib import ExitStack
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import ALL_MODELS, build, sample_inputs
from cardhouse.cli import app
from cardhouse.export import EDIT_FILE, ExportError, export_model, export_variants, state_digests
from cardhouse.interventions import weights_digest, zero_rows
from cardhouse.interventions.activations import set_activations
from cardhouse.interventions.variants import Variant
from cardhouse.precision import rescaled
from cardhouse.results import validate

RELOAD = textwrap.dedent('''
    import hashlib, json, sys
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    torch.set_num_threads(int(sys.argv[2]))  # as in the test process: the same reduction order
    jobs = json.loads(sys.argv[1])
    out = {}
    for folder, inputs_path, encoder in jobs:
        cls = AutoModel if encoder else AutoModelForCausalLM
        model = cls.from_pretrained(folder, dtype=torch.float32).eval()
        digests = {n: hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                   for n, t in sorted(model.state_dict().items())}
        with torch.inference_mode():
            result = model(**torch.load(inputs_path))
        torch.save(result.logits if hasattr(result, "logits") else result.last_hidden_state, folder + "/out.pt")
        out[folder] = digests
    assert "cardhouse" not in sys.modules
    print(json.dumps(out))
''')


def reload_elsewhere(jobs: list[tuple[str, str, bool]]) -> dict:
    """Load each folder in a fresh interpreter with transformers alone; its state digests, outputs saved beside."""
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(jobs), str(torch.get_num_threads())], capture_output=True, text=True, env=env,
                          cwd="/", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def output(lm, inputs):
    with torch.inference_mode():
        result = lm.model(**inputs)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def test_every_family_exported_and_reloaded_bit_identically(tmp_path):
    """An attack (top-2 zeroing) and the rescale, nested, on every family; reloaded in one fresh process."""
    jobs, expected = [], {}
    for family in ALL_MODELS:
        lm = build(family)
        inputs = sample_inputs(lm)
        folder = tmp_path / family
        before = weights_digest([p for _, p in sorted(lm.model.named_parameters())])
        attack = Variant("topk-zero k=2", "rows 0, 5 of layer 1", lambda lm=lm: zero_rows(lm, 1, [0, 5],
                                                                                           expert=0 if lm.blocks.is_moe else None))
        # the rescale where the adapter table describes the residual stream (it refuses the others)
        edits = [attack] + ([Variant("rescale 2^-2", "residual stream / 4", lambda lm=lm: rescaled(lm, 2))]
                            if lm.blocks.adapter.writers is not None else [])
        with ExitStack() as stack:
            for edit in edits:
                stack.enter_context(edit.apply())
            expected[str(folder)] = (state_digests(lm.model), output(lm, inputs))
        record = export_variants(lm, edits, folder)
        assert weights_digest([p for _, p in sorted(lm.model.named_parameters())]) == before  # restored
        assert record["state_digests"] == expected[str(folder)][0]
        assert [e["name"] for e in record["edit"]] == [e.name for e in edits]
        inputs = {k: v for k, v in inputs.items() if k != "use_cache"}
        torch.save(inputs, folder / "inputs.pt")
        jobs.append((str(folder), str(folder / "inputs.pt"), lm.blocks.adapter.inputs != "causal"))  # AutoModel
        data = json.loads((folder / EDIT_FILE).read_text())
        validate(data)
        assert data["model"]["name"] == f"tiny-{family}" and data["results"]["files"]
    reloaded = reload_elsewhere(jobs)
    for folder, (digests, out) in expected.items():
        assert reloaded[folder] == digests, folder  # bit-identical weights (tied tensors under each name)
        assert torch.equal(torch.load(f"{folder}/out.pt"), out), folder  # identical outputs


def test_non_empty_folder_refused_unless_force(tmp_path):
    lm = build("llama")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty.*--force"):
        export_model(lm, tmp_path, edit=[])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written
    (tmp_path / "model-00001-of-00002.safetensors").write_text("stale shard")
    export_model(lm, tmp_path, edit=[], force=True)
    names = {p.name for p in tmp_path.iterdir()}
    assert "notes.txt" in names and "model.safetensors" in names and "model-00001-of-00002.safetensors" not in names


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_model(build("llama"), tmp_path / "f", edit=[])


def test_activation_edit_refused_nothing_written(tmp_path):
    lm = build("llama")
    with set_activations(lm, [0], {3: 0.0}, threshold=0.0):  # Sun et al.'s set-to-zero works through a hook
        with pytest.raises(ExportError, match="activation hooks .*no exact form as weights"):
            export_model(lm, tmp_path / "out", edit=[{"kind": "set-zero"}])
    assert not (tmp_path / "out").exists()


def test_gguf_holds_the_edited_tensors(tmp_path):
    from gguf import GGUFReader

    lm = build("llama")
    with rescaled(lm, 1):
        export_model(lm, tmp_path, edit=[], gguf=True)
        state = {n: t.clone() for n, t in lm.model.state_dict().items()}
    reader = GGUFReader(str(tmp_path / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(state)
    name = "model.layers.0.self_attn.o_proj.weight"
    got = torch.from_numpy(tensors[name].data.copy()).reshape(state[name].shape)
    assert torch.equal(got, state[name])


runner = CliRunner()


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = build("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def macdrop_adapter(tmp_path_factory):
    """(model folder, adapter folder): a LoRA adapter fine-tuned 3 steps with MacDrop on a tiny llama that reads
    512 positions (the instruction template is long in characters), as `cardhouse finetune` writes it."""
    from saved_models import save_tiny

    from cardhouse.finetuning.macdrop import MacDropConfig
    from cardhouse.finetuning.train import FinetuneConfig, finetune
    from cardhouse.models import load_model

    root = tmp_path_factory.mktemp("macdrop")
    folder = save_tiny(root / "model", "llama", positions=512)
    records = root / "records.jsonl"
    records.write_text("\n".join(json.dumps({"instruction": f"Name colour {i}.", "input": "",
                                             "output": ["red", "green", "blue", "gold"][i % 4]}) for i in range(24)))
    config = FinetuneConfig(data=str(records), batch_size=4, grad_accum=1, max_steps=3, max_length=200, lr=1e-2,
                            save_steps=3, logging_steps=1, rank=4, lora_alpha=8)
    result = finetune(load_model(str(folder), bos=True), config, MacDropConfig(layer=0, rows=[1, 2, 3], p0=0.9),
                      out=root / "ft", progress=False, evaluate_before=False)
    assert result.steps == 3
    return folder, root / "ft" / "adapter"


def test_cli_merges_a_macdrop_adapter_and_exports_it(tmp_path, macdrop_adapter):
    """A MacDrop-fine-tuned adapter merged into the weights: the reloaded folder is the merged model, bit for bit."""
    from peft import PeftModel

    from cardhouse.models import load_model

    llama_folder, macdrop_adapter = macdrop_adapter
    lm = load_model(str(llama_folder), bos=True)
    base = state_digests(lm.model)
    merged = PeftModel.from_pretrained(lm.model, str(macdrop_adapter)).merge_and_unload()
    inputs = sample_inputs(lm)
    with torch.inference_mode():
        expected = merged(**inputs).logits
    result = runner.invoke(app, ["export", str(tmp_path / "out"), "-m", str(llama_folder), "--adapter",
                                 str(macdrop_adapter)])
    assert result.exit_code == 0, result.output
    torch.save({k: v for k, v in inputs.items() if k != "use_cache"}, tmp_path / "inputs.pt")
    digests = reload_elsewhere([(str(tmp_path / "out"), str(tmp_path / "inputs.pt"), False)])[str(tmp_path / "out")]
    assert digests == state_digests(merged) and digests != base  # the trained adapter is in the weights
    assert torch.equal(torch.load(tmp_path / "out" / "out.pt"), expected)
    data = json.loads((tmp_path / "out" / EDIT_FILE).read_text())
    validate(data, "export")
    assert data["results"]["edit"][0] == {"kind": "adapter", "path": str(macdrop_adapter), "merged": True}


def test_every_registered_attack_is_exported_or_refused_with_why(tmp_path_factory):
    """Each attack of the dense registry (ATTACKS) and of the MoE one (EXPERT_ATTACKS) through `cardhouse export`:
    written (and reloaded elsewhere bit for bit, the weights changed) or refused with the reason and nothing written."""
    from saved_models import save_tiny

    from cardhouse.cli.precision import FOLD_REFUSED
    from cardhouse.interventions.experts import EXPERT_ATTACKS
    from cardhouse.interventions.variants import ATTACKS
    from cardhouse.models import load_model

    root = tmp_path_factory.mktemp("attacks")
    models = {"llama": save_tiny(root / "llama", "llama"), "mixtral": save_tiny(root / "mixtral", "mixtral")}
    cases = [(name, "llama", ["--k", "2", "--layer", "0"]) for name in ATTACKS]
    cases += [(name, "mixtral", ["--k", "2", "--layer", "0"]) for name in EXPERT_ATTACKS]
    jobs, written, refused = [], {}, {}
    for name, family, args in cases:
        out = root / f"out-{name}"
        result = runner.invoke(app, ["export", str(out), "-m", str(models[family]), "--attack", name, *args])
        if result.exit_code == 0:
            record = json.loads((out / EDIT_FILE).read_text())["results"]
            assert [e["name"].split(" k=")[0] for e in record["edit"]] == [name]
            written[str(out)] = (record["state_digests"], family)
            jobs.append((str(out), str(root / "inputs.pt"), False))
        else:
            errors = [line for line in result.output.splitlines() if line.startswith("error:")]
            assert result.exit_code == 1 and len(errors) == 1 and not out.exists(), result.output
            refused[name] = errors[0]
    lm = build("llama")
    torch.save({k: v for k, v in sample_inputs(lm).items() if k != "use_cache"}, root / "inputs.pt")
    reloaded = reload_elsewhere(jobs)
    unedited = {family: state_digests(load_model(str(folder)).model) for family, folder in models.items()}
    for folder, (digests, family) in written.items():
        assert reloaded[folder] == digests, folder
        assert digests != unedited[family], folder  # the attack changed the weights
    assert set(ATTACKS) <= {Path(f).name.removeprefix("out-") for f in written}  # every dense attack is foldable
    for name in FOLD_REFUSED.keys() & EXPERT_ATTACKS.keys():  # routing edits: refused, saying why
        assert "reroutes the router" in refused[name] and "no exact form as weights" in refused[name]
    # the tiny random Mixtral has no super experts to prune: refused as `cardhouse attack` refuses it
    assert set(refused) <= set(FOLD_REFUSED) | {"super-experts", "random-experts"}, refused
    assert all("no super experts" in refused[n] for n in {"super-experts", "random-experts"} & set(refused))


def test_the_export_help_names_every_registered_attack():
    import typer.main

    from cardhouse.interventions.experts import EXPERT_ATTACKS
    from cardhouse.interventions.variants import ATTACKS

    text = next(p for p in typer.main.get_command(app).commands["export"].params if p.name == "attack_kind").help
    assert [name for name in [*ATTACKS, *EXPERT_ATTACKS] if name not in text] == []


QUANTIZED = {"llama": "4g16", "gpt2": "8", "gemma3_text": "4", "mixtral": "4g8", "qwen2_moe": "8g8"}


def test_quantized_weights_exported_and_reloaded_bit_identically(tmp_path):
    """Fake-quantized weights are weights: the study's quantizer folded into an export; the fresh process sees the
    very model the study measures (GPT-2's Conv1D and the MoE expert tensors too)."""
    from cardhouse.precision.quantize import quantized_weights
    from cardhouse.precision.study import foldable_scheme, quantize_variant

    jobs, expected = [], {}
    for family, spec in QUANTIZED.items():
        lm, folder = build(family), tmp_path / family
        scheme = foldable_scheme(spec)
        inputs = sample_inputs(lm)
        with quantized_weights(lm, scheme):
            expected[str(folder)] = state_digests(lm.model), output(lm, inputs)
        before = all_digest(lm)
        record = export_variants(lm, [quantize_variant(lm, scheme)], folder)
        assert all_digest(lm) == before and record["state_digests"] == expected[str(folder)][0]
        assert expected[str(folder)][0] != state_digests(lm.model)  # the weights really changed
        torch.save({k: v for k, v in inputs.items() if k != "use_cache"}, folder / "inputs.pt")
        jobs.append((str(folder), str(folder / "inputs.pt"), False))
    reloaded = reload_elsewhere(jobs)
    for folder, (digests, out) in expected.items():
        assert reloaded[folder] == digests, folder
        assert torch.equal(torch.load(f"{folder}/out.pt"), out), folder


def all_digest(lm):
    return weights_digest([p for _, p in sorted(lm.model.named_parameters())])


def test_cli_exports_quantized_weights_with_the_super_weight_kept(tmp_path, llama_folder):
    """`cardhouse export --quantize 4g16 --protect super-weight`: the reloaded model equals the study's
    ``quantized`` model with the same targets bit for bit, and the super weight is its full-precision value."""
    from cardhouse.models import load_model
    from cardhouse.precision.quantize import Scheme, find_targets, quantized

    out = tmp_path / "out"
    result = runner.invoke(app, ["export", str(out), "-m", str(llama_folder), "--quantize", "4g16",
                                 "--protect", "super-weight"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / EDIT_FILE).read_text())
    validate(data, "export")
    (edit,) = data["results"]["edit"]
    assert edit["name"] == "quantize W4 g16 +super-weight" and edit["quantization"]["scheme"]["group"] == 16
    lm = load_model(str(llama_folder), bos=True)
    targets = find_targets(lm, k=5, seed=0)
    assert edit["quantization"]["targets"]["super_weight"] == list(targets.super_weight)
    row, col = targets.super_weight
    down = lm.blocks.down_weight(targets.layer)
    original = down[row, col].item()
    inputs = sample_inputs(lm)
    with quantized(lm, Scheme(weight_bits=4, group=16, protect="super-weight"), targets):
        expected = state_digests(lm.model), output(lm, inputs)
        assert down[row, col].item() == original  # kept in full precision
    torch.save({k: v for k, v in inputs.items() if k != "use_cache"}, tmp_path / "inputs.pt")
    assert reload_elsewhere([(str(out), str(tmp_path / "inputs.pt"), False)])[str(out)] == expected[0]
    assert torch.equal(torch.load(out / "out.pt"), expected[1])


@pytest.mark.parametrize("args, message", [
    (["--intervention", "set-mean"], "no exact form as weights"),
    (["--intervention", "set-half"], "unknown intervention"),
    (["--attack", "bogus"], "unknown attack"),
    (["--adapter", "/nonexistent"], "not a PEFT adapter folder"),
    (["--power", "2"], "--power belongs to --rescale"),
])
def test_cli_bad_export_input(tmp_path, args, message):
    result = runner.invoke(app, ["export", str(tmp_path / "out"), "-m", "no-model-needed", *args])
    text = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 1 and message in text and "Traceback" not in text, text
    assert not (tmp_path / "out").exists()


def test_cli_export_refuses_a_non_empty_folder_before_loading(tmp_path):
    (tmp_path / "x").write_text("keep")
    result = runner.invoke(app, ["export", str(tmp_path), "-m", "no-such-model"])
    assert result.exit_code == 1 and "not empty" in result.output


def test_cli_exports_an_attack_and_the_rescale(tmp_path, llama_folder):
    result = runner.invoke(app, ["export", str(tmp_path / "out"), "-m", str(llama_folder), "--attack", "topk-zero",
                                 "--k", "2", "--layer", "1", "--rescale", "--power", "2"])
    assert result.exit_code == 0, result.output
    edit = json.loads((tmp_path / "out" / EDIT_FILE).read_text())["results"]["edit"]
    assert [e["name"] for e in edit] == ["topk-zero k=2", "rescale 2^-2"]
