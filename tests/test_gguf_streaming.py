"""GGUF files streamed one block at a time (issue 15): a block's tensors are dequantized only while it
is loaded, split files read like the single file, and the streamed scan and perplexity equal the
ordinary load's (float32: relative difference <= 1e-5; quantized: both sides dequantize the same bytes)."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import build, plant_massive_weight
from gguf_models import write_gguf

from cardhouse.analysis import find_massive_weights, scan
from cardhouse.evaluation.perplexity import perplexity
from cardhouse.models import ModelLoadError, load_model
from cardhouse.models.gguf_files import GGUFTensors
from cardhouse.models.streaming import streamer_of

IDS = torch.randint(4, 99, (256,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The dequantized-model cache of these throwaway files goes to the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def tiny(family: str):
    lm = build(family)
    plant_massive_weight(lm, layer=0, neuron=5, dim=7)
    return lm


def ppl(lm) -> float:
    return perplexity(lm.model, IDS, context=64, bos_id=lm.bos_id, progress=False).ppl


def close(a: float, b: float) -> bool:
    return abs(a / b - 1) <= 1e-5


def same_scan(a, b) -> bool:
    a, b = scan(a, progress=False).to_dict(), scan(b, progress=False).to_dict()
    return bool(a["massive_layers"]) and {k: v for k, v in a.items() if k != "model"} == \
        {k: v for k, v in b.items() if k != "model"}


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_1"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_gguf_equals_ordinary_load(family, qtype, tmp_path):
    path = write_gguf(tiny(family), tmp_path / f"{family}.gguf", qtype)
    ordinary, streamed = load_model(str(path), bos=True), load_model(str(path), bos=True, stream=True)
    assert streamer_of(streamed.model) is not None
    assert all(p.is_meta for p in streamed.blocks.layers.parameters())
    assert same_scan(ordinary, streamed)
    assert find_massive_weights(ordinary, k=3).to_dict() == find_massive_weights(streamed, k=3).to_dict()
    assert close(ppl(streamed), ppl(ordinary))
    assert all(p.is_meta for p in streamed.blocks.layers.parameters())


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_streamed_k_quants_equal_ordinary_load(qtype, tmp_path):
    """K-quant blocks (256 values: a model 256 wide) that the gguf package can only dequantize."""
    from conftest import build_tokenizer, text_config
    from transformers import AutoModelForCausalLM

    from cardhouse.models import from_pretrained_objects

    torch.manual_seed(0)
    config = text_config("llama", hidden_size=256, intermediate_size=256)
    lm = from_pretrained_objects(AutoModelForCausalLM.from_config(config).eval(), build_tokenizer(), bos=True)
    path = write_gguf(lm, tmp_path / "m.gguf", qtype)
    ordinary, streamed = load_model(str(path), bos=True), load_model(str(path), bos=True, stream=True)
    weight = ordinary.model.model.layers[0].mlp.down_proj.weight
    assert torch.isfinite(weight).all() and weight.abs().max() > 0  # real dequantized values, not zeros
    a, b = scan(ordinary, progress=False).to_dict(), scan(streamed, progress=False).to_dict()
    assert {k: v for k, v in a.items() if k != "model"} == {k: v for k, v in b.items() if k != "model"}
    assert close(ppl(streamed), ppl(ordinary))


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_streamed_moe_gguf_equals_ordinary_load(qtype, tmp_path):
    """Qwen3-MoE as llama.cpp writes it (ffn_gate_exps / ffn_up_exps / ffn_down_exps per layer): fused into
    the model's gate_up_proj by transformers' own GGUF processor, one block at a time. The experts are
    768 wide: transformers reads no expert width from a GGUF, so the config's default is the one that loads."""
    from conftest import build_tokenizer, text_config
    from transformers import AutoModelForCausalLM

    from cardhouse.models import from_pretrained_objects

    torch.manual_seed(0)
    config = text_config("qwen3_moe", moe_intermediate_size=768)
    lm = from_pretrained_objects(AutoModelForCausalLM.from_config(config).eval(), build_tokenizer(), bos=True)
    path = write_gguf(lm, tmp_path / "m.gguf", qtype)
    ordinary, streamed = load_model(str(path), bos=True), load_model(str(path), bos=True, stream=True)
    assert streamed.blocks.is_moe and all(p.is_meta for p in streamed.blocks.layers.parameters())
    if qtype == "F32":  # the GGUF round trip itself is exact
        assert ppl(ordinary) == ppl(lm)
    a, b = scan(ordinary, progress=False).to_dict(), scan(streamed, progress=False).to_dict()
    assert {k: v for k, v in a.items() if k != "model"} == {k: v for k, v in b.items() if k != "model"}
    assert close(ppl(streamed), ppl(ordinary))


def test_large_tensors_are_dequantized_in_chunks_alike(tmp_path, monkeypatch):
    """Row chunks (bounding the gguf package's temporaries) give the tensors whole dequantization gives."""
    path = write_gguf(tiny("llama"), tmp_path / "m.gguf", "Q8_0")
    streamed = load_model(str(path), bos=True, stream=True)
    reader = streamer_of(streamed.model).reader
    whole = {n: reader.tensor(n) for n in reader.names()}
    monkeypatch.setattr(GGUFTensors, "chunk", 40)  # one row (32 or 48 values) at a time
    assert all(torch.equal(reader.tensor(n), t) for n, t in whole.items())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_split_gguf_equals_the_single_file(family, tmp_path):
    lm = tiny(family)
    (tmp_path / "one").mkdir(), (tmp_path / "split").mkdir()
    single = write_gguf(lm, tmp_path / "one" / "m.gguf", "Q8_0")
    first = write_gguf(lm, tmp_path / "split" / "m.gguf", "Q8_0", split_max_tensors=6)
    parts = sorted((tmp_path / "split").glob("m-*-of-*.gguf"))
    assert len(parts) >= 3 and first == parts[0]
    one, split = load_model(str(single), bos=True), load_model(str(first), bos=True)
    assert all(torch.equal(a, b) for a, b in zip(one.model.state_dict().values(), split.model.state_dict().values()))
    assert one.model.config.tie_word_embeddings == split.model.config.tie_word_embeddings
    streamed = load_model(str(parts[-1]), bos=True, stream=True)  # any part names the whole file
    assert same_scan(one, streamed) and close(ppl(streamed), ppl(one))


@pytest.mark.parametrize("split", [False, True])
def test_the_first_load_reads_the_header_once(split, tmp_path, monkeypatch):
    """The first load of a GGUF (the probe, then the dequantization into the cache) makes a config of its header
    once: the probe's reading travels to the loader (it was read again to decide who builds the model, and a
    split file's skeleton a third time); later loads read the cache's config. ``_completed`` runs once a read."""
    from cardhouse.models import gguf_files

    reads, completed = [], gguf_files._completed
    monkeypatch.setattr(gguf_files, "_completed", lambda *args: reads.append(args) or completed(*args))
    path = write_gguf(tiny("llama"), tmp_path / "m.gguf", "Q8_0", split_max_tensors=6 if split else 0)
    first = load_model(str(path), bos=True)
    assert len(reads) == 1
    again = load_model(str(path), bos=True)
    assert len(reads) == 1 and close(ppl(again), ppl(first))


def test_a_missing_part_is_named_before_any_weights_load(tmp_path):
    first = write_gguf(tiny("llama"), tmp_path / "m.gguf", split_max_tensors=6)
    second = sorted(tmp_path.glob("m-*-of-*.gguf"))[1]
    second.unlink()
    for stream in (False, True):
        with pytest.raises(ModelLoadError, match=f"missing from .*: {second.name}"):
            load_model(str(first), stream=stream)


def test_a_type_the_gguf_package_cannot_dequantize_is_named(tmp_path):
    path = write_gguf(tiny("llama"), tmp_path / "m.gguf", float64=("blk.1.ffn_down.weight",))
    with pytest.raises(ModelLoadError, match="blk.1.ffn_down.weight in m.gguf is stored as F64.*cannot dequantize"):
        load_model(str(path), stream=True)


def test_only_one_block_is_dequantized_at_a_time(tmp_path, monkeypatch):
    """Peak: the tensors alive at once while streaming are those of one block (plus the embeddings and
    head, loaded once), never the whole file."""
    lm = tiny("llama")
    path = write_gguf(lm, tmp_path / "m.gguf", "Q8_0")
    streamed = load_model(str(path), bos=True, stream=True)
    streamer = streamer_of(streamed.model)
    per_block = {layer: {n for n in streamer.reader.names() if n.startswith(streamer.block_prefix(layer))}
                 for layer in range(len(streamed.blocks))}
    read, alive, peak = [], set(), []
    original = GGUFTensors.tensor

    def tracked(self, name, out=None):
        read.append(name)
        return original(self, name, out=out)

    monkeypatch.setattr(GGUFTensors, "tensor", tracked)

    def count(layer, i):
        gc.collect()
        alive.clear()
        alive.update(n for l, names in per_block.items() for n in names
                     if not streamed.blocks.layers[l].get_parameter(n[len(streamer.block_prefix(l)):]).is_meta)
        peak.append(len(alive))
        return None

    streamer.run([{"input_ids": torch.tensor([[1, 40, 41, 42]])}], hooks_for=count, progress=False)
    assert max(peak) == max(len(v) for v in per_block.values())  # exactly one block's tensors in memory
    in_blocks = {n for v in per_block.values() for n in v}
    # each read once, when its block ran (the token embedding is read too, while the states entering block 0 are made)
    assert sorted(n for n in read if n in in_blocks) == sorted(in_blocks)
    assert all(p.is_meta for p in streamed.blocks.layers.parameters())


@pytest.mark.real
def test_real_gemma3_gguf_streamed_finds_the_same_massive_dims():
    """The bundled Gemma-3-270M GGUF (Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0 tensors) streamed from the file."""
    ordinary, streamed = load_model("gemma3-270m"), load_model("gemma3-270m", stream=True)
    assert streamer_of(streamed.model).reader.__class__ is GGUFTensors
    a, b = scan(ordinary, progress=False), scan(streamed, progress=False)
    assert a.dims == b.dims and a.massive_layers == b.massive_layers and a.roles == b.roles
