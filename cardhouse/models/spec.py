"""What a model is, read from its config alone: no weights are loaded.

``probe(source)`` reads ``config.json`` (a folder, a cached hub id, the dequantized cache of a
GGUF file) or the GGUF header, refuses what cardhouse cannot use (a path that does not exist,
a folder without ``config.json``, a family missing from the adapter table) with one clear
message, and returns a ``ModelSpec``: the sizes every option is checked against (layers, FFN
size, heads, maximum positions). The sizes come from the same adapter table as for a loaded
model, applied to the model built on the ``meta`` device (shapes without storage), so a check
on the spec and a check on the loaded model cannot disagree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import torch

from .adapters import ADAPTERS, Blocks, adapter_for
from .gguf_files import GGUFHeader, UnsupportedGGUFType, check_gguf_types, read_gguf_header
from .offload import shapes_only
from .sources import BUNDLED, ModelLoadError, check_gguf, gguf_cache_folder


@dataclass(frozen=True, eq=False)
class ModelSpec:
    source: str  # as the user gave it
    kind: str  # bundled, gguf, folder, hub, memory
    config: object = field(repr=False)  # the transformers PretrainedConfig
    path: Path | None = None  # the GGUF file or folder that holds it
    header: GGUFHeader | None = field(default=None, repr=False)  # a GGUF's header as read here (not from its
    # cache): loading it reads it no more

    @property
    def family(self) -> str:
        return self.config.model_type

    @cached_property
    def blocks(self) -> Blocks:
        """The adapted model with shapes but no storage (``meta_model``)."""
        return Blocks.of(meta_model(self.config))

    @property
    def layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    def d_mlp(self, layer: int | None = None) -> int:
        """FFN neurons of a layer (per expert for MoE); layer 0 when none is given."""
        with shapes_only():  # the meta model's tensors have shapes and nothing else
            return self.blocks.intermediate_size(layer if layer is not None and 0 <= layer < self.layers else 0)

    @property
    def heads(self) -> int:
        return self.blocks.heads[0]

    @property
    def max_positions(self) -> int | None:
        """The longest input the model takes (``max_position_embeddings``, GPT-2's ``n_positions``)."""
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(self.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def check_positions(self, length: int, flag: str = "--context") -> int:
        """A window of ``length`` positions must fit the model (the same message as ``cardhouse.validation``'s)."""
        limit = self.max_positions
        if limit is not None and not 2 <= length <= limit:
            raise ValueError(f"{flag} must be an integer in 2..{limit}, got {length} ({self.source} takes at most "
                             f"{limit} positions)")
        return length


def meta_model(config) -> torch.nn.Module:
    """The model of ``config`` with shapes but no storage (``meta`` device), built in a fraction of a second: a
    decoder with its LM head, an encoder (adapter ``inputs`` other than "causal") as its body, as they load."""
    from transformers import AutoModel, AutoModelForCausalLM

    adapter = ADAPTERS.get(config.model_type)
    auto = AutoModel if adapter is not None and adapter.inputs != "causal" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def checked_gguf(path: Path) -> tuple[object, GGUFHeader | None]:
    """The config of a GGUF file (single or split) and its header: the config from its dequantized cache
    when there is one (no header then), else from its header, after checking that every part is there and
    every tensor type can be dequantized."""
    from transformers import AutoConfig

    parts = check_gguf(path)
    cached = gguf_cache_folder(path)
    if (cached / "COMPLETE").exists() and (cached / "config.json").is_file():
        try:
            return AutoConfig.from_pretrained(cached), None
        except Exception:  # noqa: BLE001  the cache is checked and rebuilt when the weights load
            pass
    try:
        check_gguf_types(parts)
        header = read_gguf_header(path)
    except UnsupportedGGUFType as err:
        raise ModelLoadError(str(err)) from None
    except Exception as err:  # noqa: BLE001  a truncated header fails inside the parser (struct.error, ...)
        raise ModelLoadError(f"could not read the header of the GGUF file {path} (corrupt, truncated, or an "
                             f"architecture transformers cannot load?): {_first_line(err)}") from err
    return header.config, header


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _looks_like_path(source: str) -> bool:
    """A hub id is ``owner/name``; anything else with a separator, or a ``.gguf`` name, is a local path."""
    return (source.startswith(("/", ".", "~")) or source.endswith((".gguf", "/", os.sep)) or source.count("/") > 1
            or os.sep != "/" and os.sep in source)


def _folder_config(folder: Path):
    from transformers import AutoConfig

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"the model folder {folder} has no config.json: a Hugging Face model folder holds "
                             "config.json, the weights (*.safetensors) and the tokenizer files")
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{config_file} is not valid JSON: {err}") from err
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001  e.g. a model_type transformers does not know
        raise ModelLoadError(f"transformers cannot read {config_file}: {_first_line(err)}") from err


def probe(source: str) -> ModelSpec:
    """The spec of a bundled name, a GGUF file, a local Hugging Face folder or a hub id (from the local
    cache when offline), from its config alone; refuses an unusable model with one clear message."""
    if source in BUNDLED and BUNDLED[source].locate_folder is not None:  # encoders ship transformers folders
        path = BUNDLED[source].locate_folder()
        spec = ModelSpec(source, "bundled", _folder_config(path), path)
    elif source in BUNDLED:
        path = BUNDLED[source].locate_gguf()
        config, header = checked_gguf(path)
        spec = ModelSpec(source, "bundled", config, path, header)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            spec = ModelSpec(source, "folder", _folder_config(path), path)
        elif path.is_file():
            config, header = checked_gguf(path)
            spec = ModelSpec(source, "gguf", config, path, header)
        elif _looks_like_path(source):
            raise ModelLoadError(f"model path not found: {source} (give a bundled name: {', '.join(BUNDLED)}; "
                                 "a local Hugging Face folder; a GGUF file; or a hub id)")
        else:
            spec = ModelSpec(source, "hub", _hub_config(source))
    check_family(spec.config)
    return spec


def _hub_config(source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(
            f"{source!r} is not a bundled model ({', '.join(BUNDLED)}), a local folder, a GGUF file or a hub id "
            f"available here (offline, only hub models already in the Hugging Face cache are; "
            f"{_first_line(err)})") from err


def check_family(config) -> None:
    """Refuse, from the config, a family the adapter table does not describe (before any weight loads)."""
    adapter_for(SimpleNamespace(config=config))  # the table's own check, on the config alone


def spec_of(lm) -> ModelSpec:
    """The spec of an already loaded model (its own config; the checks are the same)."""
    spec = ModelSpec(lm.name, "memory", lm.model.config)
    spec.__dict__["blocks"] = lm.blocks  # the real model's shapes, no meta copy needed
    return spec
