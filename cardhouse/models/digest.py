"""Hashing tensors to check that an edit was undone to the bit."""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def weights_digest(tensors: Sequence[torch.Tensor]) -> str:
    """sha256 over the raw bytes of the tensors: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
