"""Any dtype, any device, accelerate device maps with CPU and disk offload (issue 15).

Tiny random models of every text family are saved to a folder and loaded back through
``load_model`` the way a user's checkpoint is: in bfloat16 and float16, and dispatched by
accelerate with some blocks on the CPU and the rest offloaded to disk. The analyses must give
the float32 answers (massive dims, layers, top-k rows; perplexity within a stated tolerance),
float16 overflow must be reported with its layer, and weight edits on offloaded blocks must
change what the model computes and restore it bit-identically.
"""

from __future__ import annotations

import pytest
import torch
from contextlib import ExitStack

from conftest import BOS_ID, N_EXPERTS, TEXT_FAMILIES, build, plant_massive_weight
from typer.testing import CliRunner

from cardhouse.analysis import ActivationOverflow, find_massive_weights, scan
from cardhouse.cli import app
from cardhouse.evaluation.perplexity import perplexity
from cardhouse.interventions import weights_digest, zero_rows, zero_super_weight
from cardhouse.models import load_model, offload
from cardhouse.models.placement import Placement, input_device, parse_max_memory, parse_size

# perplexity of a reduced-precision model relative to float32 (measured on the tiny models:
# bfloat16 <= 0.11%, float16 <= 0.01%; on SmolLM2/Gemma-3 bfloat16 0.12%/0.09%, float16 0.004%)
BF16_TOLERANCE, FP16_TOLERANCE = 0.01, 0.005
IDS = torch.randint(4, 99, (256,), generator=torch.Generator().manual_seed(0))  # the tokenizer's characters


def save_planted(family: str, folder, down: float = 100.0):
    """A tiny model with a planted massive weight (layer 0, neuron 5 -> dim 7), saved as a checkpoint."""
    lm = build(family)
    plant_massive_weight(lm, layer=0, neuron=5, dim=7, down=down)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return lm


def split_map(lm) -> dict[str, str]:
    """accelerate device map: the embedding (and a head tied to it) and block 0 on the CPU, everything
    else offloaded to disk."""
    first = f"{lm.blocks.adapter.layers}.0."
    embedding = lm.model.get_input_embeddings().weight
    tied = {n for n, m in lm.model.named_modules() if getattr(m, "weight", None) is embedding}
    return {name: "cpu" if name in tied or name.startswith(first) else "disk"
            for name, m in lm.model.named_modules()
            if next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None}


def ppl(lm) -> float:
    return perplexity(lm.model, IDS, context=64, bos_id=lm.bos_id, progress=False).ppl


def summary(lm):
    r = scan(lm, progress=False)
    mw = find_massive_weights(lm, k=3)
    return {"dims": r.dims, "layers": r.massive_layers, "roles": r.roles,
            "top": [[(e["dim"], e["position"]) for e in layer["top_entries"][:3]] for layer in r.layers],
            "mw": (mw.layer, mw.dim, mw.indices, mw.super_weight["column"])}


# ---- parsing and checks: one clear error before loading -------------------------------------------


def test_sizes_and_max_memory_parse():
    assert parse_size("20GiB") == 20 * 2**30 and parse_size("512 MB") == 512 * 10**6 and parse_size("100") == 100
    assert parse_max_memory("cpu=60GiB, disk=1TB") == {"cpu": 60 * 2**30, "disk": 10**12}
    assert parse_max_memory(None) is None


@pytest.mark.parametrize("text, message", [("0=2x", "cannot read the size '2x'"), ("gpu=1GiB", "cannot read 'gpu=1GiB'"),
                                           ("cpu", "cannot read 'cpu'"), (",", "empty")])
def test_bad_max_memory_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_max_memory(text)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="float8"), "unknown dtype 'float8'"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(device_map="everywhere"), "unknown --device-map"),
    (dict(max_memory="cpu=1GiB"), "add --device-map auto"),
    (dict(offload_folder="/tmp/x"), "add --device-map auto"),
])
def test_impossible_placements_fail_before_loading(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Placement.of(**kwargs)
    with pytest.raises(ValueError, match=message):
        load_model("a-folder-that-is-never-read", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        Placement.of(device="cuda")
    result = CliRunner().invoke(app, ["scan", "--device", "cuda"])
    assert result.exit_code == 1 and result.output.startswith("error:") and "CUDA is not available" in result.output


@pytest.mark.parametrize("command", ["scan", "attack", "intervene", "sweep", "report", "attention", "trace",
                                     "position", "finetune", "finetune-compare"])
def test_every_model_command_takes_the_placement_options(command):
    args = [command] + (["topk-zero"] if command == "attack" else ["set-zero"] if command == "intervene" else [])
    help_text = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
    for option in ("--dtype", "--device", "--device-map", "--max-memory", "--offload-folder"):
        assert option in help_text, (command, option)
    result = CliRunner().invoke(app, args + ["--max-memory", "cpu=lots", "--device-map", "auto"])
    assert result.exit_code == 1 and "error: --max-memory: cannot read the size 'lots'" in result.output


def test_auto_dtype_is_float32_on_a_cpu():
    assert Placement.of(dtype="auto", device="cpu").torch_dtype(torch.bfloat16) == torch.float32
    assert Placement.of(dtype="bfloat16").from_pretrained_kwargs() == {"dtype": torch.bfloat16}


# ---- dtypes: the same findings, perplexity within tolerance, overflow reported ---------------------


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_bfloat16_and_float16_find_what_float32_finds(family, tmp_path):
    save_planted(family, tmp_path / "big", down=100.0)
    save_planted(family, tmp_path / "small", down=10.0)  # fits float16 (|a| ~ 11,000 < 65,504)
    for dtype, folder, tolerance in (("bfloat16", "big", BF16_TOLERANCE), ("float16", "small", FP16_TOLERANCE)):
        exact = load_model(str(tmp_path / folder), bos=True)
        low = load_model(str(tmp_path / folder), dtype=dtype, bos=True)
        assert low.describe()["dtype"] == dtype and exact.describe()["dtype"] == "float32"
        ours, ref = summary(low), summary(exact)
        assert ours["dims"] == ref["dims"] == [7] and ours["layers"] == ref["layers"]
        assert ours["mw"][:2] == ref["mw"][:2] == (0, 7) and ours["mw"][2][0] == ref["mw"][2][0] == 5
        assert abs(ppl(low) / ppl(exact) - 1) <= tolerance, (dtype, ppl(low), ppl(exact))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "mixtral"])
def test_float16_overflow_names_the_layer(family, tmp_path):
    save_planted(family, tmp_path, down=100.0)  # |a| ~ 115,000 in layer 0: beyond float16's 65,504
    lm = load_model(str(tmp_path), dtype="float16", bos=True)
    with pytest.raises(ActivationOverflow, match=r"overflow float16 from layer 0 on \(\|a\| > 65,504"):
        scan(lm, progress=False)
    with pytest.raises(ActivationOverflow, match="overflow float16"):
        find_massive_weights(lm)
    assert ppl(lm) == float("inf")  # reported as an overflow, not as a number


# ---- accelerate: CPU and disk offload -------------------------------------------------------------


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_dispatched_with_disk_offload_gives_the_same_scan_and_perplexity(family, tmp_path):
    device_map = split_map(save_planted(family, tmp_path / "ckpt"))
    ref = load_model(str(tmp_path / "ckpt"), bos=True)  # the ordinary load of the same checkpoint
    lm = load_model(str(tmp_path / "ckpt"), bos=True, device_map=device_map, offload_folder=tmp_path / "off")
    assert set(lm.model.hf_device_map.values()) == {"cpu", "disk"}
    assert input_device(lm.model).type == "cpu"
    assert summary(lm) == summary(ref)
    assert abs(ppl(lm) / ppl(ref) - 1) <= 1e-5


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_weight_edits_on_disk_offloaded_blocks_act_and_restore(family, tmp_path):
    """Block 1 lives on disk (a meta tensor in the module): zeroing its rows must change the output
    exactly as on the model in memory, and leave the weights it reads afterwards bit-identical."""
    ref = save_planted(family, tmp_path / "ckpt")
    lm = load_model(str(tmp_path / "ckpt"), bos=True, device_map=split_map(ref), offload_folder=tmp_path / "off")
    ref = load_model(str(tmp_path / "ckpt"), bos=True)
    layer = 1
    assert lm.blocks.layers[layer].mlp.parameters().__next__().is_meta  # really offloaded
    ids = torch.tensor([[BOS_ID] + IDS[:20].tolist()])
    experts = range(N_EXPERTS) if lm.blocks.is_moe else [None]

    def edit_all(model, edit, *args):  # the same edit in every expert of an MoE layer
        stack = ExitStack()
        for expert in experts:
            stack.enter_context(edit(model, layer, *args, expert=expert))
        return stack

    def logits(model):
        with torch.inference_mode():
            return model.model(input_ids=ids).logits

    def digest():
        return weights_digest([t for e in experts for t, _, _ in lm.blocks.neuron_slices(layer, e)]
                              + [lm.blocks.down_weight(layer, e) for e in experts])

    before, clean = digest(), logits(lm)
    with edit_all(ref, zero_rows, [1, 3]):
        want = logits(ref)
    with edit_all(lm, zero_rows, [1, 3]):
        got = logits(lm)
        with edit_all(lm, zero_super_weight, 7, 5):  # nested edits of the same block
            nested = logits(lm)
        assert torch.equal(logits(lm), got)  # the outer edit still holds after the inner one ended
    assert torch.equal(got, want) and not torch.equal(got, clean) and not torch.equal(nested, got)
    assert digest() == before and torch.equal(logits(lm), clean)
    assert not offload._disk_copies or all(e[2] == 0 for e in offload._disk_copies.values())
    with pytest.raises(RuntimeError, match="boom"), edit_all(lm, zero_rows, [2]):
        raise RuntimeError("boom")
    assert digest() == before and torch.equal(logits(lm), clean)


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_edits_through_accelerates_own_offload_hooks(how, tmp_path):
    """accelerate's cpu_offload keeps the weights in a dict, disk_offload in .dat files: both edited."""
    import accelerate

    ref = build("llama")
    lm = build("llama")
    if how == "cpu_offload":
        accelerate.cpu_offload(lm.model, execution_device="cpu")
    else:
        accelerate.disk_offload(lm.model, str(tmp_path), execution_device="cpu")
    assert lm.blocks.layers[0].mlp.up_proj.weight.is_meta
    ids = torch.tensor([[BOS_ID, 10, 11, 12, 13]])
    with torch.inference_mode():
        clean = lm.model(input_ids=ids).logits
    with zero_rows(ref, 0, [0, 4]), zero_rows(lm, 0, [0, 4]), torch.inference_mode():
        assert torch.equal(lm.model(input_ids=ids).logits, ref.model(input_ids=ids).logits)
    with torch.inference_mode():
        assert torch.equal(lm.model(input_ids=ids).logits, clean)


# ---- GPU (skipped without CUDA) -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "mixtral", "gpt2"])
def test_on_cuda_in_bfloat16(family, tmp_path):
    ref = save_planted(family, tmp_path)
    lm = load_model(str(tmp_path), dtype="bfloat16", device="cuda", bos=True)
    assert lm.device.type == "cuda" and lm.describe()["dtype"] == "bfloat16"
    assert summary(lm)["dims"] == summary(ref)["dims"] and summary(lm)["mw"][:2] == summary(ref)["mw"][:2]
    assert abs(ppl(lm) / ppl(ref) - 1) <= BF16_TOLERANCE
    before = weights_digest([p for _, p in sorted(lm.model.named_parameters())])
    with zero_rows(lm, 0, [5]):
        assert ppl(lm) != ppl(ref)
    assert weights_digest([p for _, p in sorted(lm.model.named_parameters())]) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_with_cpu_offload_edits_restore(tmp_path):
    ref = save_planted("llama", tmp_path / "ckpt")
    device_map = {name: (0 if device == "cpu" else "cpu") for name, device in split_map(ref).items()}
    lm = load_model(str(tmp_path / "ckpt"), bos=True, device_map=device_map)
    assert summary(lm) == summary(ref)
    with zero_rows(ref, 1, [1, 3]), zero_rows(lm, 1, [1, 3]):
        assert abs(ppl(lm) / ppl(ref) - 1) <= 1e-5
    assert abs(ppl(lm) / ppl(ref) - 1) <= 1e-5


# ---- checkpoints where users keep them: pytorch_model.bin only without pickled code ------------------


class _Evil:
    def __reduce__(self):  # unpickling this would run code
        return (print, ("pickled code ran",))


def test_pytorch_model_bin_loads_its_tensors_and_refuses_pickled_code(tmp_path):
    ref = save_planted("llama", tmp_path / "st")
    ref.model.config.save_pretrained(tmp_path / "bin")
    ref.tokenizer.save_pretrained(tmp_path / "bin")
    torch.save({k: v.clone() for k, v in ref.model.state_dict().items()}, tmp_path / "bin" / "pytorch_model.bin")
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    lm = load_model(str(tmp_path / "bin"), bos=True)
    assert abs(ppl(lm) / ppl(ref) - 1) <= 1e-6
    state = torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
    state["evil"] = _Evil()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    from cardhouse.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="(?i)weights_only|unpickl|unsupported global"):
        load_model(str(tmp_path / "bin"), bos=True)


def test_remote_code_is_never_trusted_silently(tmp_path):
    save_planted("llama", tmp_path)
    import json

    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    from cardhouse.models import ModelLoadError

    try:
        lm = load_model(str(tmp_path), bos=True)  # the model's own class, never the folder's code
        assert type(lm.model).__name__ == "LlamaForCausalLM"
    except ModelLoadError as e:
        assert "trust_remote_code" in str(e)
