"""Checkpoint tensors under the model's own names, converted as transformers converts them while loading.

transformers (5.x) loads some families from a checkpoint layout that differs from its modules: a
Mixtral checkpoint keeps ``block_sparse_moe.experts.{e}.w1/w2/w3`` per expert, the model one fused
``mlp.experts.gate_up_proj`` / ``down_proj`` per layer (Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek the
same). Its loader applies the model's conversion mapping (``get_model_conversion_mapping``:
``WeightRenaming`` and ``WeightConverter`` with ops such as ``MergeModulelist``, ``Concatenate``);
``ConvertedReader`` applies that same mapping to one parameter at a time, so a streamed block is
converted as it is read and an ordinary load and a streamed one see the same tensors.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn


class ConvertedReader:
    """``reader`` (tensors by checkpoint name) seen through ``model``'s conversion mapping."""

    def __init__(self, reader, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.reader, self.model = reader, model
        self.folder = reader.folder
        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self._converters = {p: c for c in converters for p in c.source_patterns}
        meta = model.state_dict()
        # model name -> (the converter's source pattern or None, [(checkpoint name, pattern)]), as the loader groups them
        self.sources: dict[str, tuple[str | None, list[tuple[str, str]]]] = {}
        for key in sorted(reader.names(), key=dot_natural_key):  # experts in order 0, 1, ..., 10
            target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            if target not in meta and key in meta:  # the loader's own fallback: the key as it is
                target, pattern = key, None
            if target not in meta:
                continue
            first, keys = self.sources.setdefault(target, (pattern, []))
            keys.append((key, pattern or key))
        self._extra: dict[str, torch.Tensor] = {}  # a converter's other outputs (one source, several targets)

    def __contains__(self, name: str) -> bool:
        return name in self.sources or name in self._extra

    def names(self) -> list[str]:
        return list(self.sources)

    def tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Parameter ``name``; ``out``: a tensor of its shape to fill and return (``CheckpointReader.tensor``)."""
        if name not in self._extra and self.sources[name][0] is None:  # a plain (possibly renamed) tensor
            return self.reader.tensor(self.sources[name][1][0][0], out=out)
        value = self._converted(name)
        return value if out is None else out.copy_(value)

    def _converted(self, name: str) -> torch.Tensor:
        if name in self._extra:
            return self._extra.pop(name)
        pattern, keys = self.sources[name]
        converter = deepcopy(self._converters[pattern])
        for key, source_pattern in keys:
            converter.add_tensor(name, key, source_pattern, lambda key=key: self.reader.tensor(key))
        out = converter.convert(name, model=self.model, config=self.model.config)
        value = out.pop(name)
        self._extra.update({k: v[0] if isinstance(v, list) else v for k, v in out.items()})
        return value[0] if isinstance(value, list) else value

    def close(self) -> None:
        self._extra.clear()
        self.reader.close()

    def fingerprint(self) -> str:
        return self.reader.fingerprint()


def converted(reader, model: nn.Module):
    """``reader`` as ``ConvertedReader`` when transformers converts this model's checkpoints, else itself."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return ConvertedReader(reader, model) if get_model_conversion_mapping(model) else reader


__all__ = ["ConvertedReader", "converted"]
