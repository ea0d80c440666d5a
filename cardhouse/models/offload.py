"""Editing weights that accelerate has offloaded to the CPU or to disk.

With ``device_map`` offload, accelerate leaves a *meta* tensor in the module and keeps the real
one in the module's ``AlignDevicesHook.weights_map``: a dict of CPU tensors, or a
``PrefixedDataset`` over an ``OffloadedWeightsLoader`` whose ``state_dict`` holds the CPU-offloaded
tensors and whose ``index`` points at files for the disk-offloaded ones. Before every forward pass
the hook copies ``weights_map[name]`` onto the execution device, so an edit made in the
``weights_map`` tensor is what the next forward pass sees.

A disk-offloaded tensor is read afresh from its file on every forward pass, so it cannot be edited
in place: ``home`` returns an in-memory copy, ``hold`` (an edit begins) puts that copy into the
loader's ``state_dict``, which takes priority over the files, and ``release`` (the last edit of it
ended, its bits restored) takes it out again. The files are never written: after the edit the
model reads the same bits as before, and only the tensors being edited are held in memory.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

_disk_copies: dict[int, list] = {}  # id(copy of a disk-offloaded tensor) -> [state_dict, key, edits in progress]
_shapes_only: ContextVar[bool] = ContextVar("cardhouse_shapes_only", default=False)


@contextmanager
def shapes_only():
    """Within it, a meta tensor without an offload hook is returned as it is: a model built on the meta device
    on purpose, to read its shapes from the config (``models.spec``), rather than one that failed to load."""
    token = _shapes_only.set(True)
    try:
        yield
    finally:
        _shapes_only.reset(token)


def _offload_hook(module: nn.Module):
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook or one hook
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def home(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor that really holds ``module.<name>``: the parameter itself, or where accelerate keeps it."""
    tensor = getattr(module, name)
    if not (isinstance(tensor, torch.Tensor) and tensor.is_meta):
        return tensor
    hook = _offload_hook(module)
    if hook is None and _shapes_only.get():
        return tensor
    if hook is None:
        raise ValueError(f"{type(module).__name__}.{name} is on the meta device and no accelerate offload "
                         "hook holds it: the model was not fully loaded")
    weights = hook.weights_map
    loader, key = getattr(weights, "dataset", None), getattr(weights, "prefix", "") + name
    if loader is None or not hasattr(loader, "state_dict"):
        return weights[name]  # a plain dict of CPU tensors (accelerate's cpu_offload)
    if key in loader.state_dict:
        return loader.state_dict[key]  # CPU-offloaded: the tensor the hook copies from
    with torch.inference_mode(False):  # a normal tensor, editable outside inference mode too
        value = loader[key].clone()  # disk-offloaded: a copy, put in place by ``hold`` while it is edited
    _disk_copies[id(value)] = [loader.state_dict, key, 0]
    weakref.finalize(value, _disk_copies.pop, id(value), None)
    return value


def _entry(tensor: torch.Tensor):
    base = tensor if tensor._base is None else tensor._base
    return base, _disk_copies.get(id(base))


def hold(tensor: torch.Tensor) -> None:
    """An edit of ``tensor`` (or of a view of it) begins: a copy of a disk-offloaded tensor takes its place."""
    base, entry = _entry(tensor)
    if entry is not None:
        if entry[2] == 0:
            entry[0][entry[1]] = base
        entry[2] += 1


def release(tensor: torch.Tensor) -> None:
    """An edit of ``tensor`` ended (its bits restored): with the last one, the file serves the tensor again."""
    base, entry = _entry(tensor)
    if entry is not None:
        entry[2] -= 1
        if entry[2] <= 0:
            entry[2] = 0
            if entry[0].get(entry[1]) is base:
                del entry[0][entry[1]]
