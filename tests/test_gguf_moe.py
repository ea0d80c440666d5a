"""Mixture-of-Experts GGUF files as llama.cpp writes them (issue 15): Mixtral as architecture ``llama`` with
``llama.expert_count`` experts and 3-D ``blk.N.ffn_{gate,up,down}_exps`` tensors plus the router
``ffn_gate_inp`` (transformers alone reads a dense llama), and Qwen2-MoE (``qwen2moe``, with the shared
expert's ``ffn_*_shexp``; transformers alone takes the expert widths from its config defaults). cardhouse
completes the config from the header and fuses the expert tensors into the model's layout: the ordinary and
the streamed load give the transformers model's logits (F32: within 1e-5), the same perplexity and the same
MoE analysis, with the planted carrier expert and super expert found (``test_moe``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import build_tokenizer, text_config
from gguf_models import write_gguf
from test_moe import CARRIER_EXPERT, CARRIER_LAYER, N_EXPERTS, N_LAYERS, NEURON, SUPER_EXPERT, SUPER_LAYER, plant
from test_moe_streaming import assert_same_analysis
from cardhouse.analysis.moe import analyze_moe
from cardhouse.cli import app
from cardhouse.evaluation.perplexity import perplexity
from cardhouse.models import from_pretrained_objects, load_model
from cardhouse.models.offload import shapes_only
from cardhouse.models.spec import probe
from cardhouse.models.streaming import streamer_of

IDS = torch.randint(4, 99, (256,), generator=torch.Generator().manual_seed(0))
EXPERTS = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts"}
LLAMA_CPP = {"mixtral": ("llama", ["blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_exps.weight",
                                   "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"]),
             "qwen2_moe": ("qwen2moe", ["blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_exps.weight",
                                        "blk.0.ffn_down_exps.weight", "blk.0.ffn_up_shexp.weight",
                                        "blk.0.ffn_gate_inp_shexp.weight"])}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The dequantized-model cache of these throwaway files goes to the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def planted(family: str):
    """A tiny random model of ``family``, every layer MoE (a GGUF header cannot say which are dense), planted."""
    torch.manual_seed(0)
    config = text_config(family, num_hidden_layers=N_LAYERS, num_experts_per_tok=2, **{EXPERTS[family]: N_EXPERTS})
    lm = from_pretrained_objects(AutoModelForCausalLM.from_config(config).eval(), build_tokenizer(), bos=True)
    plant(lm)
    return lm


def ppl(lm) -> float:
    return perplexity(lm.model, IDS, context=64, bos_id=lm.bos_id, progress=False).ppl


def logits(lm) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(input_ids=IDS[None, :64]).logits


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_gguf_loads_as_its_family_ordinary_and_streamed(family, qtype, tmp_path):
    import gguf

    lm = planted(family)
    path = write_gguf(lm, tmp_path / f"{family}.gguf", qtype)
    reader = gguf.GGUFReader(path)  # written the way llama.cpp's converter writes it
    arch, names = LLAMA_CPP[family]
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.expert_count"].contents() == N_EXPERTS
    stored = {t.name: t for t in reader.tensors}
    assert set(names) <= set(stored) and len(stored["blk.0.ffn_gate_exps.weight"].shape) == 3

    spec = probe(str(path))  # from the header alone
    with shapes_only():
        assert spec.family == family and spec.blocks.is_moe and spec.blocks.n_experts(0) == N_EXPERTS
    ordinary, streamed = load_model(str(path), bos=True), load_model(str(path), bos=True, stream=True)
    assert ordinary.family == streamed.family == family and streamer_of(streamed.model) is not None
    assert all(p.is_meta for p in streamed.blocks.layers.parameters())
    if qtype == "F32":  # the round trip through llama.cpp's layout is exact
        torch.testing.assert_close(logits(ordinary), logits(lm), rtol=1e-5, atol=1e-5)
        assert ppl(ordinary) == pytest.approx(ppl(lm), rel=1e-5)
    else:  # Q8_0: about 1% per weight
        torch.testing.assert_close(logits(ordinary), logits(lm), rtol=0.1, atol=0.05)
    assert ppl(streamed) == pytest.approx(ppl(ordinary), rel=1e-5)

    a = analyze_moe(ordinary, k=3, batch_size=4, progress=False).to_dict()
    b = analyze_moe(streamed, k=3, batch_size=4, progress=False).to_dict()
    assert_same_analysis(a, b)
    if qtype == "F32":
        assert_same_analysis(analyze_moe(lm, k=3, batch_size=4, progress=False).to_dict(), a)
    mw, flagged = b["massive_weights"], b["super_experts"]["flagged"]
    assert (b["collapse_layer"], mw["layer"], mw["expert"], mw["indices"][0]) == \
        (CARRIER_LAYER, CARRIER_LAYER, CARRIER_EXPERT, NEURON)
    assert (flagged[0]["layer"], flagged[0]["expert"]) == (SUPER_LAYER, SUPER_EXPERT)
    assert b["shared_expert"] == (family == "qwen2_moe")


def test_moe_command_streams_a_mixtral_gguf(tmp_path):
    path = write_gguf(planted("mixtral"), tmp_path / "mixtral.gguf", "Q8_0")
    result = CliRunner().invoke(app, ["moe", "-m", str(path), "--stream", "--k", "3", "--limit", "8",
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "moe.json").read_text())
    assert data["model"]["family"] == "mixtral" and data["results"]["collapse_layer"] == CARRIER_LAYER
    assert data["results"]["massive_weights"]["expert"] == CARRIER_EXPERT


def test_a_dense_llama_gguf_stays_a_llama(tmp_path):
    """No ``llama.expert_count``: transformers' own reading of the header, unchanged."""
    from conftest import build

    from cardhouse.models.gguf_files import read_gguf_header

    path = write_gguf(build("llama"), tmp_path / "llama.gguf", "F32")
    assert probe(str(path)).family == "llama" and read_gguf_header(path).transformers_builds
    assert np.isfinite(ppl(load_model(str(path), bos=True)))
