"""GGUF checkpoints read one tensor at a time: single files and split ones (``name-00001-of-0000N.gguf``).

``gguf_parts`` finds every part of a split file (a missing one is named before anything loads);
``read_gguf_header`` gives transformers' config of the file (its first part holds the metadata) and whether
transformers' own loader builds it;
``check_gguf_types`` refuses a tensor stored in a type the ``gguf`` package cannot dequantize, from
the tensor tables alone. ``GGUFTensors`` hands out one tensor at a time under the model's own
(Hugging Face) names: the bytes of that tensor are read from its part and dequantized with
``gguf.quants.dequantize``, then transformers' own GGUF tensor processor undoes what llama.cpp's
converter did (the q/k row permutation of llama, Gemma's norm offset, fused experts), and the name
comes from transformers' GGUF name map (``get_gguf_hf_weights_map``): exactly what an ordinary
``from_pretrained(gguf_file=...)`` does, one tensor instead of the whole file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def gguf_parts(path: str | Path) -> list[Path]:
    """Every file of a GGUF checkpoint, first part first: ``[path]``, or all N parts of a split file
    (whichever part is given). A missing part raises ``FileNotFoundError`` naming it."""
    path = Path(path)
    match = _SPLIT.match(path.name)
    if match is None:
        return [path]
    count = int(match["count"])
    parts = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the split GGUF {parts[0].name} has {count} parts; missing from {path.parent}: "
                                f"{', '.join(missing)}")
    return parts


class TensorEntry(NamedTuple):
    name: str  # llama.cpp's name (blk.0.attn_q.weight)
    shape: tuple[int, ...]  # torch order
    ggml_type: int
    offset: int  # from the start of the file
    nbytes: int
    part: Path


def tensor_table(part: Path) -> list[TensorEntry]:
    """The tensor table of one GGUF file (names, shapes, types, where the bytes are), no tensor data read.

    transformers' header parser walks the vocabulary without building it (a 262k-token Gemma header in
    a fraction of a second, where ``gguf.GGUFReader`` takes tens of seconds); older transformers: the
    ``gguf`` package's reader."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        from transformers.integrations.gguf.reader import _mapped, _read_metadata, _read_tensor_table

        blob = _mapped(str(part))
        metadata, count, pos = _read_metadata(blob, str(part))
    except (ImportError, ValueError):  # older transformers; or a split file's later part (no architecture,
        from gguf import GGUFReader  # no vocabulary either: quick to read this way)

        reader = GGUFReader(part)
        return [TensorEntry(t.name, tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type),
                            int(t.data_offset), int(t.n_bytes), part) for t in reader.tensors]
    entries, pos = _read_tensor_table(blob, count, pos)
    alignment = metadata.get("general.alignment", 32)
    start = (pos + alignment - 1) // alignment * alignment
    table = []
    for name, shape, ggml_type, offset in entries:
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except ValueError:  # a type id this gguf package does not know at all
            block, size = 1, 0
        elements = int(np.prod(shape)) if shape else 1
        table.append(TensorEntry(name, tuple(shape), ggml_type, start + offset, elements // block * size, part))
    return table


def gguf_metadata(part: Path) -> dict:
    """The key-value metadata of a GGUF file (``general.architecture``, ``llama.expert_count``, ...), the
    vocabulary's string arrays skipped."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # transformers < 5.2x
        from gguf import GGUFReader

        fields = GGUFReader(part).fields
        return {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.")}
    return read_gguf_metadata(str(part))[0]


def gguf_architecture(part: Path) -> str:
    """llama.cpp's architecture name of a GGUF file (``general.architecture``: llama, qwen2, gemma3, ...)."""
    return str(gguf_metadata(part)["general.architecture"])


def type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"ggml type {ggml_type}"


def _can_dequantize(ggml_type: int) -> bool:
    """Whether ``gguf.quants.dequantize`` reads this type (asked of the package itself, on one zero block)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        qtype = GGMLQuantizationType(ggml_type)
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except (ValueError, NotImplementedError, KeyError):
        return False
    return True


class UnsupportedGGUFType(ValueError):
    """A tensor type the installed ``gguf`` package cannot dequantize."""


def check_gguf_types(parts: list[Path]) -> None:
    """A tensor the ``gguf`` package cannot dequantize fails here, naming it and its type, before any
    weight is read."""
    import gguf

    usable: dict[int, bool] = {}
    for part in parts:
        for entry in tensor_table(part):
            if not usable.setdefault(entry.ggml_type, _can_dequantize(entry.ggml_type)):
                raise UnsupportedGGUFType(f"the tensor {entry.name} in {part.name} is stored as {type_name(entry.ggml_type)}, "
                                 f"which the gguf package ({getattr(gguf, '__version__', 'installed')}) cannot "
                                 "dequantize")


# Mixture-of-Experts header fields transformers' GGUF config leaves out (llama.cpp key suffix -> config field):
# without them the expert widths are the config class's defaults, not the file's
_EXPERT_WIDTHS = {"qwen2_moe": {"expert_feed_forward_length": "moe_intermediate_size",
                                "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
                  "qwen3_moe": {"expert_feed_forward_length": "moe_intermediate_size"}}


def _completed(config, metadata: dict):
    """The config that ``metadata`` (the GGUF header) describes where transformers' reading of it falls short,
    or None where it does not: llama.cpp writes Mixtral as architecture ``llama`` with ``llama.expert_count``
    experts (transformers reads a dense llama: here a ``MixtralConfig`` with ``num_local_experts`` and
    ``num_experts_per_tok``), and Qwen-MoE expert widths (``_EXPERT_WIDTHS``)."""
    from transformers import MixtralConfig

    arch = metadata["general.architecture"]
    experts = int(metadata.get(f"{arch}.expert_count", 0) or 0)
    if config.model_type in ("llama", "mistral") and experts > 0:
        fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
        return MixtralConfig(**{**fields, "num_local_experts": experts,
                                "num_experts_per_tok": int(metadata[f"{arch}.expert_used_count"]),
                                "architectures": ["MixtralForCausalLM"]})
    widths = {field: int(metadata[f"{arch}.{key}"]) for key, field in _EXPERT_WIDTHS.get(config.model_type, {}).items()
              if f"{arch}.{key}" in metadata}
    if all(getattr(config, field, None) == value for field, value in widths.items()):
        return None
    for field, value in widths.items():
        setattr(config, field, value)
    return config


class GGUFHeader(NamedTuple):
    """What the loaders need from a GGUF checkpoint's header, read once (``read_gguf_header``)."""

    config: object  # transformers' config, completed where its reading falls short
    transformers_builds: bool  # whether from_pretrained(gguf_file=...) builds the model from the file as it is


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The config of a GGUF checkpoint (the first part's metadata), as transformers reads it and completed
    where it falls short (``_completed``: Mixtral, expert widths), and whether transformers' own loader builds
    it: a single file whose config transformers reads whole (otherwise cardhouse builds it from the config and
    ``GGUFTensors``). A split file's tied embeddings are decided from every part's tensors (transformers looks
    at the first part only, and ``output.weight`` may sit in another)."""
    from transformers import AutoConfig

    parts = gguf_parts(path)
    config = AutoConfig.from_pretrained(parts[0].parent, gguf_file=parts[0].name)
    completed = _completed(config, gguf_metadata(parts[0]))
    if len(parts) > 1 and config.model_type not in ("falcon", "bloom"):  # transformers' own exceptions
        names = {e.name for part in parts for e in tensor_table(part)}
        config.tie_word_embeddings = "output.weight" not in names
        if completed is not None:
            completed.tie_word_embeddings = config.tie_word_embeddings
    return GGUFHeader(completed or config, len(parts) == 1 and completed is None)


def gguf_config(path: str | Path):
    """The config of a GGUF checkpoint (``read_gguf_header``)."""
    return read_gguf_header(path).config


def gguf_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    first = gguf_parts(path)[0]
    return AutoTokenizer.from_pretrained(first.parent, gguf_file=first.name)


def _tensor_processor(architecture: str, model_type: str):
    """transformers' tensor processor for a GGUF architecture; for llama.cpp's Mixtral (architecture ``llama``
    with experts), which transformers does not have, llama's q/k row permutation undone and the 3-D
    ``ffn_{gate,up}_exps`` of a layer fused into ``mlp.experts.gate_up_proj`` as its Qwen2-MoE processor does."""
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, LlamaTensorProcessor,
                                                          Qwen2MoeTensorProcessor, TensorProcessor)

    if (architecture, model_type) != ("llama", "mixtral"):
        return TENSOR_PROCESSORS.get(architecture, TensorProcessor)

    class LlamaExpertsTensorProcessor(Qwen2MoeTensorProcessor):
        def process(self, weights, name, **kwargs):
            if ".attn_q." in name or ".attn_k." in name:
                return LlamaTensorProcessor(self.config).process(weights, name, **kwargs)
            return super().process(weights, name, **kwargs)

    return LlamaExpertsTensorProcessor


class GGUFTensors:
    """The tensors of a GGUF checkpoint (single or split) under ``model``'s parameter names, read and
    dequantized one at a time (nothing is memory-mapped: read pages would stay resident)."""

    chunk = 2**22  # values dequantized at once (see _raw)

    def __init__(self, path: str | Path, model: torch.nn.Module):
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        self.parts = gguf_parts(path)
        self.folder = self.parts[0]  # where, for messages
        check_gguf_types(self.parts)
        architecture = gguf_architecture(self.parts[0])
        self.processor = _tensor_processor(architecture, model.config.model_type)(config=model.config.to_dict())
        self.entries = {e.name: e for part in self.parts for e in tensor_table(part)}
        # gguf name -> model name, from llama.cpp's names for the file's own architecture (a Mixtral is "llama")
        self.key_map = get_gguf_hf_weights_map(model, self.processor, model_type=architecture)
        sources: dict[str, list[str]] = {}
        for gguf_name in self.entries:  # a fused expert tensor is keyed without ".weight" in the map
            hf = self.key_map.get(gguf_name) or self.key_map.get(gguf_name.removesuffix(".weight"))
            if hf is not None:
                sources.setdefault(hf, []).append(gguf_name)
        self.sources = sources

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def names(self) -> list[str]:
        return list(self.sources)

    def _raw(self, entry: TensorEntry) -> np.ndarray:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType(entry.ggml_type)
        data = np.fromfile(entry.part, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
        if data.size != entry.nbytes:
            raise ValueError(f"{entry.part.name} is truncated: the tensor {entry.name} needs {entry.nbytes} bytes "
                             f"at offset {entry.offset}")
        block, size = GGML_QUANT_SIZES[qtype]
        rows = data.reshape(-1, entry.shape[-1] // block * size)
        if qtype == GGMLQuantizationType.F32:
            return rows.view(np.float32).reshape(entry.shape)
        # row chunks of about 4M values: the package's numpy dequantization makes temporaries several
        # times the size of what it dequantizes, which for a 70B's 1B-value embedding would be gigabytes
        out = np.empty((rows.shape[0], entry.shape[-1]), dtype=np.float32)
        step = max(1, self.chunk // entry.shape[-1])
        for start in range(0, rows.shape[0], step):
            out[start:start + step] = dequantize(rows[start:start + step], qtype)
        return out.reshape(entry.shape)

    def tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One parameter, dequantized to float32 (the caller casts it); into ``out`` when given."""
        value = self._dequantized(name)
        return value if out is None else out.copy_(value)

    def _dequantized(self, name: str) -> torch.Tensor:
        parsed: dict = {"tensors": {}}  # where transformers' MoE processor puts a fused expert tensor
        out = None
        for gguf_name in self.sources[name]:
            result = self.processor.process(weights=self._raw(self.entries[gguf_name]), name=gguf_name,
                                            tensor_key_mapping=self.key_map, parsed_parameters=parsed)
            if result.name is not None:
                out = torch.from_numpy(np.ascontiguousarray(result.weights))
        if name in parsed["tensors"]:
            out = parsed["tensors"][name]
        return out

    def close(self) -> None:
        """Nothing is kept between tensors."""

    def fingerprint(self) -> str:
        """Names, sizes and modification times of every part (what a resumed run checks)."""
        import hashlib

        h = hashlib.sha256()
        for part in self.parts:
            stat = part.stat()
            h.update(f"{part.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return h.hexdigest()


__all__ = ["GGUFHeader", "GGUFTensors", "check_gguf_types", "gguf_config", "gguf_metadata", "gguf_parts",
           "gguf_tokenizer", "read_gguf_header", "tensor_table"]
