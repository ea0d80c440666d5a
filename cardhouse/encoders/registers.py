"""Registers without retraining (Jiang et al., 2025, "Vision Transformers Don't Need Trained Registers").

One extra token (zeros) is appended after the patches when the residual stream enters the first
block. In layer l (the layer whose FFN writes the carrier's outlier) the activations of the
"register neurons" (the carrier token's top-k FFN neurons, ``carrier_weights``) are moved onto it:
each neuron's activation on the extra token becomes its maximum over all tokens, and is zero on every
other token. The output features are read from the original positions only. Measured: whether the
outlier leaves the carrier and the patch tokens (their norms) and how the output features change.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..analysis.massive_weights import MassiveWeights
from ..capture import hook_name, hooks, parse_hook_name, run_inputs
from ..models.loading import LoadedModel


@contextmanager
def test_time_register(lm: LoadedModel, layer: int, neurons: list[int]) -> Iterator[dict]:
    """While active, every forward pass has one more token, last, that takes the ``neurons``' activations
    in ``layer``. Yields a dict counting the forward passes it changed."""
    if lm.inputs != "image":
        raise ValueError(f"test-time registers are for image models; {lm.name} reads {lm.inputs} tokens")
    lm.blocks.check_layer(layer)
    index = torch.tensor(neurons, dtype=torch.long, device=lm.device)
    seen = {"passes": 0}

    def append(name, x):  # [batch, pos, d] -> [batch, pos + 1, d]
        seen["passes"] += 1
        return torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], dim=1)

    def move(name, acts):  # the FFN's intermediate state [batch, pos + 1, d_mlp]
        acts = acts.clone()
        peak = acts[:, :-1, index].amax(dim=1)  # each neuron's maximum over the original tokens
        acts[:, :-1, index] = 0.0
        acts[:, -1, index] = peak
        return acts

    with hooks(lm.model, {hook_name(0, "hook_resid_pre"): append, hook_name(layer, "mlp.hook_post"): move}):
        yield seen


def _norms(lm, inputs, batch_size) -> torch.Tensor:
    """``[layer, image, pos]`` residual norms after every layer (the current forward pass's hooks apply)."""
    parts = {l: [] for l in range(len(lm.blocks))}

    def keep(name, x):
        parts[parse_hook_name(name)[0]].append(x.float().norm(dim=-1).cpu())

    run_inputs(lm, inputs.batches(batch_size), -(-len(inputs) // batch_size),
               lambda batch: {hook_name(l, "hook_resid_post"): keep for l in parts}, progress=False)
    return torch.stack([torch.cat(parts[l]) for l in parts])


def _summary(norms: torch.Tensor, inputs, carrier_positions: list[int], layer: int) -> dict:
    patches = norms[layer][:, inputs.prefix:inputs.positions]
    rows = torch.arange(norms.shape[1])
    carrier = norms[layer][rows, torch.tensor(carrier_positions)]
    return {"carrier_norm": float(carrier.mean()),
            "patch_norm_median": float(patches.median()),
            "patch_max_over_median": float((patches.amax(1) / patches.median(1).values).mean()),
            "register_norm": float(norms[layer][:, inputs.positions:].mean()) if norms.shape[2] > inputs.positions
            else None}


def measure_registers(lm: LoadedModel, inputs, carrier, weights: MassiveWeights, measure: Callable[[], dict], *,
                      batch_size: int = 8) -> dict:
    """The carrier and patch norms and the output measures, without and with a test-time register."""
    neurons = list(weights.indices)
    layers = sorted({weights.layer, carrier.layer, len(lm.blocks) - 1})
    before = _norms(lm, inputs, batch_size)
    with test_time_register(lm, weights.layer, neurons):
        after = _norms(lm, inputs, batch_size)
        measured = measure()
    original = measure()
    return {"layer": weights.layer, "neurons": neurons,
            "norms": [{"layer": l, "without": _summary(before, inputs, carrier.positions, l),
                       "with": _summary(after, inputs, carrier.positions, l)} for l in layers],
            "measures": {"without": original, "with": measured}}
