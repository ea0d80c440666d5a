"""Weight attacks (House of Cards) as context managers that restore bit-identical weights.

Every edit saves exactly the entries it will overwrite and writes them back in a
``finally`` clause, so the weights are restored on normal exit, on an exception, and on
Ctrl-C. ``weights_digest`` hashes tensors to check it.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from ..models.digest import weights_digest  # noqa: F401  (part of this module's API)
from ..models import offload
from ..models.loading import LoadedModel


def check_indices(indices: Sequence[int], size: int, what: str = "index") -> list[int]:
    indices = [int(i) for i in indices]
    if len(set(indices)) != len(indices):
        raise ValueError(f"the {what} list has duplicates: {sorted(indices)}")
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ValueError(f"{what} values out of range 0..{size - 1}: {bad}")
    return indices


SliceValue = float | Callable[[torch.Tensor], torch.Tensor]  # a number, or new values from the original slice


@contextmanager
def overwrite_slices(edits: Sequence[tuple[torch.Tensor, int, torch.Tensor, SliceValue]]) -> Iterator[None]:
    """Set ``tensor.index_select(axis, index)`` to ``value`` (a number, or a function of the original
    slice) for each edit, restoring the original bits on exit."""
    saved = []
    try:
        with torch.no_grad():
            for tensor, axis, index, value in edits:
                offload.hold(tensor)  # a weight accelerate offloaded to disk stays editable until restored
                index = index.to(tensor.device)
                original = tensor.index_select(axis, index)  # a copy
                saved.append((tensor, axis, index, original))
                if callable(value):
                    tensor.index_copy_(axis, index, value(original))
                else:
                    tensor.index_fill_(axis, index, value)
        yield
    finally:
        with torch.no_grad():
            for tensor, axis, index, original in reversed(saved):
                tensor.index_copy_(axis, index, original)
                offload.release(tensor)


def _neuron_edits(lm: LoadedModel, layer: int, neurons: Sequence[int], expert: int | None):
    edits = []
    for tensor, axis, offset in lm.blocks.neuron_slices(layer, expert):
        index = torch.tensor([offset + i for i in neurons], dtype=torch.long)
        edits.append((tensor, axis, index, 0.0))
    return edits


def touched_tensors(lm: LoadedModel, layer: int, expert: int | None = None) -> list[torch.Tensor]:
    """The tensors an FFN-row attack on ``layer`` may change (for digests)."""
    unique = {id(t): t for t, _, _ in lm.blocks.neuron_slices(layer, expert)}
    return list(unique.values()) + [lm.blocks.down_weight(layer, expert)]


@contextmanager
def zero_rows(lm: LoadedModel, layer: int, indices: Sequence[int], *, expert: int | None = None) -> Iterator[None]:
    """Top-k zeroing: zero the W_up and W_gate rows (fc_in rows and bias) at ``indices`` of ``layer``."""
    indices = check_indices(indices, lm.blocks.intermediate_size(layer, expert), "intermediate index")
    with overwrite_slices(_neuron_edits(lm, layer, indices, expert)):
        yield


@contextmanager
def retain_rows(lm: LoadedModel, layer: int, indices: Sequence[int], *, expert: int | None = None) -> Iterator[None]:
    """Top-k retaining: keep only the rows at ``indices`` and zero every other W_up/W_gate row of ``layer``."""
    size = lm.blocks.intermediate_size(layer, expert)
    keep = set(check_indices(indices, size, "intermediate index"))
    others = [i for i in range(size) if i not in keep]
    with overwrite_slices(_neuron_edits(lm, layer, others, expert)):
        yield


def random_indices(size: int, k: int, *, exclude: Sequence[int] = (), seed: int = 0) -> list[int]:
    """The random-k control: k distinct indices drawn (seeded) from those not in ``exclude``."""
    pool = sorted(set(range(size)) - set(exclude))
    if not 0 <= k <= len(pool):
        raise ValueError(f"k={k} is out of range: {len(pool)} indices are available")
    return sorted(random.Random(seed).sample(pool, k))


@contextmanager
def zero_super_weight(lm: LoadedModel, layer: int, row: int, column: int, *,
                      expert: int | None = None) -> Iterator[None]:
    """Zero one entry W_down[row, column] (a super weight of Yu et al. when it is one: see
    ``cardhouse.analysis.super_weight``)."""
    down = lm.blocks.down_weight(layer, expert)  # [d_model, d_intermediate] view
    check_indices([row], down.shape[0], "W_down row")
    check_indices([column], down.shape[1], "W_down column")
    flat_row = down[row]  # a view: writing to it writes the parameter
    with overwrite_slices([(flat_row, 0, torch.tensor([column]), 0.0)]):
        yield


@contextmanager
def zero_down_line(lm: LoadedModel, layer: int, *, row: int | None = None, column: int | None = None,
                   expert: int | None = None) -> Iterator[None]:
    """Zero a whole row (one hidden dim's weights) or a whole column (one intermediate channel's) of W_down."""
    if (row is None) == (column is None):
        raise ValueError("give exactly one of row or column")
    down = lm.blocks.down_weight(layer, expert)  # [d_model, d_intermediate] view
    axis, index = (0, row) if row is not None else (1, column)
    check_indices([index], down.shape[axis], "W_down row" if axis == 0 else "W_down column")
    with overwrite_slices([(down, axis, torch.tensor([index]), 0.0)]):
        yield
