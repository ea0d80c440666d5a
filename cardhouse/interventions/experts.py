"""Mixture-of-Experts attacks, each a context manager that leaves the model as it found it.

- rows inside one expert: ``weights.zero_rows`` / ``retain_rows`` with ``expert=`` (House of Cards
  Table 7 attacks only the carrier's expert), with two controls: random rows of the same expert and
  the same rows of another expert;
- a whole expert routed around: the router's own logits with that expert masked out, so its
  probability goes to the others and the top-k is taken again (no weight changes at all);
- pruning experts (Su et al.'s super experts): their down projection zeroed, so they add nothing
  wherever the router sends tokens; restored bit-identically by ``overwrite_slices``.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..models.adapters import SHARED
from ..models.loading import LoadedModel
from ..models.routing import normalises, routing_of
from .weights import check_indices, overwrite_slices, random_indices, retain_rows, zero_rows


def _check_experts(lm: LoadedModel, layer: int, experts: Sequence[int]) -> list[int]:
    blocks = lm.blocks
    routing_of(blocks.adapter)
    blocks.check_layer(layer)
    if not blocks.is_moe_layer(layer):
        raise ValueError(f"layer {layer} is a dense FFN layer: it has no experts (MoE layers: {blocks.moe_layers})")
    if SHARED in experts:
        raise ValueError("the shared expert is not routed: it cannot be routed around or pruned as an expert")
    return check_indices([blocks.check_expert(layer, e) for e in experts], blocks.n_experts(layer), f"layer {layer} expert")


@contextmanager
def route_around(lm: LoadedModel, layer: int, experts: Sequence[int]) -> Iterator[None]:
    """Whole-expert ablation: ``layer``'s router never chooses ``experts``; their probability is shared
    by the others (the softmax renormalised over them) and the top-k is taken among the rest."""
    experts = _check_experts(lm, layer, experts)
    blocks = lm.blocks
    routing = routing_of(blocks.adapter)
    router = blocks.mlp_part(layer, "router")
    norm = normalises(blocks, layer)
    left = blocks.n_experts(layer) - len(experts)

    def reroute(module, args, output):
        logits, weights, chosen = output[:3]
        if left < chosen.shape[-1]:
            raise ValueError(f"cannot route around {len(experts)} experts: {left} are left for top-{chosen.shape[-1]}")
        new_weights, new_chosen = routing.route(logits, chosen.shape[-1], norm, experts)
        return (logits, new_weights.to(weights.dtype), new_chosen.to(chosen.dtype), *output[3:])

    handle = router.register_forward_hook(reroute)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def prune_experts(lm: LoadedModel, experts: Sequence[tuple[int, int]]) -> Iterator[None]:
    """Zero the down projection of each ``(layer, expert)``: it outputs nothing wherever it is chosen."""
    by_layer: dict[int, list[int]] = {}
    for layer, expert in experts:
        by_layer.setdefault(layer, []).append(expert)
    edits = []
    for layer, chosen in by_layer.items():
        chosen = _check_experts(lm, layer, chosen)
        edits.append((lm.blocks.mlp_part(layer, "down"), 0, torch.tensor(chosen), 0.0))
    with overwrite_slices(edits):
        yield


def other_expert(lm: LoadedModel, layer: int, expert: int | str, seed: int = 0) -> int:
    """A seeded random routed expert of ``layer`` other than ``expert`` (the control expert)."""
    pool = [e for e in range(lm.blocks.n_experts(layer)) if e != expert]
    if not pool:
        raise ValueError(f"layer {layer} has no other expert to serve as a control")
    return random.Random(seed).choice(pool)


def random_experts(lm: LoadedModel, experts: Sequence[tuple[int, int]], seed: int = 0) -> list[tuple[int, int]]:
    """As many random experts as ``experts``, in the same layers, none of them among ``experts``."""
    rng = random.Random(seed)
    taken = set(experts)
    out = []
    for layer, _ in experts:
        pool = [(layer, e) for e in range(lm.blocks.n_experts(layer)) if (layer, e) not in taken]
        if not pool:
            raise ValueError(f"layer {layer} has no expert left for the random control")
        pick = rng.choice(pool)
        taken.add(pick)
        out.append(pick)
    return out


@dataclass
class ExpertTarget:
    """What the MoE attacks aim at: the carrier's expert and its massive rows in one layer, and the
    super experts (from ``analysis.moe``)."""

    layer: int
    expert: int | str
    indices: list[int]
    super_experts: list[tuple[int, int]]

    @classmethod
    def of(cls, mw, super_experts: Sequence[tuple[int, int]] = ()) -> "ExpertTarget":
        if mw.expert is None:
            raise ValueError(f"the massive-weight layer {mw.layer} is not a Mixture-of-Experts layer: "
                             "expert attacks need the carrier's expert (give --layer of an MoE layer)")
        return cls(mw.layer, mw.expert, list(mw.indices), list(super_experts))


# attack -> its controls (the order of a results table)
MOE_ATTACKS: dict[str, tuple[str, ...]] = {
    "expert-topk-zero": ("expert-random-zero", "expert-other-zero"),
    "expert-topk-retain": ("expert-random-retain", "expert-other-retain"),
    "expert-ablate": ("random-expert-ablate",),
    "super-experts": ("random-experts",),
}


def expert_attack(lm: LoadedModel, target: ExpertTarget, kind: str, *, k: int | None = None, seed: int = 0):
    """One MoE attack or control as a ``Variant`` (see ``MOE_ATTACKS``)."""
    from .variants import Variant

    layer, expert = target.layer, target.expert
    indices = target.indices[:k] if k is not None else target.indices
    k = len(indices)
    size = lm.blocks.intermediate_size(layer, expert)
    table = {}
    if kind.startswith("expert-") and kind != "expert-ablate":
        rows = random_indices(size, k, exclude=indices if 2 * k <= size else (), seed=seed)
        other = other_expert(lm, layer, expert, seed)
        check_indices(indices, lm.blocks.intermediate_size(layer, other), f"expert {other} intermediate index")
        at = f"layer {layer}"
        table = {
            "expert-topk-zero": (f"zero rows {indices} of expert {expert}, {at}", lambda: zero_rows(lm, layer, indices, expert=expert)),
            "expert-random-zero": (f"control: zero random rows {rows} of expert {expert}, {at}",
                                   lambda: zero_rows(lm, layer, rows, expert=expert)),
            "expert-other-zero": (f"control: zero rows {indices} of expert {other}, {at}",
                                  lambda: zero_rows(lm, layer, indices, expert=other)),
            "expert-topk-retain": (f"keep only rows {indices} of expert {expert}, {at}",
                                   lambda: retain_rows(lm, layer, indices, expert=expert)),
            "expert-random-retain": (f"control: keep only random rows {rows} of expert {expert}, {at}",
                                     lambda: retain_rows(lm, layer, rows, expert=expert)),
            "expert-other-retain": (f"control: keep only rows {indices} of expert {other}, {at}",
                                    lambda: retain_rows(lm, layer, indices, expert=other)),
        }
    elif kind in ("expert-ablate", "random-expert-ablate"):
        other = other_expert(lm, layer, expert, seed)
        table = {
            "expert-ablate": (f"route around expert {expert} of layer {layer}", lambda: route_around(lm, layer, [expert])),
            "random-expert-ablate": (f"control: route around expert {other} of layer {layer}",
                                     lambda: route_around(lm, layer, [other])),
        }
    elif kind in ("super-experts", "random-experts"):
        if not target.super_experts:
            raise ValueError("no super experts were flagged: nothing to prune (lower --percentile or --fraction)")
        chosen = target.super_experts if kind == "super-experts" else random_experts(lm, target.super_experts, seed)
        what = "super experts" if kind == "super-experts" else "control: as many random experts, same layers,"
        table = {kind: (f"prune {what} {chosen} (down projection zeroed)", lambda: prune_experts(lm, chosen))}
    known = [*MOE_ATTACKS, *(c for cs in MOE_ATTACKS.values() for c in cs)]
    if kind not in table:
        raise ValueError(f"unknown MoE attack {kind!r}; known: {', '.join(known)}")
    description, apply = table[kind]
    first = min([layer] + [l for l, _ in target.super_experts]) if kind.endswith("experts") else layer
    name = f"{kind} k={k}" if "zero" in kind or "retain" in kind else kind
    return Variant(name, description, apply, first)
