"""How much memory a model needs, computed from its config (before anything is loaded).

``requirements(config, dtype)`` gives the bytes of the whole model, of its largest decoder block
and of everything outside the blocks (embeddings, head), for an ordinary load, for
``--device-map`` (the whole model spread over the devices and disk) and for ``--stream`` (one
block + the rest + the hidden states of the batch set, twice: a run of variants keeps the states
entering the attacked layer beside the running ones), or with ``--spill-dir`` the hidden states on
disk instead (``models.spill``). The count is exact for the families in
the adapter table: a skeleton is built on the meta device and its parameters counted.
``check_budget(config, placement)`` refuses a ``--max-memory`` that cannot hold one decoder block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .adapters import Blocks
from .placement import DTYPES
from .spec import meta_model

GiB = 2**30


@dataclass(frozen=True)
class Requirements:
    dtype: str
    parameters: int
    model_bytes: int  # every weight in ``dtype``: an ordinary load (and the sum over --device-map's devices)
    block_bytes: int  # the largest decoder block
    rest_bytes: int  # embeddings, final norm, head (a tied head counted once)
    hidden_bytes: int  # hidden states of ``tokens`` tokens (prompts x length) in ``dtype``
    stream_bytes: int  # --stream: block + rest + hidden states (x2: the shared prefix and the running states)
    spill_bytes: int  # --stream --spill-dir: disk for the hidden states (x2); memory is then about block + rest

    def to_dict(self) -> dict:
        return {**asdict(self), **{k.replace("_bytes", "_gib"): round(v / GiB, 2)
                                   for k, v in asdict(self).items() if k.endswith("_bytes")}}


def _parameter_counts(blocks: Blocks) -> tuple[int, int, int]:
    """Parameters of the whole model, of its largest decoder block and outside the blocks (embeddings, final
    norm, head; a tied head counted once)."""
    layers = blocks.layers
    total = sum(p.numel() for p in blocks.model.parameters())
    largest = max(sum(p.numel() for p in block.parameters()) for block in layers)
    return total, largest, total - sum(p.numel() for p in layers.parameters())


def requirements(config, dtype: str | torch.dtype = "bfloat16", tokens: int = 4 * 512) -> Requirements:
    """Memory of ``config`` (a transformers config) in ``dtype`` with ``tokens`` hidden states kept."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    size = torch.tensor([], dtype=dtype).element_size()
    # a skeleton on the meta device: nothing is allocated; the sizes are numel x the dtype's size
    total, block, rest = _parameter_counts(Blocks.of(meta_model(config)))
    hidden = tokens * config.hidden_size * size
    name = str(dtype).replace("torch.", "")
    return Requirements(name, total, total * size, block * size, rest * size, hidden,
                        (block + rest) * size + 2 * hidden, 2 * hidden)


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def check_budget(spec, placement) -> None:
    """``--max-memory`` must hold the largest decoder block on one device: accelerate runs a block whole on
    one device whatever it offloads, and ``--stream`` keeps the embeddings and head loaded beside the block
    it reads. Otherwise a ``ValueError`` naming the sizes and the budget, before any weight loads.
    ``spec``: the model's ``ModelSpec`` (its meta-device skeleton is counted)."""
    if not placement.max_memory:
        return
    own = getattr(spec.config, "dtype", None) or getattr(spec.config, "torch_dtype", None)
    dtype = placement.torch_dtype(own)
    size = torch.tensor([], dtype=dtype).element_size()
    _, block, rest = (n * size for n in _parameter_counts(spec.blocks))
    need = block + rest if placement.stream else block
    budgets = {device: v for device, v in placement.max_memory.items() if device != "disk"}
    largest = max(budgets.values(), default=0)
    if largest >= need:
        return
    name = str(dtype).replace("torch.", "")
    what = (f"--stream keeps one decoder block ({_size(block)}) and the embeddings and head ({_size(rest)}) in "
            f"memory: {_size(need)} in {name}" if placement.stream else
            f"the largest decoder block needs {_size(block)} in {name} on one device (accelerate never splits one)")
    raise ValueError(f"--max-memory: {what}, more than the largest budget given ({_size(largest)}"
                     f"{'' if budgets else ', disk only'}); raise it or choose a smaller --dtype")
