"""Precision: float16/bfloat16/FP8 headroom, a function-preserving rescale, simulated quantization."""

from .headroom import FORMATS, Headroom, LowPrecisionRun, cast_copy, first_nonfinite, headroom, margin_bits
from .rescale import RescaleError, RescalePlan, choose_power, logits_change, plan_rescale, rescaled

__all__ = ["FORMATS", "Headroom", "LowPrecisionRun", "RescaleError", "RescalePlan", "cast_copy", "choose_power",
           "first_nonfinite", "headroom", "logits_change", "margin_bits", "plan_rescale", "rescaled"]
