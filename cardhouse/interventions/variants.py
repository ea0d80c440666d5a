"""The papers' model variants as typed values, the attack registry that builds them, and a runner.

A ``Variant`` edits the model on entry (``apply()`` is a context manager) and restores it
bit-identically on exit, so one loaded model serves every row of a results table. What it is
travels as fields (kind, k, layer, expert, indices, control_of, seed), never re-parsed from its
name. ``run_variants`` measures each one and checks with a digest of every parameter after them.

Every weight attack is one ``AttackSpec`` in ``ATTACKS`` (registered with ``register_attack``):
the CLI's ``attack all``, the sweep, the report's tables and the plots read the registry, so
adding an attack is one entry.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable, NamedTuple

from ..analysis.massive_activations import ScanResult
from ..analysis.massive_weights import MassiveWeights
from ..capture.reuse import reuse_prefix
from ..models.loading import LoadedModel
from ..models.streaming import streamer_of
from .activations import massive_means, set_activations
from .weights import check_indices, random_indices, retain_rows, weights_digest, zero_rows, zero_super_weight

# Sun et al.'s activation interventions: kind -> (what the massive activations are set to, their values from the
# per-dim means over the scan's prompts); adding one is one entry
INTERVENTIONS: dict[str, tuple[str, Callable[[dict[int, float]], dict[int, float]]]] = {
    "set-zero": ("zero", lambda means: {dim: 0.0 for dim in means}),
    "set-mean": ("mean", lambda means: means),
}


@dataclass(frozen=True)
class Variant:
    """One edit of the model. ``name`` ("topk-zero k=2", "super-weight", "original") labels rows;
    the fields say what it is."""

    kind: str  # "original", a registered attack, an intervention, or a caller's own kind
    description: str
    apply: Callable[[], ContextManager] = field(compare=False, repr=False)
    layer: int | None = None  # the first layer whose computation it changes (None: none)
    k: int | None = None  # rows attacked, for attacks that take k
    expert: int | None = None
    indices: tuple[int, ...] | None = None  # the rows (or W_down column) it edits
    control_of: str | None = None  # the attack this variant is the random control of
    seed: int | None = None
    on: str | None = None  # which copy of the model it edits when not the loaded one (e.g. "merged")
    # apply() edits the weights of block ``layer`` only (a streamed model makes the edit each time that block is
    # loaded); False: it attaches hooks, entered around the whole measurement
    edits_block: bool = True

    @property
    def name(self) -> str:
        name = self.kind if self.k is None else f"{self.kind} k={self.k}"
        return name if self.on is None else f"{name} {self.on}"

    @property
    def first_layer(self) -> int | None:
        return self.layer

    def to_dict(self) -> dict:
        """The row fields a results table carries for this variant (``apply`` left out)."""
        row = {"variant": self.name, "kind": self.kind, "k": self.k, "layer": self.layer, "expert": self.expert,
               "indices": list(self.indices) if self.indices is not None else None, "control_of": self.control_of,
               "seed": self.seed, "description": self.description}
        return row if self.on is None else {**row, "on": self.on}


def original() -> Variant:
    return Variant("original", "unedited model", nullcontext)


# ---- the attack registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What an attack edit is built from: the layer, the rows ranked by activation, and the seeded controls."""

    lm: LoadedModel
    layer: int
    expert: int | None
    k: int
    top: list[int]  # the attacked rows (top-k, or the user's indices)
    random: list[int]  # k seeded random rows avoiding ``top`` while there are enough others
    # (row, column) of W_down (Yu et al.: output spike x input spike) and a seeded random W_down column other than
    # its; None where only the row attacks are built (fine-tuning's, on the rows MacDrop dropped)
    super_weight: tuple[int, int] | None = None
    random_column: int | None = None
    largest_down_entry: tuple[int, int] | None = None  # the largest |W_down[dim, i]| over the top-k


class Edit(NamedTuple):
    description: str
    apply: Callable[[], ContextManager]
    indices: list[int]


@dataclass(frozen=True)
class AttackSpec:
    """One weight attack: its name, what it does, its random control, and how to build the edit."""

    name: str
    description: str
    edit: Callable[[Target], Edit]
    control: str | None = None  # the registered attack that is this one's random control
    takes_k: bool = True  # attacks k rows (swept over k; named "NAME k=K")
    unedited_at_0: bool = True  # k = 0 edits nothing (zeroing no row); retaining no row zeroes them all
    style: str = "o-"  # matplotlib line style in the sweep plot


ATTACKS: dict[str, AttackSpec] = {}


def register_attack(spec: AttackSpec) -> AttackSpec:
    ATTACKS[spec.name] = spec
    return spec


def get_attack(name: str) -> AttackSpec:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    return ATTACKS[name]


def control_of(name: str) -> str | None:
    """The attack whose random control ``name`` is (None if it is no attack's control)."""
    return next((spec.name for spec in ATTACKS.values() if spec.control == name), None)


def sweep_attacks() -> list[str]:
    """The attacks that take k, in registry order (each followed by its control): the sweep's curves."""
    return [name for name, spec in ATTACKS.items() if spec.takes_k]


def _row_edit(rows: Callable[[Target], list[int]], editor: Callable, what: str) -> Callable[[Target], Edit]:
    """An edit of W_up/W_gate rows ``rows(target)`` by ``editor`` (``zero_rows`` or ``retain_rows``)."""
    def edit(t: Target) -> Edit:
        chosen = rows(t)
        return Edit(what.format(rows=chosen, layer=t.layer), lambda: editor(t.lm, t.layer, chosen, expert=t.expert),
                    chosen)
    return edit


ZERO = "zero W_up/W_gate rows {rows} of layer {layer}"
RETAIN = "keep only rows {rows} of layer {layer}'s W_up/W_gate"


def _down_entry(column: Callable[[Target], int], what: str) -> Callable[[Target], Edit]:
    def edit(t: Target) -> Edit:
        row, col = t.super_weight[0], column(t)
        return Edit(f"{what}zero W_down[{row}, {col}] of layer {t.layer}",
                    lambda: zero_super_weight(t.lm, t.layer, row, col, expert=t.expert), [col])
    return edit


def _largest_down_entry(t: Target) -> Edit:
    row, col = t.largest_down_entry
    same = " (here the super weight itself)" if (row, col) == t.super_weight else ""  # Gemma-3's layer 8
    return Edit(f"zero the largest down entry W_down[{row}, {col}] of layer {t.layer}{same}",
                lambda: zero_super_weight(t.lm, t.layer, row, col, expert=t.expert), [col])


def _top(t: Target) -> list[int]:
    return t.top


def _random(t: Target) -> list[int]:
    return t.random


for _spec in (
    AttackSpec("topk-zero", "zero the W_up/W_gate rows of the top-k massive indices", _row_edit(_top, zero_rows, ZERO),
               control="random-zero", style="o-"),
    AttackSpec("random-zero", "control: zero k random rows", _row_edit(_random, zero_rows, "control: " + ZERO),
               style="o:"),
    AttackSpec("topk-retain", "keep only the top-k rows, zero every other row of the layer",
               _row_edit(_top, retain_rows, RETAIN), control="random-retain", style="s-", unedited_at_0=False),
    AttackSpec("random-retain", "control: keep only k random rows", _row_edit(_random, retain_rows, "control: " + RETAIN),
               style="s:", unedited_at_0=False),
    AttackSpec("super-weight", "zero the super weight (Yu et al.): W_down[output spike, input spike] of layer l",
               _down_entry(lambda t: t.super_weight[1], ""), control="random-weight", takes_k=False),
    AttackSpec("largest-down-entry", "zero the largest W_down[dim, i] over the top-k indices (not the super weight)",
               _largest_down_entry, takes_k=False),
    AttackSpec("random-weight", "control: zero another entry of the same W_down row",
               _down_entry(lambda t: t.random_column, "control: "), takes_k=False),
):
    register_attack(_spec)


def attack(lm: LoadedModel, mw: MassiveWeights, kind: str, *, k: int | None = None,
           indices: list[int] | None = None, seed: int = 0) -> Variant:
    """A registered weight attack on layer ``mw.layer`` (``indices`` overrides the top-k)."""
    spec = get_attack(kind)
    layer, expert = mw.layer, mw.expert
    size = lm.blocks.intermediate_size(layer, expert)  # the carrier expert's width (a shared one is wider)
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
    sw = (mw.super_weight["row"], mw.super_weight["column"])
    target = Target(lm, layer, expert, k, indices,
                    # the control avoids the massive rows while there are enough others (not for k > size / 2)
                    random_indices(size, k, exclude=indices if 2 * k <= size else (), seed=seed),
                    sw, random_indices(size, 1, exclude=[sw[1]], seed=seed)[0],
                    (mw.largest_down_entry["row"], mw.largest_down_entry["column"]))
    edit = spec.edit(target)
    return Variant(kind, edit.description, edit.apply, layer, k if spec.takes_k else None, expert,
                   tuple(edit.indices), control_of(kind), seed)


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
    what, values_of = INTERVENTIONS[kind]
    values = values_of(means)
    # carriers: entries above the scan's threshold at that layer, i.e. the massive activations themselves
    threshold = scan.layers[first]["threshold"]
    where = "every massive layer" if every_layer else f"layer {first}"
    return Variant(kind, f"set dims {sorted(values)} to {what} at {where} where |a| > {threshold:.0f}",
                   lambda: set_activations(lm, layers, values, threshold), min(layers),
                   indices=tuple(sorted(values)), edits_block=False)


def applied(lm: LoadedModel, variant: Variant) -> ContextManager:
    """``variant.apply()``; on a streamed model a block edit is made each time its block is loaded."""
    streamer = streamer_of(lm.model)
    if streamer is not None and variant.edits_block and variant.layer is not None:
        return streamer.editing(variant.layer, variant.apply)
    return variant.apply()


def _block_digest(lm: LoadedModel, layer: int) -> str:
    return weights_digest([p for p in lm.blocks.layers[layer].parameters() if not p.is_meta])


def _weights_key(lm: LoadedModel, variant: Variant, unedited: dict[int, str]) -> tuple | None:
    """What the weights are under ``variant`` (applied): ("unedited",) when its block's bytes are the original
    ones (top-k zeroing at k = 0), (layer, digest of the block) otherwise; None where the bytes do not say
    it all (hooks, a streamed model whose edits are made as its blocks load)."""
    if variant.layer is None and variant.edits_block:
        return ("unedited",)
    if not variant.edits_block or variant.layer is None or variant.layer not in unedited:
        return None
    digest = _block_digest(lm, variant.layer)
    return ("unedited",) if digest == unedited[variant.layer] else (variant.layer, digest)


def run_variants(lm: LoadedModel, variants: Iterable[Variant], measure: Callable[[LoadedModel], dict],
                 on_result: Callable[[dict], None] | None = None, reuse: bool = True,
                 same_weights_once: bool = False) -> list[dict]:
    """Measure each variant: one row ``{**variant.to_dict(), **measure(lm)}`` each; then check that the
    weights are back to the original bits.

    With ``reuse``, the layers before the first one any variant changes run once per input
    (``capture.reuse.reuse_prefix``). Hashing every parameter costs seconds, so it is done
    once for the whole run; the unit tests check each edit on its own.

    ``same_weights_once``: a variant whose weights are bit-identical to an earlier one's gets that one's
    numbers without a measurement (``measure`` must be deterministic). A k-sweep has such variants: at
    k = 0 zeroing edits nothing (the original model) and retaining keeps nothing, whether its rows are the
    top-k or random ones; at k = the whole layer, the other way round. Told by a digest of the edited
    block only (a block edit changes nothing else; 14 MB on SmolLM2, milliseconds).
    """
    variants = list(variants)
    params = [p for p in lm.model.parameters() if not p.is_meta]  # a streamed model's blocks are read afresh
    before = weights_digest(params)
    changed = [v.layer for v in variants if v.layer is not None]
    eligible = same_weights_once and streamer_of(lm.model) is None
    unedited = {layer: _block_digest(lm, layer) for layer in set(changed)} if eligible else {}
    measured: dict[tuple, dict] = {}
    results = []
    with reuse_prefix(lm, min(changed)) if reuse and changed else nullcontext():
        for variant in variants:
            with applied(lm, variant):
                key = _weights_key(lm, variant, unedited) if eligible else None
                numbers = measured[key] if key in measured else measure(lm)
            if key is not None:
                measured.setdefault(key, numbers)
            row = {**variant.to_dict(), **numbers}
            results.append(row)
            if on_result:
                on_result(row)
    if weights_digest(params) != before:
        raise RuntimeError("the weights were not restored after the variants")
    return results
