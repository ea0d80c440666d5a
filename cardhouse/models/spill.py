"""Hidden states kept between streamed blocks: in memory (in the model dtype), or spilled to disk.

A streamed run (``models.streaming``) keeps the hidden states of every batch while one block at a
time is read, and a run of several variants also keeps those entering the first edited layer. For
a large evaluation set they may not fit in memory: inside ``spilling(folder)`` they live in numpy
memmaps in a private temporary folder instead. Each batch has one slot whose shape is the same at
every layer, so a block's output overwrites its input in place and a run needs one file.

Nothing is left behind whatever ends the run: each file is unlinked as soon as it is mapped (the
mapping keeps the space until it is dropped, and the kernel frees it even on SIGKILL), and the
private folder is removed when ``spilling`` exits, on an exception or Ctrl-C too. The free disk is
checked when ``spilling`` starts (the caller's estimate) and again before each file is made.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator, Sequence

import torch

GiB = 2**30


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_disk(folder: str | Path, need_bytes: int) -> None:
    """A clear error when ``folder``'s file system has less than ``need_bytes`` free."""
    free = shutil.disk_usage(_existing(Path(folder).absolute())).free
    if need_bytes > free:
        raise ValueError(f"not enough disk in {folder} to spill the hidden states: the run needs "
                         f"{need_bytes / GiB:.2f} GiB, {free / GiB:.2f} GiB are free (--spill-dir elsewhere, "
                         "or fewer tokens)")


class _Spill:
    """The folder given to ``spilling`` and the private folder made in it on first use."""

    def __init__(self, root: Path):
        self.root, self.private, self.made_root = root, None, False

    def folder(self) -> Path:
        if self.private is None:
            self.made_root = not self.root.exists()
            self.root.mkdir(parents=True, exist_ok=True)
            self.private = Path(tempfile.mkdtemp(prefix="cardhouse-spill-", dir=self.root))
        return self.private

    def remove(self) -> None:
        if self.private is not None:
            shutil.rmtree(self.private, ignore_errors=True)
        if self.made_root:
            try:
                self.root.rmdir()  # only if the run made it and nothing else is in it
            except OSError:
                pass


_SPILL: ContextVar[_Spill | None] = ContextVar("cardhouse_spill", default=None)


@contextmanager
def spilling(folder: str | Path | None, need_bytes: int = 0) -> Iterator[None]:
    """Within the context, streamed hidden states go to a private folder made under ``folder`` when the
    first states are stored (None: they stay in memory). ``need_bytes``: the disk the run will use,
    checked now. Everything made is removed on exit, also on an exception or Ctrl-C."""
    if folder is None:
        yield
        return
    check_disk(folder, need_bytes)
    spill = _Spill(Path(folder))
    token = _SPILL.set(spill)
    try:
        yield
    finally:
        _SPILL.reset(token)
        spill.remove()


def spill_folder() -> Path | None:
    """The private folder of the ``spilling`` context in effect, made now if needed (None: in memory)."""
    spill = _SPILL.get()
    return spill.folder() if spill is not None else None


class HiddenStates:
    """One hidden-state tensor per batch (``shapes[i]``, in ``dtype``), None until its first block ran.

    Indexing reads a batch's states onto ``device`` and assignment stores them: a list in memory,
    or one memmap slot per batch inside ``spilling``."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.shapes, self.dtype, self.device = [tuple(s) for s in shapes], dtype, torch.device(device)
        size = torch.tensor([], dtype=dtype).element_size()
        ends = torch.tensor([0] + [size * int(torch.Size(s).numel()) for s in self.shapes]).cumsum(0).tolist()
        self._slots = list(zip(ends[:-1], ends[1:]))
        self.nbytes = ends[-1]
        self._memory: list[torch.Tensor | None] = [None] * len(self.shapes)
        self._map = None
        folder = spill_folder()
        if folder is not None and self.nbytes:
            import numpy as np

            check_disk(folder, self.nbytes)
            handle, path = tempfile.mkstemp(suffix=".states", dir=folder)
            os.close(handle)
            try:
                self._map = np.memmap(path, dtype=np.uint8, mode="w+", shape=(self.nbytes,))
            finally:
                os.unlink(path)  # the mapping keeps the space; no file outlives the process
        self._filled = [False] * len(self.shapes)

    @property
    def spilled(self) -> bool:
        return self._map is not None

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        if self._map is None:
            return self._memory[i]
        if not self._filled[i]:
            return None
        start, end = self._slots[i]
        # a copy: the slot is overwritten by this batch's output while the block still runs on its input
        data = torch.from_numpy(self._map[start:end]).clone()
        return data.view(self.dtype).reshape(self.shapes[i]).to(self.device)

    def __setitem__(self, i: int, value: torch.Tensor) -> None:
        if tuple(value.shape) != self.shapes[i]:
            raise ValueError(f"batch {i}: states of shape {tuple(value.shape)}, expected {self.shapes[i]}")
        value = value.detach().to(self.dtype)
        if self._map is None:
            self._memory[i] = value
            return
        start, end = self._slots[i]
        self._map[start:end] = value.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._filled[i] = True

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        return (self[i] for i in range(len(self)))

    def copy(self) -> "HiddenStates":
        """The same states in a new store (a run that continues from shared states leaves them intact)."""
        new = HiddenStates(self.shapes, self.dtype, self.device)
        for i, value in enumerate(self):
            if value is not None:
                new[i] = value  # in memory the tensor is shared: states are replaced, never written in place
        return new


def hidden_bytes(tokens: int, d_model: int, dtype: torch.dtype) -> int:
    """Bytes of the hidden states of ``tokens`` tokens."""
    return tokens * d_model * torch.tensor([], dtype=dtype).element_size()


__all__ = ["HiddenStates", "check_disk", "hidden_bytes", "spill_folder", "spilling"]
