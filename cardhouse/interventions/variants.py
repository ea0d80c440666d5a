"""The papers' model variants, each a named context manager, and a runner that measures them.

A variant edits the model on entry and restores it bit-identically on exit, so one loaded
model serves every row of a results table. ``run_variants`` checks that with a digest of
every parameter after each variant.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable


from ..analysis.massive_activations import ScanResult
from ..analysis.massive_weights import MassiveWeights
from ..models.loading import LoadedModel
from .activations import massive_means, set_activations
from .weights import check_indices, random_indices, retain_rows, weights_digest, zero_rows, zero_super_weight

ATTACKS = ("topk-zero", "topk-retain", "random-zero", "random-retain", "super-weight", "random-weight")
INTERVENTIONS = ("set-zero", "set-mean")


@dataclass
class Variant:
    name: str
    description: str
    apply: Callable[[], ContextManager]
    first_layer: int | None = None  # the first layer whose computation it changes (None: none)


def original() -> Variant:
    return Variant("original", "unedited model", nullcontext)


def attack(lm: LoadedModel, mw: MassiveWeights, kind: str, *, k: int | None = None,
           indices: list[int] | None = None, seed: int = 0) -> Variant:
    """A House of Cards weight attack on layer ``mw.layer`` (``indices`` overrides the top-k)."""
    layer, expert = mw.layer, mw.expert
    size = lm.blocks.intermediate_size(layer)
    k = len(indices) if indices is not None else (k if k is not None else mw.k)
    if not 0 <= k <= size:
        raise ValueError(f"k={k} is out of range 0..{size} (layer {layer}'s intermediate size)")
    if indices is not None:
        indices = check_indices(indices, size, f"layer {layer} intermediate index")
    else:
        if k > len(mw.indices):
            raise ValueError(f"k={k} exceeds the {len(mw.indices)} massive indices found; "
                             f"run find_massive_weights with k >= {k}")
        indices = mw.indices[:k]
    # the control avoids the massive rows while there are enough others (not for k > size / 2)
    control = random_indices(size, k, exclude=indices if 2 * k <= size else (), seed=seed)
    row = mw.super_weight["row"]
    random_column = random_indices(size, 1, exclude=[mw.super_weight["column"]], seed=seed)[0]
    table = {
        "topk-zero": (f"zero W_up/W_gate rows {indices} of layer {layer}", lambda: zero_rows(lm, layer, indices, expert=expert)),
        "topk-retain": (f"keep only rows {indices} of layer {layer}'s W_up/W_gate", lambda: retain_rows(lm, layer, indices, expert=expert)),
        "random-zero": (f"control: zero {k} random rows {control} of layer {layer}", lambda: zero_rows(lm, layer, control, expert=expert)),
        "random-retain": (f"control: keep only {k} random rows of layer {layer}", lambda: retain_rows(lm, layer, control, expert=expert)),
        "super-weight": (f"zero the super weight (Yu et al.) W_down[{row}, {mw.super_weight['column']}] of layer {layer}",
                         lambda: zero_super_weight(lm, layer, row, mw.super_weight["column"], expert=expert)),
        "random-weight": (f"control: zero W_down[{row}, {random_column}] of layer {layer}",
                          lambda: zero_super_weight(lm, layer, row, random_column, expert=expert)),
    }
    if kind not in table:
        raise ValueError(f"unknown attack {kind!r}; known: {', '.join(table)}")
    description, apply = table[kind]
    return Variant(kind if kind.endswith("weight") else f"{kind} k={k}", description, apply, layer)


CONTROL = {"topk-zero": "random-zero", "topk-retain": "random-retain", "super-weight": "random-weight"}


def intervention(lm: LoadedModel, scan: ScanResult, kind: str, *, every_layer: bool = False) -> Variant:
    """Sun et al. Sec. 4.1: set the massive activations to zero or to their mean over the scan's prompts."""
    if kind not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {kind!r}; known: {', '.join(INTERVENTIONS)}")
    if not scan.found:
        raise ValueError("the scan found no massive activations to intervene on "
                         "(try a relative criterion, or give the layer and dims yourself)")
    first = scan.first_layer
    layers = scan.massive_layers if every_layer else [first]
    means = massive_means(scan, first)
    values = {dim: 0.0 for dim in means} if kind == "set-zero" else means
    # carriers: entries above the scan's threshold at that layer, i.e. the massive activations themselves
    threshold = scan.layers[first]["threshold"]
    where = "every massive layer" if every_layer else f"layer {first}"
    return Variant(kind, f"set dims {sorted(values)} to {kind.split('-')[1]} at {where} where |a| > {threshold:.0f}",
                   lambda: set_activations(lm, layers, values, threshold), min(layers))


def run_variants(lm: LoadedModel, variants: Iterable[Variant], measure: Callable[[LoadedModel], dict],
                 on_result: Callable[[dict], None] | None = None, reuse: bool = True) -> list[dict]:
    """Measure each variant, then check that the weights are back to the original bits.

    With ``reuse``, the layers before the first one any variant changes run once per input
    (``evaluation.reuse.reuse_prefix``). Hashing every parameter costs seconds, so it is done
    once for the whole run; the unit tests check each edit on its own.
    """
    from ..evaluation.reuse import reuse_prefix

    variants = list(variants)
    params = list(lm.model.parameters())
    before = weights_digest(params)
    changed = [v.first_layer for v in variants if v.first_layer is not None]
    results = []
    with reuse_prefix(lm, min(changed)) if reuse and changed else nullcontext():
        for variant in variants:
            with variant.apply():
                numbers = measure(lm)
            row = {"variant": variant.name, "description": variant.description, **numbers}
            results.append(row)
            if on_result:
                on_result(row)
    if weights_digest(params) != before:
        raise RuntimeError("the weights were not restored after the variants")
    return results
