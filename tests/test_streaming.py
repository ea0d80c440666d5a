"""Layer streaming (issue 15): one decoder block at a time from the checkpoint gives what an ordinary
load gives — the same scan, massive weights and perplexities (float32, relative difference <= 1e-5) —
and attack variants that share the blocks before the attacked layer score as if run from scratch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MOE_FAMILIES, TEXT_FAMILIES, build, build_text_model, plant_massive_weight, text_config
from typer.testing import CliRunner

from cardhouse.analysis import find_massive_weights, scan
from cardhouse.cli import app
from cardhouse.evaluation.perplexity import perplexity
from cardhouse.evaluation.streamed import streamed_variants
from cardhouse.interventions import zero_rows, zero_super_weight
from cardhouse.models import ModelLoadError, load_model
from cardhouse.models.memory import requirements
from cardhouse.models.streaming import streamer_of

IDS = torch.randint(4, 99, (256,), generator=torch.Generator().manual_seed(0))


def save(family, folder, **kwargs):
    lm = build(family)
    plant_massive_weight(lm, layer=0, neuron=5, dim=7)
    lm.model.save_pretrained(folder, **kwargs)
    lm.tokenizer.save_pretrained(folder)
    return lm


def ppl(lm) -> float:
    return perplexity(lm.model, IDS, context=64, bos_id=lm.bos_id, progress=False).ppl


def close(a: float, b: float) -> bool:
    return abs(a / b - 1) <= 1e-5


@pytest.mark.parametrize("family", TEXT_FAMILIES)  # MoE too: the expert tensors are fused per block as transformers does
def test_streamed_equals_ordinary(family, tmp_path):
    save(family, tmp_path, max_shard_size="20KB")  # several shards and an index JSON
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ordinary, streamed = load_model(str(tmp_path), bos=True), load_model(str(tmp_path), bos=True, stream=True)
    assert streamer_of(streamed.model) is not None
    assert all(p.is_meta for p in streamed.blocks.layers.parameters())  # no block is kept in memory
    a, b = scan(ordinary, progress=False).to_dict(), scan(streamed, progress=False).to_dict()
    assert a["massive_layers"] and {k: v for k, v in a.items() if k != "model"} == {k: v for k, v in b.items()
                                                                                 if k != "model"}
    ma, mb = find_massive_weights(ordinary, k=3).to_dict(), find_massive_weights(streamed, k=3).to_dict()
    if family in MOE_FAMILIES:  # the routed experts' contributions are summed in another order: last-bit differences
        same = ("layer", "dim", "indices", "expert", "super_weight", "largest_down_entry")
        assert {k: ma[k] for k in same} == {k: mb[k] for k in same}
        assert [e["expert"] for e in ma["experts"]] == [e["expert"] for e in mb["experts"]]
    else:
        assert ma == mb
    assert close(ppl(streamed), ppl(ordinary))
    assert all(p.is_meta for p in streamed.blocks.layers.parameters())


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "phi3"])
def test_streamed_attack_variants_share_the_prefix(family, tmp_path):
    """The edited block is edited as it is loaded; variants sharing blocks 0..l-1 score exactly as the
    same variants run from scratch, and as the attacks on the model in memory."""
    save(family, tmp_path)
    ordinary, streamed = load_model(str(tmp_path), bos=True), load_model(str(tmp_path), bos=True, stream=True)
    variants = {"original": None,
                "zero": (1, lambda: zero_rows(streamed, 1, [1, 2, 3])),
                "retain": (1, lambda: zero_rows(streamed, 1, list(range(10, 40)))),
                "super": (1, lambda: zero_super_weight(streamed, 1, 7, 5))}
    kw = dict(context=64, bos_id=streamed.bos_id, progress=False)
    shared = streamed_variants(streamer_of(streamed.model), IDS, variants, **kw)
    scratch = streamed_variants(streamer_of(streamed.model), IDS, variants, share_prefix=False, **kw)
    expected = {"original": ppl(ordinary)}
    for name, edit in (("zero", lambda: zero_rows(ordinary, 1, [1, 2, 3])),
                       ("retain", lambda: zero_rows(ordinary, 1, list(range(10, 40)))),
                       ("super", lambda: zero_super_weight(ordinary, 1, 7, 5))):
        with edit():
            expected[name] = ppl(ordinary)
    for name in variants:
        assert close(shared[name].ppl, scratch[name].ppl) and close(shared[name].ppl, expected[name]), name
    assert len({round(r.ppl, 6) for r in shared.values()}) >= 3  # the attacks change something


def test_streaming_refuses_what_it_cannot_read(tmp_path):
    save("llama", tmp_path / "ok", max_shard_size="20KB")
    index = json.loads((tmp_path / "ok" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "ok" / shard).unlink()
    with pytest.raises(ModelLoadError, match=f"shards that are missing.*{shard}"):
        load_model(str(tmp_path / "ok"), stream=True)
    save("llama", tmp_path / "cut")
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    (tmp_path / "cut" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match="lacks .* tensors the config needs.*model.layers.2"):
        load_model(str(tmp_path / "cut"), stream=True)


def test_scan_command_streams_and_other_commands_say_they_do_not(tmp_path):
    save("llama", tmp_path / "ckpt")
    runner = CliRunner()
    result = runner.invoke(app, ["scan", "-m", str(tmp_path / "ckpt"), "--stream", "--limit", "4", "-o",
                                 str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert data["model"]["placement"]["stream"] is True and data["results"]["scan"]["massive_layers"]
    result = runner.invoke(app, ["position", "-m", str(tmp_path / "ckpt"), "--stream"])  # attack & co.: test_streamed_commands.py
    assert result.exit_code == 1 and "error: --stream serves attack, intervene, moe, report, scan" in result.output


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_memory_requirements_count_every_parameter(family):
    model = build_text_model(family)
    r = requirements(text_config(family), "bfloat16", tokens=100)
    assert r.parameters == sum(p.numel() for p in model.parameters())
    assert r.model_bytes == 2 * r.parameters and r.hidden_bytes == 100 * model.config.hidden_size * 2
    assert 0 < r.block_bytes < r.model_bytes and r.stream_bytes == r.block_bytes + r.rest_bytes + 2 * r.hidden_bytes


def test_memory_of_llama3_8b_and_70b_configs():
    from transformers import LlamaConfig

    base = dict(vocab_size=128256, num_key_value_heads=8, tie_word_embeddings=False)
    small = requirements(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, **base), "bfloat16")
    big = requirements(LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                   num_attention_heads=64, **base), "bfloat16")
    assert small.parameters == 8_030_261_248 and big.parameters == 70_553_706_496  # Llama-3-8B / 70B
    assert round(small.model_bytes / 2**30, 1) == 15.0 and round(big.model_bytes / 2**30, 1) == 131.4
    assert big.stream_bytes < 6 * 2**30  # a 70B streamed fits a 32 GB laptop
    gib = [[round(r.to_dict()[f"{k}_gib"], 2) for k in ("model", "block", "rest", "stream")] for r in (small, big)]
    assert gib == [[14.96, 0.41, 1.96, 2.39], [131.42, 1.59, 3.91, 5.57]]  # the README's table


def test_memory_command_reads_any_model_the_other_commands_read(tmp_path):
    """Regression: ``cardhouse memory`` read config.json itself, so a bundled name or a GGUF file was
    'cannot read the config'; it reads the same spec as every other command now."""
    from gguf_models import write_gguf

    from conftest import build_encoder_model

    lm = save("llama", tmp_path / "folder")
    body = build_encoder_model()  # counted as it loads: the body, no head
    body.save_pretrained(tmp_path / "encoder")
    encoder, gguf = tmp_path / "encoder", write_gguf(lm, tmp_path / "m.gguf")
    n, n_encoder = (sum(p.numel() for p in m.parameters()) for m in (lm.model, body))
    for model, count in ((tmp_path / "folder", n), (tmp_path / "folder" / "config.json", n), (gguf, n),
                         (encoder, n_encoder)):
        result = CliRunner().invoke(app, ["memory", str(model), "--dtype", "float32"])
        assert result.exit_code == 0, result.output
        assert f"{count:,} parameters in float32" in " ".join(result.output.split())  # rich wraps long paths


@pytest.mark.real
def test_smollm2_streamed_equals_ordinary():
    ordinary, streamed = load_model("smollm2-135m"), load_model("smollm2-135m", stream=True)
    a, b = scan(ordinary, progress=False), scan(streamed, progress=False)
    assert a.dims == b.dims == [507] and a.massive_layers == b.massive_layers and a.roles == b.roles
    assert [l["top_entries"][:3] for l in a.layers] == [l["top_entries"][:3] for l in b.layers]
    ma, mb = find_massive_weights(ordinary), find_massive_weights(streamed)
    assert (ma.layer, ma.dim, ma.indices, ma.super_weight) == (mb.layer, mb.dim, mb.indices, mb.super_weight)
    from cardhouse.data.token_cache import tokenize_corpus

    ids = tokenize_corpus(ordinary.tokenizer, "wikipedia", max_tokens=1022)
    p = [perplexity(lm.model, ids, context=512, bos_id=lm.bos_id, progress=False).ppl for lm in (ordinary, streamed)]
    assert close(p[1], p[0]), p


@pytest.mark.real
def test_gemma3_streamed_equals_ordinary():
    ordinary, streamed = load_model("gemma3-270m"), load_model("gemma3-270m", stream=True)
    a, b = scan(ordinary, progress=False), scan(streamed, progress=False)
    assert a.dims == b.dims and a.massive_layers == b.massive_layers and a.roles == b.roles
    ma, mb = find_massive_weights(ordinary), find_massive_weights(streamed)
    assert (ma.layer, ma.dim, ma.indices) == (mb.layer, mb.dim, mb.indices)
    from cardhouse.data.token_cache import tokenize_corpus

    ids = tokenize_corpus(ordinary.tokenizer, "wikipedia", max_tokens=1022)
    p = [perplexity(lm.model, ids, context=512, bos_id=lm.bos_id, progress=False).ppl for lm in (ordinary, streamed)]
    assert close(p[1], p[0]), p


def test_max_memory_must_hold_one_block(tmp_path):
    """--max-memory is checked on the config before any weight loads: --device-map needs the largest block
    on one device, --stream that block and the embeddings and head; exactly enough passes."""
    save("llama", tmp_path)
    r = requirements(text_config("llama"), "float32", tokens=0)
    stream_need, map_need = r.block_bytes + r.rest_bytes, r.block_bytes
    lm = load_model(str(tmp_path), stream=True, max_memory={"cpu": stream_need})
    assert streamer_of(lm.model) is not None
    with pytest.raises(ValueError, match=f"--max-memory: --stream keeps one decoder block .* in memory"):
        load_model(str(tmp_path), stream=True, max_memory={"cpu": stream_need - 1, "disk": 2**40})
    assert load_model(str(tmp_path), device_map="auto", max_memory={"cpu": map_need, "disk": 2**40},
                      offload_folder=str(tmp_path / "offload")).model is not None
    with pytest.raises(ValueError, match="the largest decoder block needs .* on one device"):
        load_model(str(tmp_path), device_map="auto", max_memory={"cpu": map_need - 1, "disk": 2**40},
                   offload_folder=str(tmp_path / "offload"))


def test_shared_variants_read_every_block_once(tmp_path, monkeypatch):
    """With a shared prefix each block is read once for all variants (reading a block costs about as
    much as running it); from scratch, once per variant. The perplexities agree."""
    from cardhouse.models.streaming import Streamer

    lm = build("llama", n_layers=3)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    streamed = load_model(str(tmp_path), bos=True, stream=True)
    loads: dict[int, int] = {}
    inner = Streamer.block
    monkeypatch.setattr(Streamer, "block", lambda self, layer: loads.update({layer: loads.get(layer, 0) + 1})
                        or inner(self, layer))
    variants = {"original": None, "zero": (1, lambda: zero_rows(streamed, 1, [1, 2, 3])),
                "super": (2, lambda: zero_super_weight(streamed, 2, 7, 5))}
    kw = dict(context=64, bos_id=streamed.bos_id, progress=False)
    shared = streamed_variants(streamer_of(streamed.model), IDS, variants, **kw)
    assert loads == {0: 1, 1: 1, 2: 1}
    loads.clear()
    scratch = streamed_variants(streamer_of(streamed.model), IDS, variants, share_prefix=False, **kw)
    assert loads == {0: 3, 1: 3, 2: 3}
    assert all(close(shared[name].ppl, scratch[name].ppl) for name in variants)
    assert len({round(r.ppl, 6) for r in shared.values()}) == 3


def test_each_block_is_read_into_the_previous_blocks_tensors(tmp_path, monkeypatch):
    """Reading into memory already mapped is several times faster than faulting in fresh pages: from the
    second block on, every block's tensors are the previous block's (same storage), and the results are
    still the ordinary load's (``test_streamed_equals_ordinary``). A block read under inference_mode can
    then be read into and edited outside it (the massive-weight search describes its rows under no_grad;
    an edit restores it)."""
    from cardhouse.capture import run_batches
    from cardhouse.models.streaming import Streamer

    lm = build("llama", n_layers=4)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    streamed = load_model(str(tmp_path), bos=True, stream=True)
    streamer = streamer_of(streamed.model)
    storage: dict[int, set[int]] = {}

    def note(layer, i):
        storage[layer] = {p.untyped_storage().data_ptr() for p in streamed.blocks.layers[layer].parameters()}

    streamer.run([{"input_ids": IDS[None, :16]}], hooks_for=note, progress=False)
    assert len(storage) == 4 and all(storage[layer] == storage[0] for layer in storage)
    with torch.no_grad(), streamer.block(2):
        weight = streamed.blocks.layers[2].mlp.up_proj.weight  # zero_rows edits its rows
        assert weight.untyped_storage().data_ptr() in storage[0] and not weight.is_inference()
        before = weight.clone()
        with zero_rows(streamed, 2, [1, 2]):
            assert not torch.equal(weight, before)
        assert torch.equal(weight, before)
    assert torch.equal(before, lm.blocks.layers[2].mlp.up_proj.weight)
    assert all(p.is_meta for p in streamed.blocks.layers.parameters())

    # a streamed run_batches stops after the last hooked block: the hooks are all it gives back
    reads: list[int] = []
    inner = Streamer._read
    monkeypatch.setattr(Streamer, "_read", lambda self, layer: reads.append(layer) or inner(self, layer))
    run_batches(streamed, [[1, 40, 41, 42]], lambda batch: {"blocks.1.hook_resid_post": lambda name, acts: None},
                progress=False)
    assert reads == [0, 1]
