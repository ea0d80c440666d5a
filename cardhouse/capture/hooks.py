"""Named hook points on any adapted model, TransformerLens style.

``blocks.{l}.hook_resid_pre``   residual stream entering block l     [batch, pos, d_model]
``blocks.{l}.attn.hook_in``     attention input (normed residual)    [batch, pos, d_model]
``blocks.{l}.hook_attn_out``    attention output (before any post-norm) [batch, pos, d_model]
``blocks.{l}.hook_resid_mid``   residual stream after attention      [batch, pos, d_model]
``blocks.{l}.mlp.hook_in``      MLP input (normed residual)          [batch, pos, d_model]
``blocks.{l}.mlp.hook_post``    act(W_gate x) * (W_up x), input of W_down [batch, pos, d_mlp]
``blocks.{l}.mlp.hook_out``     MLP output (before any post-norm)    [batch, pos, d_model]
``blocks.{l}.hook_resid_post``  residual stream leaving block l      [batch, pos, d_model]

and inside attention (``capture.attention``): ``blocks.{l}.attn.hook_q``, ``attn.hook_k``, ``attn.hook_v``
(per head, after q/k norms and rotary), ``attn.hook_scores`` (pre-softmax logits) and ``attn.hook_pattern``
(probabilities); on Mixture-of-Experts layers (``capture.moe``, read only): ``blocks.{l}.mlp.hook_router``,
``mlp.hook_experts_in`` and ``mlp.hook_shared_out``.

A hook function gets ``(name, tensor)`` and may return a tensor to replace it.
"""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from typing import Iterable, Iterator

import torch
from torch import nn

from ..models.adapters import Blocks
from . import attention, moe
from .attention import HookFn

# point -> (part of the block, whether the hooked tensor is that module's input or output)
POINTS: dict[str, tuple[str, str]] = {
    "hook_resid_pre": ("block", "input"),
    "attn.hook_in": ("attn", "input"),
    "hook_attn_out": ("attn", "output"),
    "hook_resid_mid": ("resid_mid_norm", "input"),
    "mlp.hook_in": ("mlp", "input"),
    "mlp.hook_post": ("down", "input"),
    "mlp.hook_out": ("mlp_out", "output"),
    "hook_resid_post": ("block", "output"),
}
_NAME = re.compile(r"blocks\.(\d+)\.(.+)")


def hook_name(layer: int, point: str) -> str:
    return f"blocks.{layer}.{point}"


def all_hook_names(model: nn.Module, point: str) -> list[str]:
    return [hook_name(layer, point) for layer in range(len(Blocks.of(model)))]


def parse_hook_name(name: str) -> tuple[int, str]:
    match = _NAME.fullmatch(name)
    if not match or match.group(2) not in (*POINTS, *attention.POINTS, *moe.POINTS):
        raise ValueError(f"unknown hook name {name!r}; names look like blocks.3.hook_resid_post, "
                         f"with points {', '.join((*POINTS, *attention.POINTS, *moe.POINTS))}")
    return int(match.group(1)), match.group(2)


def _module(blocks: Blocks, layer: int, part: str) -> nn.Module:
    if part == "block":
        return blocks.layers[blocks.check_layer(layer)]
    if part == "down":
        if blocks.is_moe_layer(layer):
            raise ValueError("mlp.hook_post does not exist for Mixture-of-Experts layers (experts are 3-D "
                             "tensors); use Blocks.intermediate(layer, mlp_input, expert) instead")
        return blocks.mlp_part(layer, "down")
    if part == "mlp_out":
        return blocks.mlp_out(layer)
    return blocks.part(layer, part)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x, new):
    return (new, *x[1:]) if isinstance(x, tuple) else new


@contextmanager
def hooks(model: nn.Module, fns: dict[str, HookFn] | Iterable[tuple[str, HookFn]]) -> Iterator[None]:
    """Attach hook functions by name for the duration of the block; always detached after, also on error."""
    blocks = Blocks.of(model)
    handles, inside = [], []  # module hooks; attention hook points (capture.attention)
    try:
        for name, fn in (fns.items() if isinstance(fns, dict) else fns):
            layer, point = parse_hook_name(name)
            if point in attention.POINTS:
                inside.append((blocks.check_layer(layer), point, name, fn))
                continue
            if point in moe.POINTS:
                handles.append(moe.attach(blocks, blocks.check_layer(layer), point, name, fn))
                continue
            part, side = POINTS[point]
            module = _module(blocks, layer, part)
            handles.append(_attach(module, side, name, fn))
        with attention.attention_hooks(model, inside) if inside else nullcontext():
            yield
    finally:
        for handle in handles:
            handle.remove()


def _attach(module: nn.Module, side: str, name: str, fn: HookFn):
    if side == "output":
        def on_output(mod, args, output):
            new = fn(name, _first(output))
            return None if new is None else _replace_first(output, new)

        return module.register_forward_hook(on_output)

    def on_input(mod, args, kwargs):
        # decoder blocks may receive hidden_states by keyword
        if args:
            new = fn(name, args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(name, kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return module.register_forward_pre_hook(on_input, with_kwargs=True)


@contextmanager
def record(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Store the tensors at ``names`` (detached) in a dict filled during the forward passes.

    For small inputs only; long runs should reduce on the fly (see ``capture.stats``).
    """
    store: dict[str, torch.Tensor] = {}

    def keep(name, tensor):
        store[name] = tensor.detach()

    with hooks(model, {name: keep for name in names}):
        yield store
