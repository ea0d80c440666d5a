"""What the analyses run over: a list of inputs, their token roles, and batches with the model's arguments.

The scan reads any object of this shape (``Inputs``): prompts for decoder LMs (``analysis.tokens.PromptInputs``), images and
sentences for encoders in ``cardhouse.encoders.inputs``. A batch's ``input_ids`` name each
position for the scan's tables (token ids for text, the position for images: ``token_text``
turns either into words), ``model_kwargs`` is what the model body is called with.
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import torch

from .batches import PromptBatch


class Inputs(Protocol):
    role_names: tuple[str, ...]
    role_lists: list[list[str]]  # the role of every position of every input

    def __len__(self) -> int: ...

    @property
    def tokens(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[PromptBatch]: ...

    def token_text(self, token_id: int) -> str: ...


def role_codes(role_lists: list[list[str]], width: int, names: Sequence[str], fill: str) -> torch.Tensor:
    """``[batch, width]`` indices into ``names`` (padding gets ``fill``)."""
    codes = torch.full((len(role_lists), width), names.index(fill), dtype=torch.long)
    for row, rs in enumerate(role_lists):
        codes[row, :len(rs)] = torch.tensor([names.index(r) for r in rs])
    return codes
