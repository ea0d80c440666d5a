"""Export an edited model as a standard Hugging Face folder that ``transformers`` loads without cardhouse.

Every cardhouse weight edit is a context manager; ``export_model`` is called inside it and writes the
weights as they are at that moment (safetensors, config, tokenizer), with ``cardhouse-edit.json`` beside
them (the result envelope) saying what was changed. On leaving the edit the loaded model is restored, so
one process can export several variants.

What cannot be written as weights is refused rather than approximated: an edit that acts through hooks
on activations (e.g. Sun et al.'s set-to-mean on the carrier token only) has no exact weight form.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .models.digest import weights_digest
from .models.loading import LoadedModel
from .results import write_result

EDIT_FILE = "cardhouse-edit.json"
# files an export writes; --force replaces exactly these (old shards included), nothing else in the folder
_OWN_PATTERNS = ("model*.safetensors", "model*.safetensors.index.json", "config.json", "generation_config.json",
                 EDIT_FILE, "*.gguf")


class ExportError(ValueError):
    """The edit cannot be written as weights (or the folder is not ours to write into)."""


def check_export_folder(folder: Path, force: bool) -> Path:
    """Refuse an existing non-empty folder unless ``force``; refuse a path that is a file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise ExportError(f"the export folder {folder} is not empty; choose another or pass --force to overwrite "
                          "the files an export writes")
    return folder


def activation_hooks(model: nn.Module) -> list[str]:
    """Modules that run a forward hook: an edit that works through these changes activations, not weights."""
    return [name or "(model)" for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def state_digests(model: nn.Module) -> dict[str, str]:
    """sha256 of every tensor in the state dict, by name (tied tensors under each name)."""
    return {name: weights_digest([t]) for name, t in sorted(model.state_dict().items())}


def export_model(lm: LoadedModel, folder: Path, *, edit: dict | list, force: bool = False,
                 gguf: bool = False) -> dict:
    """Write ``lm.model`` as it is now as a Hugging Face folder with ``cardhouse-edit.json``; returns that record."""
    folder = check_export_folder(Path(folder), force)
    hooked = activation_hooks(lm.model)
    if hooked:
        raise ExportError(f"the model runs with activation hooks on {len(hooked)} modules ({', '.join(hooked[:3])}"
                          f"{', ...' if len(hooked) > 3 else ''}): an edit of activations (e.g. on a single token) "
                          "has no exact form as weights; refusing to write an approximation")
    if not hasattr(lm.model, "save_pretrained"):
        raise ExportError(f"{type(lm.model).__name__} is not a transformers model: it has no Hugging Face folder format")
    folder.mkdir(parents=True, exist_ok=True)
    for pattern in _OWN_PATTERNS:  # --force: stale shards of an earlier export would be loaded too
        for old in folder.glob(pattern):
            old.unlink()
    lm.model.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:  # a GGUF-loaded model: the weights are dequantized now
        config_path.write_text(json.dumps(config, indent=2))
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(folder)
    files = sorted(p.name for p in folder.iterdir())
    if gguf:
        files.append(write_gguf(lm, folder / "model.gguf").name)
    record = {"edit": edit, "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
              "files": files, "state_digests": state_digests(lm.model)}
    write_result(folder / EDIT_FILE, record, model=lm.describe(), settings={"force": force, "gguf": gguf})
    return record


def export_variants(lm: LoadedModel, variants: Iterable, folder: Path, *, force: bool = False,
                    gguf: bool = False, extra: list[dict] | None = None, records: dict[str, dict] | None = None
                    ) -> dict:
    """Apply ``variants`` (anything with ``name``, ``description`` and ``apply()``), nested in order, and export.
    ``extra``: edits made before (an adapter merge); ``records``: more fields for a variant's entry, by name."""
    variants = list(variants)
    with ExitStack() as stack:
        for variant in variants:
            stack.enter_context(variant.apply())
        edits = list(extra or []) + [{"kind": "variant", "name": v.name, "description": v.description,
                                      **(records or {}).get(v.name, {})} for v in variants]
        return export_model(lm, folder, edit=edits, force=force, gguf=gguf)


def write_gguf(lm: LoadedModel, path: Path) -> Path:
    """The tensors as a GGUF file (float32, Hugging Face tensor names, the config as metadata).

    Written with the ``gguf`` package's writer. llama.cpp expects its own tensor names and tokenizer
    metadata (its ``convert_hf_to_gguf.py`` does that conversion from the exported folder); this file
    is a faithful container of the edited tensors, not a llama.cpp-ready model.
    """
    import gguf as gguf_lib

    writer = gguf_lib.GGUFWriter(str(path), arch=lm.family)
    writer.add_string("cardhouse.note", "edited tensors under Hugging Face names; see cardhouse-edit.json")
    writer.add_string("cardhouse.config", lm.model.config.to_json_string())
    for name, tensor in sorted(lm.model.state_dict().items()):
        writer.add_tensor(name, tensor.detach().to(torch.float32).contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
