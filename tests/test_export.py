"""Export: edited tiny models of every family written as Hugging Face folders and reloaded by plain
``transformers`` in a fresh process (no cardhouse imported there): bit-identical weights, identical outputs."""

from __future__ import annotations

import json
from contextlib import ExitStack
import os
import subprocess
import sys
import textwrap

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


def test_cli_merges_a_lora_adapter_and_exports_it(tmp_path, llama_folder):
    """A fine-tuned adapter (what `cardhouse finetune` writes, with MacDrop or not) merged into the weights."""
    from peft import LoraConfig, get_peft_model

    lm = build("llama")
    peft = get_peft_model(lm.model, LoraConfig(r=2, target_modules=["up_proj", "down_proj"], lora_alpha=4))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter is not zero
    peft.save_pretrained(tmp_path / "adapter")
    inputs = sample_inputs(lm)
    with torch.inference_mode():
        expected = peft(**inputs).logits
    result = runner.invoke(app, ["export", str(tmp_path / "out"), "-m", str(llama_folder), "--adapter",
                                 str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    torch.save({k: v for k, v in inputs.items() if k != "use_cache"}, tmp_path / "inputs.pt")
    reload_elsewhere([(str(tmp_path / "out"), str(tmp_path / "inputs.pt"), False)])
    got = torch.load(tmp_path / "out" / "out.pt")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # merging W + BA rounds once
    edit = json.loads((tmp_path / "out" / EDIT_FILE).read_text())["results"]["edit"]
    assert edit[0]["kind"] == "adapter" and edit[0]["merged"]


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
