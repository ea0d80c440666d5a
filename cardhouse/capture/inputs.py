"""What the analyses run over: a list of inputs, their token roles, and batches with the model's arguments.

The scan reads any object of this shape (``Inputs``): prompts for decoder LMs here, images and
sentences for encoders in ``cardhouse.encoders.inputs``. A batch's ``input_ids`` name each
position for the scan's tables (token ids for text, the position for images: ``token_text``
turns either into words), ``model_kwargs`` is what the model body is called with.
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import torch

from .batches import PromptBatch, batches


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


class PromptInputs:
    """Prompts of a decoder LM: BOS first when the model uses one; roles from ``analysis.tokens``."""

    def __init__(self, lm, prompts: Sequence[str]):
        from ..analysis.tokens import ROLES, roles
        from .run import tokenize_prompts

        if lm.inputs != "causal":
            raise ValueError(f"{lm.name} is an encoder (it reads {'images' if lm.inputs == 'image' else 'sentences'}"
                             "): use `cardhouse encoder` or cardhouse.encoders")
        self.lm, self.prompts = lm, list(prompts)
        self.token_lists = tokenize_prompts(lm, self.prompts)
        self.role_names = ROLES
        self.role_lists = [roles(lm.tokenizer, ids, lm.bos_id) for ids in self.token_lists]

    def __len__(self) -> int:
        return len(self.token_lists)

    @property
    def tokens(self) -> int:
        return sum(map(len, self.token_lists))

    def batches(self, batch_size: int) -> Iterator[PromptBatch]:
        return batches(self.token_lists, batch_size)

    def token_text(self, token_id: int) -> str:
        return self.lm.tokenizer.decode([token_id])
