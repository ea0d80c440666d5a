"""A short LoRA + MacDrop fine-tuning run of the real SmolLM2-135M on the bundled Alpaca records.

CPU-sized: 10 steps of 2 examples of at most 64 tokens, lr 1e-3, 100 records (5 held out, 4 fit
in 64 tokens). Measured on the shared 2-core CPU (one thread): 30 s idle, 70 s under load 6;
validation loss 1.452 -> 1.29; top-3 zeroing of the massive rows then raises it to 2.25 (the same
whether the base rows or the rows of the merged weights are zeroed).
The margins below (a drop of 0.03, a rise of 0.3) are far from those numbers.
"""

import pytest
import torch

from cardhouse import load_model
from cardhouse.finetuning import FinetuneConfig, MacDrop, MacDropConfig, finetune, robustness
from cardhouse.interventions import weights_digest

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("finetune")
    lm = load_model("smollm2-135m")  # its own copy: PEFT wraps the model in place
    base = list(lm.model.parameters())
    digest = weights_digest(base)
    config = FinetuneConfig(batch_size=2, grad_accum=1, max_steps=10, max_length=64, limit=100, lr=1e-3,
                            save_steps=100, logging_steps=5)
    result = finetune(lm, config, MacDropConfig(), out=out, progress=False)
    macdrop = next(c for c in result.trainer.callback_handler.callbacks if isinstance(c, MacDrop))
    table = robustness(lm, result.trainer, macdrop.layer, macdrop.massive)
    print(f"validation loss {result.val_loss_before:.4f} -> {result.val_loss:.4f}; attacked "
          f"{table[1]['val_loss']:.4f}, merged {table[2]['val_loss']:.4f}; {result.seconds:.0f} s of training")
    return {"result": result, "macdrop": macdrop, "table": table, "out": out,
            "base_unchanged": weights_digest(base) == digest}


def test_run_completes_and_validation_loss_drops(run):
    result = run["result"]
    assert result.steps == 10 and result.n_val >= 4
    assert result.val_loss < result.val_loss_before - 0.03, (result.val_loss_before, result.val_loss)
    assert (run["out"] / "adapter" / "adapter_model.safetensors").exists()


def test_macdrop_dropped_the_massive_rows_with_the_step_schedule(run):
    macdrop = run["macdrop"]
    assert macdrop.layer == 11 and macdrop.massive[:2] == [1229, 1487]
    assert macdrop.rates[0] == pytest.approx(0.8) and macdrop.rates[9] == pytest.approx(0.8 / 10)


def test_base_weights_unchanged(run):
    assert run["base_unchanged"]


def test_top3_zeroing_hurts_the_finetuned_model(run):
    original, attacked, merged = (row["val_loss"] for row in run["table"])
    assert attacked > original + 0.3, (original, attacked)
    # LoRA's B A adds little to the massive rows: zeroing them in the merged weights is the same attack
    assert abs(merged - attacked) < 0.05, (attacked, merged)


def test_the_macdrop_adapter_goes_through_generate_and_longctx(run, tmp_path):
    """The real adapter of this run through ``cardhouse generate`` and ``cardhouse longctx --adapter`` (issue 16):
    both outputs validate, the adapter has its pair of rows, and the fine-tuned model assigns the held-out Alpaca
    references a higher log-likelihood than the original (it was trained on Alpaca; measured below)."""
    import json

    from typer.testing import CliRunner

    from cardhouse.cli import app
    from cardhouse.results import validate

    adapter = run["out"] / "adapter"
    label = f"adapter {run['out'].name}"
    result = CliRunner().invoke(app, ["generate", "--n", "2", "--max-new-tokens", "4", "--k", "5",
                                      "--adapter", str(adapter), "-o", str(tmp_path / "gen")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "gen" / "generation.json").read_text())
    validate(data, "generation")
    rows = {row["variant"]: row for row in data["results"]}
    assert list(rows) == ["original", "topk-zero k=5", "random-zero k=5", f"{label}: original",
                          f"{label}: topk-zero k=5"]
    print({variant: round(row["ref_loglik_per_token"], 4) for variant, row in rows.items()})
    assert rows[f"{label}: original"]["ref_loglik_per_token"] > rows["original"]["ref_loglik_per_token"] + 0.02
    assert rows["topk-zero k=5"]["ref_loglik_per_token"] < rows["original"]["ref_loglik_per_token"] - 0.3

    result = CliRunner().invoke(app, ["longctx", "--kind", "passkey", "--lengths", "128", "--depths", "1", "--n", "1",
                                      "--k", "5", "--adapter", str(adapter), "-o", str(tmp_path / "long")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "long" / "longctx.json").read_text())
    validate(data, "longctx")
    assert [row["variant"] for row in data["results"]][3:] == [f"{label}: original", f"{label}: topk-zero k=5"]
    assert data["settings"]["adapters"] == [str(adapter)]
