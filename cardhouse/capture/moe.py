"""Mixture-of-Experts hook points (read only): what a layer's router decides and what its experts receive.

``blocks.{l}.mlp.hook_router``      the router's outputs: (logits [tokens, experts], top-k weights [tokens, top_k],
                                    top-k experts [tokens, top_k])
``blocks.{l}.mlp.hook_experts_in``  the experts module's inputs: (x [tokens, d_model], top-k experts, top-k weights)
``blocks.{l}.mlp.hook_shared_out``  the shared expert's down-projection output (layers with a shared expert)

Tokens are the flattened ``batch x position``. A hook function gets ``(name, value)`` like any other; its
return value is ignored (the routed experts are 3-D tensors with no module boundary per expert, so an
analysis recomputes what it needs from these inputs). Being named hook points, they are attached per
batch (and on a streamed model per block and batch) with ``capture.hooks``, so a hook takes its batch
from the closure that made it.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..models.adapters import SHARED, Blocks
from .attention import HookFn


def _router_outputs(args, kwargs, out):
    return tuple(out[:3])  # transformers 5 routers: (logits, top-k weights, top-k experts)


def _experts_inputs(args, kwargs, out):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    return tuple((list(args) + [kwargs[n] for n in names[len(args):]])[:3])


# point -> (the FFN part it hooks, whose (SHARED: the shared expert's), what of the call the hook gets)
POINTS: dict[str, tuple[str, str | None, Callable]] = {
    "mlp.hook_router": ("router", None, _router_outputs),
    "mlp.hook_experts_in": ("experts", None, _experts_inputs),
    "mlp.hook_shared_out": ("down", SHARED, lambda args, kwargs, out: out),
}


def attach(blocks: Blocks, layer: int, point: str, name: str, fn: HookFn):
    """A forward hook handing ``fn`` the point's value; the caller removes the handle."""
    if not blocks.is_moe_layer(layer):
        raise ValueError(f"{name}: layer {layer} is no Mixture-of-Experts layer (layers {blocks.moe_layers} are)")
    part, expert, read = POINTS[point]
    if expert == SHARED and not blocks.ffn(layer).shared_expert:
        raise ValueError(f"{name}: layer {layer} has no shared expert")
    module: nn.Module = blocks.mlp_part(layer, part, expert)

    def on_call(mod, args, kwargs, out):  # returns None: these points are read only
        fn(name, read(args, kwargs, out))

    return module.register_forward_hook(on_call, with_kwargs=True)
