"""Fine-tuning with LoRA / DoRA (PEFT + transformers.Trainer) and MacDrop (House of Cards, Algorithm 1)."""

from .data import DataError, load_records, parse_records, split_records, tokenize_records
from .macdrop import (SCHEDULES, SCOPES, MacDrop, MacDropConfig, NoMassiveWeightsError, detect_massive_rows,
                      drop_rate, scope_rows)
from .train import METHODS, FinetuneConfig, FinetuneResult, compare, finetune, robustness

__all__ = ["DataError", "load_records", "parse_records", "split_records", "tokenize_records",
           "SCHEDULES", "SCOPES", "MacDrop", "MacDropConfig", "NoMassiveWeightsError", "detect_massive_rows",
           "drop_rate", "scope_rows", "METHODS", "FinetuneConfig", "FinetuneResult", "compare", "finetune",
           "robustness"]
