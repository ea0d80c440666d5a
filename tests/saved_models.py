"""Tiny random models saved as Hugging Face folders, for tests that run the command line (in-process or
as a subprocess) on a real folder in seconds: config.json, model.safetensors and the tokenizer files."""

from __future__ import annotations

from pathlib import Path


def save_tiny(folder: Path, family: str = "llama", seed: int = 0, plant: bool = True, positions: int | None = None
              ) -> Path:
    """``tests/conftest.py``'s tiny ``family`` model, with a massive activation planted on BOS
    (``plant``), saved to ``folder``."""
    from conftest import build, plant_bos_embedding, plant_massive_weight, save_folder

    lm = build(family, seed=seed)
    if plant:
        plant_bos_embedding(lm)
        plant_massive_weight(lm)
    if positions is not None:  # RoPE has no position table: only the config says how far the model reads
        lm.model.config.max_position_embeddings = positions
    return save_folder(lm, folder)
