"""Activation interventions (Sun et al. Sec. 4.1): set the massive activations to zero or to their mean.

A hook on the residual stream leaving a layer replaces, on the tokens that carry them
(|a| above a threshold in a massive dimension), the massive values by a fixed value.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from ..analysis.massive_activations import ScanResult
from ..capture import hook_name, hooks
from ..models.loading import LoadedModel
from .weights import check_indices


@contextmanager
def set_activations(lm: LoadedModel, layers: Sequence[int], values: Mapping[int, float], threshold: float
                    ) -> Iterator[dict]:
    """Within ``layers``, set hidden dim ``d`` to ``values[d]`` wherever |a[d]| > ``threshold``.

    Yields a dict counting how many entries were replaced (to check that it did something).
    """
    for layer in layers:
        lm.blocks.check_layer(layer)
    check_indices(list(values), lm.model.config.hidden_size, "hidden dim")
    dims = torch.tensor(list(values), dtype=torch.long)
    new = torch.tensor(list(values.values()))
    counts = {"replaced": 0}

    def replace(name, acts):
        sel = acts[..., dims]  # [batch, pos, n_dims]
        carriers = sel.abs() > threshold
        counts["replaced"] += int(carriers.sum())
        acts = acts.clone()
        acts[..., dims] = torch.where(carriers, new.to(acts.dtype), sel)
        return acts

    with hooks(lm.model, {hook_name(layer, "hook_resid_post"): replace for layer in layers}):
        yield counts


def massive_means(scan: ScanResult, layer: int) -> dict[int, float]:
    """Mean value of each massive dimension at ``layer`` over the scan's prompts and carrier tokens."""
    sums: dict[int, list[float]] = {}
    for v in scan.values_at(layer):
        total = sums.setdefault(v["dim"], [0.0, 0])
        total[0] += v["mean"] * v["count"]
        total[1] += v["count"]
    return {dim: s / n for dim, (s, n) in sums.items() if n}


@contextmanager
def pin_ffn_output(lm: LoadedModel, layer: int, dim: int, value: float, position: int = 0) -> Iterator[None]:
    """Set the FFN output of ``layer`` (its down projection's output) at [``position``, ``dim``] to ``value``
    on every input: Yu et al.'s restoration of the super activation after the super weight is zeroed."""
    lm.blocks.check_layer(layer)
    check_indices([dim], lm.model.config.hidden_size, "hidden dim")

    def pin(name, acts):
        if acts.shape[1] <= position:
            return None
        acts = acts.clone()
        acts[:, position, dim] = value
        return acts

    with hooks(lm.model, {hook_name(layer, "mlp.hook_out"): pin}):
        yield
