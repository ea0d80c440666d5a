"""Where a model runs and in which precision: dtype, device, accelerate device maps and offload.

One ``Placement`` holds what the user asked for (``--dtype``, ``--device``, ``--device-map``,
``--max-memory``, ``--offload-folder``). ``check()`` turns every impossible request into one
clear ``ValueError`` before a byte of the checkpoint is read; ``from_pretrained_kwargs`` is what
transformers (and, through it, accelerate: the engine, not ours) needs to place the weights.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "mps", "auto")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"20GiB"`` -> bytes (B, KB/KiB, MB/MiB, GB/GiB, TB/TiB; a bare number is bytes)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"cannot read the size {text!r}; write e.g. 20GiB, 512MiB or 60GB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


def parse_max_memory(text: str | dict | None) -> dict[int | str, int] | None:
    """``"0=20GiB,cpu=60GiB"`` -> ``{0: 21474836480, "cpu": 64424509440}`` (accelerate's ``max_memory``)."""
    if text is None or isinstance(text, dict):
        return text
    memory: dict[int | str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = part.partition("=")
        key = key.strip().lower()
        if not sep or not (key.isdigit() or key in ("cpu", "mps", "disk")):
            raise ValueError(f"--max-memory: cannot read {part!r}; write DEVICE=SIZE pairs such as "
                             "0=20GiB,1=20GiB,cpu=60GiB (a GPU index, cpu, mps or disk)")
        try:
            memory[int(key) if key.isdigit() else key] = parse_size(size)
        except ValueError as e:
            raise ValueError(f"--max-memory: {e}") from None
    if not memory:
        raise ValueError("--max-memory is empty; write e.g. 0=20GiB,cpu=60GiB")
    return memory


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


@dataclass(frozen=True)
class Placement:
    """What the user asked for. Defaults: float32 on the CPU (exact, runs everywhere)."""

    dtype: str = "float32"  # auto | float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N | mps | auto
    device_map: str | dict | None = None  # auto | balanced | sequential, or accelerate's {module: device}
    max_memory: dict | None = None  # accelerate's max_memory: {0: bytes, "cpu": bytes}
    offload_folder: str | None = None  # where accelerate keeps the weights it offloads to disk
    stream: bool = False  # --stream: one decoder block at a time (--max-memory then bounds that device)

    @classmethod
    def of(cls, dtype: str | torch.dtype = "float32", device: str = "cpu", device_map: str | dict | None = None,
           max_memory: str | dict | None = None, offload_folder: str | Path | None = None,
           stream: bool = False) -> "Placement":
        if isinstance(dtype, torch.dtype):
            names = {v: k for k, v in DTYPES.items()}
            if dtype not in names:
                raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
            dtype = names[dtype]
        placement = cls(str(dtype), str(device), device_map, parse_max_memory(max_memory),
                        str(offload_folder) if offload_folder else None, bool(stream))
        placement.check()
        return placement

    def check(self) -> None:
        """Every request the hardware cannot serve fails here, with the reason, before loading."""
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"unknown dtype {self.dtype!r}; use auto, {', '.join(DTYPES)}")
        base = self.device.split(":")[0]
        if base not in DEVICES or (":" in self.device and (base != "cuda" or not self.device[5:].isdigit())):
            raise ValueError(f"unknown device {self.device!r}; use cpu, cuda, cuda:N, mps or auto")
        if base == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available (this torch {torch.__version__} "
                             f"{'has no CUDA build' if torch.version.cuda is None else 'sees no GPU'}); "
                             "use --device cpu or auto")
        if base == "cuda" and ":" in self.device and int(self.device[5:]) >= cuda_count():
            raise ValueError(f"--device {self.device}: there are {cuda_count()} CUDA devices")
        if base == "mps" and not mps_available():
            raise ValueError("--device mps: the Apple MPS backend is not available here; use --device cpu or auto")
        if isinstance(self.device_map, str) and self.device_map not in DEVICE_MAPS:
            raise ValueError(f"unknown --device-map {self.device_map!r}; use {', '.join(DEVICE_MAPS)}")
        if self.device_map is None and (self.offload_folder or self.max_memory and not self.stream):
            raise ValueError("--max-memory and --offload-folder place the weights through accelerate: "
                             "add --device-map auto (--max-memory also bounds --stream)")
        for key in self.max_memory or {}:
            if isinstance(key, int) and key >= cuda_count():
                raise ValueError(f"--max-memory names GPU {key}, but {cuda_count()} CUDA devices are visible")
        device = self.resolved_device()
        if self.dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--dtype bfloat16: {torch.cuda.get_device_name()} cannot run bfloat16 "
                             "(compute capability < 8.0); use --dtype float16 or float32")

    def resolved_device(self) -> str:
        """``auto``: the first GPU, else MPS, else the CPU."""
        if self.device != "auto":
            return self.device
        if cuda_count():
            return "cuda"
        return "mps" if mps_available() else "cpu"

    def torch_dtype(self, checkpoint_dtype: torch.dtype | str | None = None) -> torch.dtype:
        """``auto``: the checkpoint's own dtype on an accelerator, float32 on the CPU (where
        bfloat16/float16 matmuls are slow and lossy)."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        on_accelerator = self.device_map is not None and cuda_count() or self.resolved_device() != "cpu"
        if not on_accelerator:
            return torch.float32
        if isinstance(checkpoint_dtype, str):
            checkpoint_dtype = DTYPES.get(checkpoint_dtype.replace("torch.", ""), torch.float32)
        return checkpoint_dtype if checkpoint_dtype in DTYPES.values() else torch.float32

    def from_pretrained_kwargs(self, checkpoint_dtype=None) -> dict:
        """Keywords for ``AutoModelForCausalLM.from_pretrained``."""
        kwargs: dict = {"dtype": self.torch_dtype(checkpoint_dtype)}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
            if self.max_memory:
                kwargs["max_memory"] = self.max_memory
            if self.offload_folder:
                kwargs["offload_folder"] = self.offload_folder
        elif self.resolved_device() != "cpu":
            kwargs["device_map"] = self.resolved_device()  # straight onto the device, no CPU copy first
        return kwargs

    def to_dict(self) -> dict:
        return asdict(self)


def input_device(model: nn.Module) -> torch.device:
    """Where the token ids must go: the embedding's device (its execution device when accelerate
    offloads it and keeps only a meta tensor in the module)."""
    streamer = getattr(model, "_cardhouse_streamer", None)
    if streamer is not None:  # a streamed model reads its embedding only while it embeds
        return streamer.device
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    weight = next(embed.parameters(), None)
    if weight is None or weight.device.type == "meta":
        return torch.device("cpu")
    return weight.device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype the weights are kept in (the first floating parameter's)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


__all__ = ["DTYPES", "DEVICES", "Placement", "input_device", "model_dtype", "parse_max_memory", "parse_size"]
