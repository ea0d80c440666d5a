"""Float16 on the real bundled models: Gemma-3-270M overflows and the rescale fixes it; SmolLM2-135M fits.

Measured (4 built-in prompts, 255 Wikipedia tokens): Gemma-3's residual stream reaches ~104,000 on the
BOS token (float16 margin -0.67 doublings); run in float16 the first inf appears leaving layer 7; the
rescale divides the stream by 2^3, float32 logits move by 1e-6 to 2.4e-6 of their largest value (the
thread count sets the reduction order), and float16 perplexity matches float32 within 0.1%. SmolLM2's
largest activation, ~24,900, fits float16 with ~1.4 doublings to spare.
"""

from __future__ import annotations

import pytest

from cardhouse import load_model
from cardhouse.analysis import load_prompts
from cardhouse.capture import tokenize_prompts
from cardhouse.precision.check import PrecisionSettings, check_precision

pytestmark = pytest.mark.real


def test_gemma3_overflows_float16_and_the_rescale_fixes_it():
    lm = load_model("gemma3-270m")
    toks = tokenize_prompts(lm, load_prompts(limit=4))
    result = check_precision(lm, toks, PrecisionSettings(rescale=True, margin=2, max_tokens=255, context=256),
                             progress=False)
    worst = result["headroom"]["worst"]
    assert worst["max_abs"] > 90_000 and worst["margins"]["float16"] < -0.4 and worst["position"] == 0
    run = result["run"]
    assert not run["finite"] and run["unsupported"] is None and run["first_kind"] in ("inf", "nan")
    assert 5 <= run["first_layer"] <= 9  # measured: the stream leaving layer 7
    rs = result["rescale"]
    assert rs["plan"]["power"] == 3 and not rs["unfixed"]
    assert rs["logits_change_float32"]["relative"] < 1e-4 and rs["logits_change_float32"]["same_top1"] == 1.0
    after = rs["after"]
    assert after["run"]["finite"], after["run"]
    assert after["headroom"]["worst"]["margins"]["float16"] >= 2.0
    (ppl,) = after["perplexity"]
    assert ppl["tokens"] == 255 and abs(ppl["ratio"] - 1) < 0.01, ppl


def test_smollm2_fits_float16_the_contrast():
    lm = load_model("smollm2-135m")
    toks = tokenize_prompts(lm, load_prompts(limit=8))
    result = check_precision(lm, toks, PrecisionSettings(), progress=False)
    assert result["run"]["finite"] and result["run"]["first_module"] is None
    worst = result["headroom"]["worst"]
    assert 20_000 < worst["max_abs"] < 30_000 and worst["position"] == 0
    assert 1.0 < worst["margins"]["float16"] < 2.0  # fits, with ~1.4 doublings to spare
    assert worst["margins"]["fp8_e4m3"] < -5  # not FP8 without scaling
    assert not result["headroom"]["overflow"]["float16"]


RUN_FLOAT16 = """
import sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16).eval()
with torch.inference_mode():
    logits = model(**torch.load(sys.argv[2])).logits
torch.save(logits, sys.argv[3])
assert "cardhouse" not in sys.modules
"""


def test_the_exported_rescaled_gemma3_runs_in_float16_with_transformers_alone(tmp_path):
    """The deployment path: `cardhouse export --rescale` writes Gemma-3-270M divided by 2^3; plain `transformers`
    loads that folder in float16 in a fresh process and computes finite logits with the float32 model's top-1,
    where the unrescaled model overflows."""
    import os
    import subprocess
    import sys

    import torch
    from typer.testing import CliRunner

    from cardhouse.capture.batches import batches
    from cardhouse.cli import app
    from cardhouse.precision import first_nonfinite

    result = CliRunner().invoke(app, ["export", str(tmp_path / "fp16"), "-m", "gemma3-270m", "--rescale",
                                      "--power", "3"])
    assert result.exit_code == 0, result.output
    lm = load_model("gemma3-270m")
    toks = tokenize_prompts(lm, load_prompts(limit=4))
    assert not first_nonfinite(lm, toks).finite  # the original overflows float16
    (batch,) = batches(toks, 4)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.inference_mode():
        expected = lm.model(**inputs, use_cache=False).logits
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", RUN_FLOAT16, str(tmp_path / "fp16"), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, env=env, cwd="/", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt").float()
    real = batch.attention_mask.bool()
    assert torch.isfinite(got[real]).all()
    same = (got[real].argmax(-1) == expected[real].argmax(-1)).float().mean()
    assert same >= 0.95, float(same)  # float16 rounding may flip a near tie (measured: 56 of 57 tokens, 0.982)
    assert float((got[real] - expected[real]).abs().max()) < 0.5  # measured 0.11 (logits up to ~36)
