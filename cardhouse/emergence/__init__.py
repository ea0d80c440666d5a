"""Emergence: train small decoders from scratch, with and without an explicit attention bias (Sun et al. Sec. 5)."""

from .model import GPT, GPTConfig
from .train import (CONFIGS, VARIANTS, TokenData, TrainConfig, config_with, load_checkpoint, load_data, run,
                    scan_model, smollm2_tokenizer, split_tokens, train_variant)

__all__ = ["CONFIGS", "GPT", "GPTConfig", "TokenData", "TrainConfig", "VARIANTS", "config_with", "load_checkpoint",
           "load_data", "run", "scan_model", "smollm2_tokenizer", "split_tokens", "train_variant"]
