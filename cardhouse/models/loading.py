"""Loading real models offline: bundled names, local folders, GGUF files, hub ids.

The config is read and checked first (``models.spec``), so a bad path or an unsupported family fails
before any weight loads; where the files are (the bundled models, a GGUF's dequantized cache) is
``models.sources``.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import ADAPTERS, Blocks, adapter_for
from .gguf_files import GGUFHeader, gguf_tokenizer, read_gguf_header
from .integrity import broken
from .memory import check_budget
from .placement import Placement, input_device, model_dtype
from .sources import BUNDLED, DEFAULT_MODEL, ModelLoadError, check_gguf, gguf_cache_folder, save_cache
from .spec import ModelSpec, probe
from .streaming import stream_skeleton

@dataclass
class LoadedModel:
    """A model with its tokenizer and the facts the analyses need."""

    model: nn.Module
    tokenizer: object
    name: str
    source: str
    bos: bool = True  # put the tokenizer's BOS token first
    info: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.model.config.model_type

    @property
    def blocks(self) -> Blocks:
        return Blocks.of(self.model)

    @property
    def device(self) -> torch.device:
        """Where inputs go (the embedding's device; accelerate moves them on between its blocks)."""
        return input_device(self.model)

    @property
    def inputs(self) -> str:
        """What the model reads: "causal" (decoder tokens), "text" (encoder tokens) or "image" (pixels)."""
        return adapter_for(self.model).inputs

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id if self.bos else None

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, with the BOS token first when ``self.bos``.

        Tokenizers disagree on whether they add BOS themselves (SmolLM2's does not,
        Gemma's does), so special tokens are never added by the tokenizer and BOS is
        put first here, exactly once.
        """
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ([self.bos_id] if self.bos_id is not None else []) + list(ids)

    def describe(self) -> dict:
        n_params = sum(p.numel() for p in self.model.parameters())
        return {"name": self.name, "family": self.family, "source": self.source,
                "parameters": n_params, "dtype": str(model_dtype(self.model)).replace("torch.", ""), "device": str(self.device),
                "layers": len(self.blocks), "d_model": self.model.config.hidden_size,
                "bos_token": self.tokenizer.bos_token if self.bos else None, **self.info}


def _load_auto(path: str | Path, dtype: torch.dtype | None, placement: Placement | None = None, **kwargs):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if "gguf_file" not in kwargs:
        adapter = ADAPTERS.get(AutoConfig.from_pretrained(path, **kwargs).model_type)
        if adapter is not None and adapter.inputs != "causal":
            return _load_encoder(path, dtype, adapter.inputs, placement, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if placement is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    else:  # dtype "auto" needs the checkpoint's own dtype, which only its config knows
        config = AutoConfig.from_pretrained(path, **kwargs)
        own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        model = AutoModelForCausalLM.from_pretrained(path, **placement.from_pretrained_kwargs(own), **kwargs)
    return model.eval(), tokenizer


def _load_encoder(path: str | Path, dtype: torch.dtype | None, inputs: str, placement: Placement | None = None,
                  **kwargs):
    """An encoder body (no task head) with its tokenizer, or its image processor for image models."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    placed = placement.from_pretrained_kwargs() if placement is not None else {"dtype": dtype}
    model = AutoModel.from_pretrained(path, **placed, **kwargs)
    processor = AutoImageProcessor.from_pretrained(path, **kwargs) if inputs == "image" else \
        AutoTokenizer.from_pretrained(path, **kwargs)
    return model.eval(), processor


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32, use_cache: bool = True,
              placement: Placement | None = None, header: GGUFHeader | None = None):
    """Load a GGUF file, dequantized, through a safetensors cache (float32, then placed as asked).
    ``header``: the file's header as already read (``ModelSpec.header``), not read again."""
    path = Path(path)
    parts = check_gguf(path)
    folder = gguf_cache_folder(path)
    if use_cache and (folder / "COMPLETE").exists():
        try:
            why = broken(folder)
            if why is None:
                return _load_auto(folder, dtype, placement)
        except Exception as err:  # a damaged cache is ours to rebuild
            why = f"it is unreadable ({err})"
        warnings.warn(f"the cached copy in {folder} is not used: {why}; rebuilding it from {path.name}")
        shutil.rmtree(folder, ignore_errors=True)
    print(f"cardhouse: dequantizing {path.name} (once; later loads use the cache)", file=sys.stderr)
    if header is None:
        try:
            header = read_gguf_header(path)
        except Exception:  # noqa: BLE001  a header neither can read: transformers' loader says what is wrong with it
            header = GGUFHeader(None, transformers_builds=True)
    try:
        model, tokenizer = (_load_auto(path.parent, dtype, gguf_file=path.name) if header.transformers_builds
                            else _load_split_gguf(parts, header.config))
    except Exception as err:
        raise ModelLoadError(f"could not read the GGUF file {path} (corrupt or truncated?): {err}") from err
    if use_cache:
        save_cache(model, tokenizer, folder)
        if placement is not None and placement != Placement():
            return _load_auto(folder, dtype, placement)  # placed from the cache like every later load
    return model, tokenizer


def _load_split_gguf(parts: list[Path], config):
    """A GGUF that transformers does not build itself (a split file; a Mixtral, which llama.cpp writes as
    a llama with experts): its skeleton, every tensor dequantized into it, and the tokenizer of its first
    part (which holds the metadata). ``config``: its config (``read_gguf_header``)."""
    model = stream_skeleton(parts[0], torch.float32, config=config).materialize()
    return model.eval(), gguf_tokenizer(parts[0])


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype | str = torch.float32,
               bos: bool | None = None, use_cache: bool = True, device: str = "cpu",
               device_map: str | None = None, max_memory: str | dict | None = None,
               offload_folder: str | Path | None = None, stream: bool = False) -> LoadedModel:
    """Load a bundled model name, a local Hugging Face folder, a GGUF file or a hub id.

    ``bos``: put the BOS token first (default: when the tokenizer has one).
    ``dtype``: float32, bfloat16, float16 or "auto" (the checkpoint's own on a GPU, float32 on a CPU);
    ``device``: cpu, cuda, cuda:N, mps or auto; ``device_map`` ("auto", ...), ``max_memory``
    ({0: "20GiB", "cpu": "60GiB"} or "0=20GiB,cpu=60GiB") and ``offload_folder`` place the weights
    through accelerate, across GPUs, the CPU and the disk (see ``models.placement``).
    ``stream``: keep only a meta-device skeleton and read one decoder block at a time from the
    checkpoint while the analyses run (``models.streaming``), for checkpoints larger than memory.
    """
    placement = Placement.of(dtype, device, device_map, max_memory, offload_folder, stream)  # bad requests fail first
    spec = probe(name_or_path)  # a bad path, a missing config.json or an unsupported family fails before any weight loads
    check_budget(spec, placement)  # --max-memory must hold one block
    if stream:
        return _load_streamed(spec, placement, bos)
    dtype = placement.torch_dtype()
    if spec.kind == "hub":
        try:
            model, tokenizer = _load_auto(name_or_path, dtype, placement)
        except Exception as err:
            raise ModelLoadError(
                f"{name_or_path!r} is not a bundled model ({', '.join(BUNDLED)}), a local folder, a GGUF file "
                f"or a reachable hub id ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    elif spec.path.is_file():  # a GGUF file, bundled or not: dequantized through the cache
        model, tokenizer = load_gguf(spec.path, dtype=dtype, use_cache=use_cache, placement=placement,
                                     header=spec.header)
    else:  # a transformers folder (the bundled encoders ship one)
        try:
            model, tokenizer = _load_auto(spec.path, dtype, placement)
        except Exception as err:
            raise ModelLoadError(f"could not load the model folder {name_or_path}: {err}") from err
    source = f"bundled: {BUNDLED[name_or_path].description}" if spec.kind == "bundled" else f"{spec.kind}: {name_or_path}"
    adapter_for(model)  # fail early, naming the family, when it is not supported
    lm = from_pretrained_objects(model, tokenizer, name=name_or_path, source=source, bos=bos)
    lm.info["placement"] = placement.to_dict()
    return lm


def _load_streamed(spec: ModelSpec, placement: Placement, bos: bool | None) -> LoadedModel:
    """A streamed model: the skeleton of a safetensors checkpoint folder or of a GGUF file (single or
    split; a bundled model's GGUF too), whose blocks are read one at a time."""
    from transformers import AutoTokenizer

    if placement.device_map is not None:
        raise ValueError("--stream reads one block at a time itself: it does not combine with --device-map")
    gguf = spec.path if spec.path is not None and spec.path.is_file() else None
    config = tokenizer_folder = None
    if gguf is not None:  # its tensors are dequantized one block at a time, never the whole file
        folder, config = gguf, spec.config  # checked by the probe (parts, tensor types), not read again
        cached = gguf_cache_folder(gguf)
        tokenizer_folder = cached if (cached / "COMPLETE").exists() else None  # saves parsing the vocabulary
    elif spec.kind != "hub":
        folder = spec.path
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(spec.source, local_files_only=True))
        except Exception as err:
            raise ModelLoadError(f"{spec.source!r} is not a bundled model, a folder, a GGUF file or a hub id in the "
                                 f"local Hugging Face cache (--stream reads files, it downloads nothing): {err}") from err
    try:
        streamer = stream_skeleton(folder, placement.torch_dtype(), placement.resolved_device(), config=config)
    except (FileNotFoundError, KeyError, OSError, ValueError) as err:
        raise ModelLoadError(f"cannot stream {folder}: {err}") from err
    if gguf is not None and tokenizer_folder is None:
        tokenizer = gguf_tokenizer(gguf)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder or folder)
    adapter_for(streamer.model)
    lm = from_pretrained_objects(streamer.model, tokenizer, name=spec.source, source=f"streamed: {folder}", bos=bos)
    lm.info["placement"] = placement.to_dict() | {"stream": True}
    return lm


def default_bos(tokenizer) -> bool:
    """Whether the model saw a BOS token first in training, as its tokenizer tells: it adds BOS when
    encoding (``add_bos_token``, or its post-processor: Gemma, Llama-3), or its chat template opens
    with the BOS token (SmolLM2's ``<|im_start|>``). A tokenizer without a BOS token (Qwen2.5) gets
    none, and so does one whose chat template shows a training format without BOS first; a
    tokenizer that says nothing either way keeps BOS first (massive activations form there)."""
    bos = getattr(tokenizer, "bos_token", None)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos_id is None:
        return False
    add = getattr(tokenizer, "add_bos_token", None)
    try:
        if add is True or tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos_id]:
            return True
    except Exception:  # a tokenizer that cannot encode a bare string here: ask the template
        pass
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
            return str(text).startswith(bos)
        except Exception:  # a template that needs more than one user message: no evidence either way
            pass
    return True


def from_pretrained_objects(model: nn.Module, tokenizer, *, name: str = "custom", source: str = "in memory",
                            bos: bool | None = None) -> LoadedModel:
    """Wrap an already loaded model and tokenizer (e.g. a tiny random model in a test)."""
    has_bos = getattr(tokenizer, "bos_token_id", None) is not None
    if bos is None:
        bos = default_bos(tokenizer) if tokenizer is not None else False
    if bos and not has_bos:
        warnings.warn(f"the tokenizer of {name} has no BOS token: position 0 holds the prompt's first token")
        bos = False
    model.eval()
    return LoadedModel(model, tokenizer, name, source, bos)


def available_models() -> list[str]:
    return list(BUNDLED)


__all__ = ["ADAPTERS", "BUNDLED", "DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "available_models",
           "from_pretrained_objects", "load_gguf", "load_model"]
