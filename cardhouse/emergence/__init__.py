"""Emergence: train small decoders from scratch, with and without an explicit attention bias (Sun et al. Sec. 5)."""

from .config import CONFIGS, VARIANTS, TrainConfig, config_with
from .measure import scan_model
from .model import GPT, GPTConfig
from .tokens import TokenData, load_data, smollm2_tokenizer, split_tokens
from .train import load_checkpoint, run, train_variant

__all__ = ["CONFIGS", "GPT", "GPTConfig", "TokenData", "TrainConfig", "VARIANTS", "config_with", "load_checkpoint",
           "load_data", "run", "scan_model", "smollm2_tokenizer", "split_tokens", "train_variant"]
