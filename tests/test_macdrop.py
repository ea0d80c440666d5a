"""MacDrop (House of Cards Algorithm 1) on tiny random models: schedules, masking, restoring, scope, training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from cardhouse.finetuning import (FinetuneConfig, MacDrop, MacDropConfig, NoMassiveWeightsError, detect_massive_rows,
                                  drop_rate, finetune)
from cardhouse.interventions import weights_digest
from conftest import build, plant_massive_weight

LAYER, ROWS = 1, [3, 17, 40]


def rows_of(lm, layer=LAYER) -> list[torch.Tensor]:
    """W_gate and W_up of ``layer`` (the tensors MacDrop may touch)."""
    return [t for t, _, _ in lm.blocks.neuron_slices(layer) if t.dim() == 2]


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in lm.model.named_parameters()}


# ---- schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule, step, total, epoch, epochs, expected", [
    ("constant", 0, 10, 1, 3, 0.8),
    ("constant", 9, 10, 3, 3, 0.8),
    ("step", 0, 10, 1, 1, 0.8),
    ("step", 5, 10, 1, 1, 0.4),
    ("step", 9, 10, 1, 1, 0.08),
    ("epoch-before", 0, 30, 1, 3, 0.8),
    ("epoch-before", 15, 30, 2, 3, 0.8 * 2 / 3),
    ("epoch-before", 29, 30, 3, 3, 0.8 / 3),
    ("epoch-after", 0, 30, 1, 3, 0.8 * 2 / 3),
    ("epoch-after", 15, 30, 2, 3, 0.8 / 3),
    ("epoch-after", 29, 30, 3, 3, 0.0),
])
def test_schedule_values(schedule, step, total, epoch, epochs, expected):
    assert drop_rate(MacDropConfig(schedule=schedule), step, total, epoch, epochs) == pytest.approx(expected)


def test_exponential_schedule():
    config = MacDropConfig(schedule="exponential", p0=0.5, alpha=0.1)
    assert drop_rate(config, 0, 100) == pytest.approx(0.5)
    assert drop_rate(config, 10, 100) == pytest.approx(0.5 * math.exp(-1))
    # default alpha: 3 / T, so the last step is at p0 e^-3
    assert drop_rate(MacDropConfig(schedule="exponential"), 50, 50) == pytest.approx(0.8 * math.exp(-3))


@pytest.mark.parametrize("bad, message", [
    (dict(p0=-0.1), "p0 must be in"), (dict(p0=1.5), "p0 must be in"),
    (dict(schedule="cosine"), "unknown MacDrop schedule"), (dict(scope="rows"), "unknown MacDrop scope"),
    (dict(k=0), "k must be"), (dict(alpha=-1.0), "alpha"), (dict(rows=[]), "empty"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        MacDropConfig(**bad)


# ---- masking and restoring ------------------------------------------------------------------------


def test_rows_masked_inside_and_restored_bit_identically(tiny):
    lm = tiny("llama")
    macdrop = MacDrop(lm.model, LAYER, ROWS, MacDropConfig(p0=0.5))
    before = snapshot(lm)
    digest = weights_digest(list(lm.model.parameters()))
    with macdrop.dropped(0.5, step=3):
        for tensor in rows_of(lm):
            masked = tensor[ROWS]
            assert (masked == 0).any() and (masked != 0).any()
    assert weights_digest(list(lm.model.parameters())) == digest
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_rows_restored_when_the_step_raises(tiny):
    lm = tiny("llama")
    macdrop = MacDrop(lm.model, LAYER, ROWS)
    digest = weights_digest(list(lm.model.parameters()))
    with pytest.raises(RuntimeError, match="boom"):
        with macdrop.dropped(0.8, step=0):
            raise RuntimeError("boom")
    assert weights_digest(list(lm.model.parameters())) == digest
    # the callback's path: masked by mask(), restored by the guard on an error
    with pytest.raises(KeyboardInterrupt):
        with macdrop:
            macdrop.mask(0.8, step=1)
            assert macdrop.masked
            raise KeyboardInterrupt
    assert not macdrop.masked
    assert weights_digest(list(lm.model.parameters())) == digest


def test_masks_are_fresh_per_step_and_seeded(tiny):
    lm = tiny("llama")
    gate = rows_of(lm)[0]

    def mask_at(step, seed=0):
        with MacDrop(lm.model, LAYER, ROWS, MacDropConfig(seed=seed)).dropped(0.5, step):
            return gate[ROWS] == 0

    assert torch.equal(mask_at(4), mask_at(4))
    assert not torch.equal(mask_at(4), mask_at(5))
    assert not torch.equal(mask_at(4), mask_at(4, seed=1))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_mask_rate_matches_p_statistically(tiny, p):
    lm = tiny("llama")
    macdrop = MacDrop(lm.model, LAYER, ROWS, MacDropConfig(scope="all"))
    assert all((t != 0).all() for t in rows_of(lm))  # random weights: a zero can only come from the mask
    dropped = total = 0
    for step in range(5):
        with macdrop.dropped(p, step):
            for tensor in rows_of(lm):
                dropped += int((tensor == 0).sum())
                total += tensor.numel()
    sigma = math.sqrt(p * (1 - p) / total)
    assert abs(dropped / total - p) < 5 * sigma, (dropped / total, p)


@pytest.mark.parametrize("scope", ["massive", "non-massive", "all"])
def test_only_the_chosen_scope_is_touched(scope):
    lm = build("llama")
    macdrop = MacDrop(lm.model, LAYER, ROWS, MacDropConfig(scope=scope))
    size = lm.blocks.intermediate_size(LAYER)
    expected = {"massive": set(ROWS), "all": set(range(size))}.get(scope)
    if scope == "non-massive":
        assert len(macdrop.rows) == len(ROWS) and not set(macdrop.rows) & set(ROWS)
        expected = set(macdrop.rows)
    assert set(macdrop.rows) == expected
    touched = {id(t) for t in rows_of(lm)}
    before = snapshot(lm)
    with macdrop.dropped(1.0):  # p = 1: every entry of the scope is zero
        for name, param in lm.model.named_parameters():
            if id(param) not in touched:
                assert torch.equal(param, before[name]), name
                continue
            changed = {int(i) for i in (param != before[name]).any(dim=1).nonzero()}
            assert changed == expected, name
            assert (param[sorted(expected)] == 0).all()


def test_phi3_fused_rows_are_both_halves(tiny):
    lm = tiny("phi3")
    n = lm.blocks.intermediate_size(0)
    fused = lm.blocks.mlp_part(0, "up").weight  # [gate; up]
    before = fused.detach().clone()
    with MacDrop(lm.model, 0, [2], MacDropConfig()).dropped(1.0):
        changed = {int(i) for i in (fused != before).any(dim=1).nonzero()}
    assert changed == {2, n + 2}
    assert torch.equal(fused, before)


def test_moe_rows_are_in_the_chosen_expert_only(tiny):
    lm = tiny("mixtral")
    n = lm.blocks.intermediate_size(0)
    experts = lm.blocks.mlp_part(0, "up")  # [expert, 2 * d_mlp, d]: rows [gate; up]
    before = experts.detach().clone()
    with MacDrop(lm.model, 0, [2], MacDropConfig(), expert=1).dropped(1.0):
        changed = {tuple(map(int, i)) for i in (experts != before).any(dim=2).nonzero()}
    assert changed == {(1, 2), (1, n + 2)}
    assert torch.equal(experts, before)


# ---- massive rows: detected, or given ----------------------------------------------------------------


def test_no_massive_weights_is_said_and_rows_can_be_given(tiny):
    lm = tiny("llama")
    with pytest.raises(NoMassiveWeightsError, match="no massive weights detected.*--rows"):
        MacDrop.for_model(lm, MacDropConfig())
    with pytest.raises(ValueError, match="layer"):
        MacDrop.for_model(lm, MacDropConfig(rows=[1, 2]))
    with pytest.raises(ValueError, match="out of range"):
        MacDrop.for_model(lm, MacDropConfig(layer=0, rows=[1, 999]))
    assert MacDrop.for_model(lm, MacDropConfig(layer=0, rows=[1, 2])).rows == [1, 2]


def test_planted_massive_weight_is_detected():
    lm = build("llama")
    plant_massive_weight(lm, layer=0, neuron=5)
    layer, rows, expert = detect_massive_rows(lm, k=3)
    assert (layer, rows[0], expert) == (0, 5, None)


# ---- inside transformers.Trainer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "records.jsonl"
    words = ["red", "green", "blue", "cyan", "gold", "pink", "gray", "teal"]
    records = [{"instruction": f"Name colour {i}.", "input": "" if i % 2 else "now",
                "output": f"{words[i % 8]} {words[(i + 3) % 8]}"} for i in range(48)]
    path.write_text("\n".join(json.dumps(r) for r in records))
    return str(path)


def tiny_config(data_file, **overrides) -> FinetuneConfig:
    # the Alpaca prompt is ~150 characters for the character-level tokenizer
    settings = dict(data=data_file, batch_size=4, grad_accum=2, max_steps=6, max_length=200, lr=1e-2,
                    save_steps=2, logging_steps=1, rank=4, lora_alpha=8)
    return FinetuneConfig(**{**settings, **overrides})


def macdrop_of(result) -> MacDrop:
    return next(c for c in result.trainer.callback_handler.callbacks if isinstance(c, MacDrop))


class Probe(TrainerCallback):
    """Inside each step (just before the optimizer): are the rows masked? After it: are they back?"""

    def __init__(self, tensors, rows, raise_at: int | None = None, error=RuntimeError):
        self.tensors, self.rows, self.raise_at, self.error = tensors, rows, raise_at, error
        self.original = [t.detach().clone() for t in tensors]
        self.masked_in_step, self.restored_after_step = [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.masked_in_step.append(any((t[self.rows] == 0).any().item() for t in self.tensors))
        if state.global_step == self.raise_at:
            raise self.error("stopped inside a step")

    def on_step_end(self, args, state, control, **kwargs):  # runs after MacDrop's on_step_end
        self.restored_after_step.append(all(torch.equal(t, o) for t, o in zip(self.tensors, self.original)))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_training_masks_each_step_and_leaves_base_weights_unchanged(tmp_path, data_file, method):
    lm = build("llama")
    base = list(lm.model.parameters())  # PEFT keeps these tensors as its frozen base layers
    digest = weights_digest(base)
    probe = Probe(rows_of(lm), ROWS)
    result = finetune(lm, tiny_config(data_file, method=method), MacDropConfig(layer=LAYER, rows=ROWS, p0=0.9),
                      out=tmp_path, progress=False, callbacks=[probe])
    assert result.steps == 6
    assert probe.masked_in_step == [True] * 6 and probe.restored_after_step == [True] * 6
    assert weights_digest(base) == digest
    assert result.val_loss < result.val_loss_before  # the adapter learns
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] == (method == "dora") and config["peft_type"] == "LORA"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    saved = json.loads((tmp_path / "finetune.json").read_text())
    assert saved["results"]["macdrop"]["masked_rows"] == ROWS and saved["settings"]["config"]["method"] == method
    # the step schedule as applied, step by step
    expected = {t: 0.9 * (1 - t / 6) for t in range(6)}
    assert macdrop_of(result).rates == pytest.approx(expected)


def test_interrupted_run_restores_rows_and_resumes(tmp_path, data_file):
    lm = build("llama")
    base = list(lm.model.parameters())
    digest = weights_digest(base)
    probe = Probe(rows_of(lm), ROWS, raise_at=3, error=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        finetune(lm, tiny_config(data_file), MacDropConfig(layer=LAYER, rows=ROWS), out=tmp_path,
                 progress=False, callbacks=[probe])
    assert probe.masked_in_step[-1]  # it stopped while the rows were masked ...
    assert weights_digest(base) == digest  # ... and they are back
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").exists()

    fresh = build("llama")  # a new process would load the base model again
    result = finetune(fresh, tiny_config(data_file), MacDropConfig(layer=LAYER, rows=ROWS), out=tmp_path,
                      progress=False, resume=True)
    assert result.steps == 6
    rates = macdrop_of(result).rates
    assert sorted(rates) == [2, 3, 4, 5]  # resumed after step 2, same schedule
    assert rates[2] == pytest.approx(0.8 * (1 - 2 / 6))


def test_resume_without_checkpoint_is_refused(tmp_path, data_file):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        finetune(build("llama"), tiny_config(data_file), out=tmp_path, resume=True, progress=False)


def test_compare_command_end_to_end_and_resumable(tmp_path, data_file):
    from typer.testing import CliRunner

    from cardhouse.cli import app

    folder = tmp_path / "model"
    lm = build("llama")
    lm.model.config.max_position_embeddings = 256  # --max-length 200 must fit (RoPE: no position table)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    out = tmp_path / "compare"
    args = ["finetune-compare", "--model", str(folder), "--data", data_file, "--methods", "lora",
            "--schedules", "step,epoch-after", "--layer", str(LAYER), "--rows", ",".join(map(str, ROWS)),
            "--max-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--max-length", "200", "--lr", "1e-2",
            "--max-tokens", "0", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "compare.json").read_text())
    runs = [row["run"] for row in saved["results"]]
    assert runs == ["lora", "lora+macdrop-step", "lora+macdrop-epoch-after"]
    for row in saved["results"]:
        assert row["steps"] == 2 and row["attacked_rows"] == ROWS
        assert all(math.isfinite(row[key]) for key in ("val_loss", "val_loss_attacked", "val_loss_attacked_merged"))
    assert (out / "compare.png").stat().st_size > 0
    assert (out / "lora+macdrop-step" / "adapter" / "adapter_config.json").exists()
    # a second run reads the finished runs back instead of training again
    stamp = (out / "lora" / "result.json").stat().st_mtime_ns
    assert CliRunner().invoke(app, args).exit_code == 0
    assert (out / "lora" / "result.json").stat().st_mtime_ns == stamp
