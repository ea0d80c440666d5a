"""The from-scratch decoder and its training: the explicit attention bias, training, resuming, and
that its statistics are the project's scan (on a tiny model, char-level tokens of the built-in sentences)."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

import cardhouse.emergence.measure as measure_module
import cardhouse.emergence.tokens as tokens_module
import cardhouse.emergence.train as train_module
from cardhouse.analysis import massive_activations, scan
from cardhouse.analysis.prompts import builtin_prompts
from cardhouse.capture import POINTS, hook_name, record
from cardhouse.cli import app
from cardhouse.emergence import GPTConfig, TrainConfig, load_checkpoint, split_tokens, train_variant
from cardhouse.emergence.measure import scan_model
from cardhouse.emergence.tokens import get_batch
from cardhouse.emergence.train import build, resolve_device
from cardhouse.models.adapters import Blocks
from cardhouse.models.loading import from_pretrained_objects

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, batch_size=8, lr=3e-3, min_lr=3e-4, warmup=3,
            eval_windows=8, scan_prompts=6)


@pytest.fixture(scope="module")
def data(tokenizer):
    ids = tokenizer("\n".join(builtin_prompts()), add_special_tokens=False)["input_ids"]
    return split_tokens({"builtin": torch.tensor(ids)}, 0.2)


def tiny_pair(tokenizer, variant="bias"):
    config = TrainConfig(**TINY)
    return config, build(config, len(tokenizer), variant).eval()


@pytest.mark.parametrize("variant", ["bias", "sink"])
def test_models_differ_only_in_k_and_v_prime(tokenizer, variant):
    _, standard = tiny_pair(tokenizer, "standard")
    _, biased = tiny_pair(tokenizer, variant)
    extra = set(biased.state_dict()) - set(standard.state_dict())
    assert extra == {f"transformer.h.{l}.attn.{p}" for l in range(2) for p in ("k_bias", "v_bias")}
    for name, tensor in standard.state_dict().items():
        assert torch.equal(tensor, biased.state_dict()[name]), name
    assert torch.equal(biased.state_dict()["transformer.h.0.attn.k_bias"],
                       tiny_pair(tokenizer, "bias")[1].state_dict()["transformer.h.0.attn.k_bias"])


def test_bias_attention_equals_standard_attention_when_k_prime_scores_minus_infinity(tokenizer):
    _, standard = tiny_pair(tokenizer, "standard")
    _, biased = tiny_pair(tokenizer, "bias")
    with torch.no_grad():
        for block in biased.transformer.h:
            block.attn.v_bias.normal_()  # so that attending to k' would show
    ids = torch.randint(4, len(tokenizer), (3, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(standard(ids)[0], biased(ids)[0], atol=1e-4)  # k' does take attention
    for block in biased.transformer.h:
        block.attn.mask[:, 0] = -math.inf  # the score of k' for every query
    torch.testing.assert_close(biased(ids)[0], standard(ids)[0], rtol=1e-5, atol=1e-5)
    shares = biased.attention_shares(ids)
    assert shares["k_bias"] == [0.0, 0.0]


def test_output_shapes_and_attention_weights(tokenizer):
    _, model = tiny_pair(tokenizer, "bias")
    ids = torch.randint(4, len(tokenizer), (3, 10))
    logits, loss = model(ids, ids)
    assert logits.shape == (3, 10, len(tokenizer)) and loss.shape == ()
    assert model.base_model(ids).shape == (3, 10, 32)
    block = model.transformer.h[0]
    probs = block.attn.probs(block.ln_1(model.transformer.embed(ids)))  # [batch, head, query, k' + keys]
    assert probs.shape == (3, 4, 10, 11)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 10))
    assert float(probs[:, :, 2, 4:].detach().abs().max()) == 0.0  # causal: query 2 sees k' and keys 0..2
    shares = model.attention_shares(ids)
    assert len(shares["first_token"]) == len(shares["k_bias"]) == 2
    assert all(0 < s < 1 for s in shares["first_token"] + shares["k_bias"])
    with pytest.raises(ValueError, match="more than the context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_k_and_v_prime_get_gradients(tokenizer):
    _, model = tiny_pair(tokenizer, "bias")
    ids = torch.randint(4, len(tokenizer), (2, 12))
    model(ids, ids)[1].backward()
    for block in model.transformer.h:
        assert float(block.attn.k_bias.grad.abs().sum()) > 0
        assert float(block.attn.v_bias.grad.abs().sum()) > 0


def test_the_sink_slot_takes_attention_and_adds_nothing(tokenizer):
    _, standard = tiny_pair(tokenizer, "standard")
    _, sink = tiny_pair(tokenizer, "sink")
    plain, slot = standard.transformer.h[0].attn, sink.transformer.h[0].attn
    assert "v_bias" not in dict(sink.named_parameters()) and float(slot.v_bias.abs().sum()) == 0.0
    with torch.no_grad():
        slot.k_bias.normal_(std=1.0)  # so that k' takes a visible share
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p_plain, p_sink = plain.probs(x), slot.probs(x)  # [batch, head, query, slot + key]
        left = 1 - p_sink[..., :1]  # what the tokens still get
        assert float(p_sink[..., 0].min()) > 0.01
        torch.testing.assert_close(p_sink[..., 1:], p_plain * left)  # k' takes a share from every token alike
        _, _, v = plain.qkv(x)
        heads = (p_plain @ v) * left  # v' = 0: the standard heads' output, scaled down
        torch.testing.assert_close(slot(x), plain.c_proj(heads.transpose(1, 2).reshape(3, 10, 32)))


def test_the_sink_slot_learns_its_key_and_keeps_a_zero_value(tokenizer, data, tmp_path):
    config = TrainConfig(**TINY, steps=4, every=4)
    train_variant(config, "sink", data, tokenizer, tmp_path, progress=False)
    model, state = load_checkpoint(tmp_path / "checkpoint.pt")
    start = build(config, len(tokenizer), "sink")
    for trained, initial in zip(model.transformer.h, start.transformer.h):
        assert not torch.equal(trained.attn.k_bias, initial.attn.k_bias)
        assert float(trained.attn.v_bias.abs().sum()) == 0.0
    assert state["model_config"]["zero_value"] and state["variant"] == "sink"


def test_the_model_is_scannable_through_the_adapter_table(tokenizer):
    _, model = tiny_pair(tokenizer, "standard")
    assert Blocks.of(model).adapter.family == "nanogpt"
    lm = from_pretrained_objects(model, tokenizer, bos=False)
    names = [hook_name(l, p) for l in range(2) for p in POINTS]
    with record(model, names) as store, torch.inference_mode():
        model.base_model(torch.tensor([lm.encode("Summer is warm.")]))
    assert set(store) == set(names)
    for l in range(2):
        h = lambda p: store[hook_name(l, p)]  # noqa: E731
        torch.testing.assert_close(h("hook_resid_mid"), h("hook_resid_pre") + h("hook_attn_out"))
        torch.testing.assert_close(h("hook_resid_post"), h("hook_resid_mid") + h("mlp.hook_out"))
        assert h("mlp.hook_post").shape[-1] == Blocks.of(model).intermediate_size(l) == 128


def test_a_few_steps_reduce_the_loss(tokenizer, data, tmp_path):
    config = TrainConfig(**TINY, steps=30, every=10)
    run = train_variant(config, "standard", data, tokenizer, tmp_path, progress=False)
    losses = [h["val_loss"] for h in run["history"]]
    assert [h["step"] for h in run["history"]] == [0, 10, 20, 30]
    assert losses[0] > math.log(len(tokenizer)) - 0.5  # untrained: about uniform
    assert losses[-1] < losses[0] - 1.0
    assert run["finished"] and run["tokens_seen"] == 30 * 8 * 16


def test_statistics_of_a_trained_checkpoint_are_the_projects_scan(tokenizer, data, tmp_path):
    assert measure_module.scan is massive_activations.scan  # imported, not re-implemented
    config = TrainConfig(**TINY, steps=8, every=4)
    run = train_variant(config, "bias", data, tokenizer, tmp_path, progress=False)
    model, state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 8
    prompts = tokens_module.scan_prompts(data, tokenizer, config)
    direct = scan(from_pretrained_objects(model, tokenizer, bos=False), prompts, progress=False)
    recorded = run["history"][-1]["layers"]
    for row, mine in zip(direct.layers, recorded, strict=True):
        for key in ("top-1", "top-2", "top-3", "median"):
            assert mine[key] == pytest.approx(row[key], rel=1e-6)
        assert mine["ratio"] == pytest.approx(row["ratio_top1_median"], rel=1e-6)
        assert (mine["top_dim"], mine["top_position"]) == (row["top_entries"][0]["dim"],
                                                           row["top_entries"][0]["position"])
    assert run["final_scan"]["layers"] == scan_model(model, tokenizer, prompts, name="nanogpt-bias").layers


def test_resume_from_checkpoint_continues_identically(tokenizer, data, tmp_path, monkeypatch):
    config = TrainConfig(**TINY, steps=9, every=3)
    straight = train_variant(config, "bias", data, tokenizer, tmp_path / "straight", progress=False)

    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5: the last checkpoint is step 3's
            raise KeyboardInterrupt
        return get_batch(*args, **kwargs)

    monkeypatch.setattr(train_module, "get_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_variant(config, "bias", data, tokenizer, tmp_path / "split", progress=False)
    monkeypatch.setattr(train_module, "get_batch", get_batch)
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["step"] == 3
    part = train_variant(config, "bias", data, tokenizer, tmp_path / "split", stop_at=7, progress=False)
    assert part["step"] == 7 and not part["finished"]
    resumed = train_variant(config, "bias", data, tokenizer, tmp_path / "split", progress=False)
    a, _ = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b, _ = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert resumed["history"] == straight["history"]


def test_held_out_windows_come_from_every_corpus():
    # regression: the windows were the first ones of the held-out text, i.e. only the first corpus's
    data = split_tokens({"a": torch.arange(4, 1004), "b": torch.arange(2000, 3000)}, 0.1)  # every id once
    x, y = tokens_module.val_windows(data, TrainConfig(**{**TINY, "eval_windows": 4}))
    assert x.shape == y.shape == (4, 16)
    assert int(x[0].max()) < 1004 and int(x[-1].min()) >= 2000  # both corpora's held-out ends
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    starts = [int((data.val == row[0]).nonzero()) for row in x]
    assert starts[0] == 0 and all(b - a >= 16 for a, b in zip(starts, starts[1:]))  # no overlap


def test_ngram_baselines_of_a_periodic_text():
    text = torch.tensor([5, 6, 7] * 400)  # every token fixes the next one
    data = split_tokens({"abc": text}, 0.1)
    x, y = tokens_module.val_windows(data, TrainConfig(**TINY))
    lines = measure_module.ngram_baselines(data, x, y, vocab_size=50)
    assert lines["unigram"] == pytest.approx(math.log(3), abs=0.05)  # three tokens, equally often
    assert lines["bigram"] < 0.01  # the previous token says it all
    unseen = measure_module.ngram_baselines(data, torch.full_like(x, 9), y, vocab_size=50)  # contexts never seen
    assert unseen["bigram"] == pytest.approx(unseen["unigram"])  # fall back to the unigram model


def test_a_resume_with_another_config_is_refused(tokenizer, data, tmp_path):
    train_variant(TrainConfig(**TINY, steps=2, every=2), "standard", data, tokenizer, tmp_path, progress=False)
    with pytest.raises(ValueError, match="another config"):
        train_variant(TrainConfig(**{**TINY, "lr": 1e-2}, steps=2, every=2), "standard", data, tokenizer, tmp_path,
                      progress=False)


def test_bad_configs_and_data_are_refused(tokenizer, data):
    with pytest.raises(ValueError, match="must divide the width"):
        TrainConfig(n_head=3, n_embd=128)
    with pytest.raises(ValueError, match="must divide the width"):
        GPTConfig(n_head=5, n_embd=32)
    small = split_tokens({"tiny": torch.arange(4, 104)}, 0.2)
    with pytest.raises(ValueError, match="too few for a batch of 8 windows of 16 tokens"):
        train_variant(TrainConfig(**TINY), "standard", small, tokenizer, None, progress=False)
    with pytest.raises(ValueError, match="unknown variant"):
        TrainConfig().model_config(10, "nosuch")
    with pytest.raises(ValueError, match="zero_value needs attn_bias"):
        GPTConfig(zero_value=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_requested_without_cuda_falls_back_to_the_cpu():
    with pytest.warns(UserWarning, match="CUDA is not available"):
        device, note = resolve_device("cuda")
    assert device.type == "cpu" and "training on the CPU" in note


def test_cli_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path):
    runner = CliRunner()
    for args, message in ((["--n-head", "3"], "must divide the width"),
                          (["--variants", "standard,nosuch"], "unknown variant"),
                          (["--corpora", "nosuch"], "unknown corpus")):
        result = runner.invoke(app, ["emergence", *args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 1, result.output
        assert "error:" in result.output and message in result.output
        assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_cli_trains_the_variants_on_the_real_corpora(tmp_path):
    import json

    from cardhouse.emergence import config_with, load_data, smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    data = load_data(tokenizer, config_with("cpu"))
    assert set(data.corpora) == {"wikipedia", "c4", "austen"} and min(data.corpora.values()) > 100_000
    assert sum(data.corpora.values()) == len(data.train) + len(data.val)
    assert len(tokenizer) == 49152 and int(data.train.max()) < len(tokenizer)
    args = ["emergence", "--steps", "8", "--every", "4", "--warmup", "2", "--lr", "5e-3", "--n-layer", "2", "--n-embd", "64",
            "--block-size", "32", "--device", "cuda", "--threads", "1", "--variants", "standard,bias,sink",
            "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "emergence.json").read_text())
    results = saved["results"]
    for variant in ("standard", "bias", "sink"):
        run = results["runs"][variant]
        losses = [h["val_loss"] for h in run["history"]]
        assert [h["step"] for h in run["history"]] == [0, 4, 8]
        assert losses[0] > 10.0 and losses[-1] < losses[0] - 0.5  # from uniform over 49k tokens, learning
        if not torch.cuda.is_available():
            assert run["device"] == "cpu" and "CUDA is not available" in run["device_note"]
    if not torch.cuda.is_available():
        assert "CUDA is not available: training on the CPU" in result.output
    assert results["final"]["summary"]["standard"]["massive_layers"] == []  # 8 steps grow nothing massive
    for variant in ("bias", "sink"):
        assert all(s > 0.01 for s in results["runs"][variant]["history"][-1]["attention"]["k_bias"])
    assert (tmp_path / "emergence.png").stat().st_size > 10_000
    lines = results["data"]["baselines"]
    assert 5.0 < lines["bigram"] < lines["unigram"] < 8.0  # real text: the previous token helps
    carried = smollm2_tokenizer(tmp_path / "tokenizer")  # the run folder's own copy
    assert carried("Summer is warm.")["input_ids"] == tokenizer("Summer is warm.")["input_ids"]
    assert saved["command"].startswith("cardhouse emergence")
