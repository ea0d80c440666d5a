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
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch

from ..analysis.massive_weights import find_massive_weights
from ..analysis.moe import FRACTION, PERCENTILE, analyze_moe
from ..models.adapters import SHARED
from ..models.loading import LoadedModel
from ..models.routing import normalises, routing_of
from .variants import AttackSpec, Edit, Variant, original
from .weights import check_indices, overwrite_slices, random_indices, retain_rows, zero_rows


def _check_experts(lm: LoadedModel, layer: int, experts: Sequence[int]) -> list[int]:
    blocks = lm.blocks
    routing_of(blocks.adapter)
    blocks.check_layer(layer)
    if not blocks.is_moe_layer(layer):
        raise ValueError(f"layer {layer} is a dense FFN layer: it has no experts (MoE layers: {blocks.moe_layers})")
    if SHARED in experts:
        raise ValueError("the shared expert is not routed: it cannot be routed around or pruned as an expert")
    experts = [blocks.check_expert(layer, e) for e in experts]
    return check_indices(experts, blocks.n_experts(layer), f"layer {layer} expert")


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
        new_weights, new_chosen = routing.route(module, logits, chosen.shape[-1], norm, experts)
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
        down = lm.blocks.mlp_part(layer, "down")
        edits.append((down, 0, torch.tensor(chosen, device=down.device), 0.0))
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


@dataclass(frozen=True)
class ExpertTarget:
    """What the MoE attacks aim at, and their seeded controls: the carrier's expert and its massive rows
    in one layer, and the super experts (``analysis.moe``)."""

    lm: LoadedModel
    layer: int
    expert: int | str  # a routed expert, or SHARED
    top: list[int]  # the attacked rows of that expert
    random: list[int]  # as many random rows of the same expert, avoiding ``top`` while there are enough others
    other: int  # another routed expert of the layer: the same rows there are a control
    super_experts: list[tuple[int, int]]
    random_experts: list[tuple[int, int]]  # as many random experts, in the same layers

    @classmethod
    def build(cls, lm: LoadedModel, mw, *, k: int | None = None, expert: int | str | None = None,
              indices: list[int] | None = None, super_experts=(), seed: int = 0) -> "ExpertTarget":
        """From ``find_massive_weights``' result; ``expert``/``indices`` override the carrier's expert and rows."""
        if mw.expert is None and expert is None:
            raise ValueError(f"the massive-weight layer {mw.layer} is not a Mixture-of-Experts layer: "
                             "expert attacks need the carrier's expert (give the layer of an MoE layer)")
        layer = mw.layer
        expert = mw.expert if expert is None else lm.blocks.check_expert(layer, expert)
        size = lm.blocks.intermediate_size(layer, expert)
        top = check_indices(indices, size, f"expert {expert} intermediate index") if indices else mw.indices[:k]
        random_rows = random_indices(size, len(top), exclude=top if 2 * len(top) <= size else (), seed=seed)
        supers = [tuple(e) for e in super_experts]
        return cls(lm, layer, expert, top, random_rows, other_expert(lm, layer, expert, seed), supers,
                   random_experts(lm, supers, seed) if supers else [])


def _rows(rows, retain: bool, what: str = ""):
    def edit(t: ExpertTarget) -> Edit:
        chosen = rows(t)
        # the rows are ranked in the carrier's expert; another expert may be narrower (a shared expert's rows)
        check_indices(chosen, t.lm.blocks.intermediate_size(t.layer, t.expert), f"expert {t.expert} intermediate index")
        apply = retain_rows if retain else zero_rows
        verb = "keep only" if retain else "zero"
        return Edit(f"{what}{verb} W_up/W_gate rows {chosen} of expert {t.expert}, layer {t.layer}",
                    lambda: apply(t.lm, t.layer, chosen, expert=t.expert), chosen)
    return edit


def _ablate(what: str = ""):
    def edit(t: ExpertTarget) -> Edit:
        return Edit(f"{what}route around expert {t.expert} of layer {t.layer} (the others share its probability)",
                    lambda: route_around(t.lm, t.layer, [t.expert]), [])
    return edit


def _prune(experts, what: str = ""):
    def edit(t: ExpertTarget) -> Edit:
        chosen = experts(t)
        if not chosen:
            raise ValueError("no super experts were flagged: nothing to prune (lower --percentile or --fraction)")
        return Edit(f"{what}prune experts {chosen} (layer, expert): down projection zeroed",
                    lambda: prune_experts(t.lm, chosen), [])
    return edit


def _top(t):
    return t.top


def _random(t):
    return t.random


CARRIER, OTHER, SUPER_EXPERTS = "carrier", "other", "super-experts"  # what an MoE attack aims at


@dataclass(frozen=True)
class ExpertAttackSpec(AttackSpec):
    """An MoE attack (or control): ``aims_at`` the carrier's expert, another expert of the layer (a control: the
    same edit on an expert that carries nothing), or the super experts (the flagged ones or as many random ones,
    in their own layers: no one expert, and nothing to attack where none is flagged); ``controls``: an attack's
    controls in the order of a results table."""

    aims_at: str = CARRIER
    controls: tuple[str, ...] = ()


# The MoE attacks, registered like the dense ones (``variants.AttackSpec``) in a registry of their own:
# they need an MoE model and targets the dense attacks do not have (another expert, the super experts), so
# ``attack all``, the sweep and the report, which read ``ATTACKS`` for any model, leave them out.
EXPERT_ATTACKS: dict[str, ExpertAttackSpec] = {}
MOE_ATTACKS: dict[str, tuple[str, ...]] = {}  # attack -> its controls, in the order of a results table (derived)


def register_expert_attack(spec: ExpertAttackSpec) -> ExpertAttackSpec:
    EXPERT_ATTACKS[spec.name] = spec
    controls = {c for s in EXPERT_ATTACKS.values() for c in s.controls}
    MOE_ATTACKS.clear()
    MOE_ATTACKS.update({name: s.controls for name, s in EXPERT_ATTACKS.items() if name not in controls})
    return spec


for _spec in (
    ExpertAttackSpec("expert-topk-zero", "zero the top-k massive rows inside the carrier's expert",
                     _rows(_top, False), controls=("expert-random-zero", "expert-other-zero")),
    ExpertAttackSpec("expert-random-zero", "control: zero k random rows of the same expert",
                     _rows(_random, False, "control: "), style="o:"),
    ExpertAttackSpec("expert-other-zero", "control: zero the same rows of another expert of the layer",
                     _rows(_top, False, "control: "), style="o--", aims_at=OTHER),
    ExpertAttackSpec("expert-topk-retain", "keep only the top-k rows of the carrier's expert",
                     _rows(_top, True), style="s-", controls=("expert-random-retain", "expert-other-retain")),
    ExpertAttackSpec("expert-random-retain", "control: keep only k random rows of the same expert",
                     _rows(_random, True, "control: "), style="s:"),
    ExpertAttackSpec("expert-other-retain", "control: keep only the same rows in another expert",
                     _rows(_top, True, "control: "), style="s--", aims_at=OTHER),
    ExpertAttackSpec("expert-ablate", "route around the carrier's expert (renormalise the router over the others)",
                     _ablate(), takes_k=False, controls=("random-expert-ablate",)),
    ExpertAttackSpec("random-expert-ablate", "control: route around another expert of the layer",
                     _ablate("control: "), takes_k=False, aims_at=OTHER),
    ExpertAttackSpec("super-experts", "prune the super experts (Su et al.)", _prune(lambda t: t.super_experts),
                     takes_k=False, aims_at=SUPER_EXPERTS, controls=("random-experts",)),
    ExpertAttackSpec("random-experts", "control: prune as many random experts, in the same layers",
                     _prune(lambda t: t.random_experts, "control: "), takes_k=False, aims_at=SUPER_EXPERTS),
):
    register_expert_attack(_spec)


def expert_attack(target: ExpertTarget, kind: str, *, seed: int | None = None) -> Variant:
    """One MoE attack or control of ``EXPERT_ATTACKS`` as a ``Variant``."""
    if kind not in EXPERT_ATTACKS:
        raise ValueError(f"unknown MoE attack {kind!r}; known: {', '.join(EXPERT_ATTACKS)}")
    spec = EXPERT_ATTACKS[kind]
    aimed = replace(target, expert=target.other) if spec.aims_at == OTHER else target
    edit = spec.edit(aimed)
    whole = spec.aims_at == SUPER_EXPERTS  # experts in several layers: the first one changed, no one expert
    layers = [target.layer] + [l for l, _ in target.super_experts + target.random_experts]
    control = next((a for a, controls in MOE_ATTACKS.items() if kind in controls), None)
    return Variant(kind, edit.description, edit.apply, min(layers) if whole else target.layer,
                   len(target.top) if spec.takes_k else None, None if whole else aimed.expert, tuple(edit.indices),
                   control, seed)


def moe_variants(lm: LoadedModel, kind: str, *, k: int = 5, layer: int | None = None, expert: int | str | None = None,
                 indices: list[int] | None = None, seed: int = 0, prompts: list[str] | str = "builtin",
                 percentile: float | None = None, fraction: float | None = None, criterion=None):
    """The unedited model, then each MoE attack of ``kind`` (one of ``MOE_ATTACKS``, or ``"moe"`` for all)
    followed by its controls, as ``Variant`` s; and what they aim at (``ExpertTarget``, the massive weights).

    ``layer``/``expert``/``indices`` override the detected massive-weight layer, the carrier's expert and
    its top-k rows; the super experts are found on ``prompts`` with Su et al.'s rule.
    """
    if kind != "moe" and kind not in MOE_ATTACKS:
        raise ValueError(f"unknown MoE attack {kind!r}; known: {', '.join(MOE_ATTACKS)}, moe")
    routing_of(lm.blocks.adapter)  # a dense model or an undescribed router: a clear error before any forward pass
    kinds = list(MOE_ATTACKS) if kind == "moe" else [kind]
    if layer is not None:
        lm.blocks.check_layer(layer)
    mw = find_massive_weights(lm, prompts, k=max(k, len(indices or [])), layer=layer,
                              **({"criterion": criterion} if criterion is not None else {}))
    flagged = []
    if any(EXPERT_ATTACKS[a].aims_at == SUPER_EXPERTS for a in kinds):
        flagged = analyze_moe(lm, prompts, percentile=PERCENTILE if percentile is None else percentile,
                              fraction=FRACTION if fraction is None else fraction, progress=False,
                              massive_weights=False).flagged
        if kind == "moe" and not flagged:  # nothing to prune; asked for alone, it is an error (``_prune``)
            kinds = [a for a in kinds if EXPERT_ATTACKS[a].aims_at != SUPER_EXPERTS]
    target = ExpertTarget.build(lm, mw, k=k, expert=expert, indices=indices, super_experts=flagged, seed=seed)
    variants = [original()] + [expert_attack(target, kd, seed=seed) for a in kinds for kd in (a, *MOE_ATTACKS[a])]
    return variants, target, mw
