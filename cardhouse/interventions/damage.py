"""Rank super-weight candidates by the damage they do, not by their size.

Activation size does not predict damage (a large weight on a quiet channel contributes
little), so each candidate — the massive row's largest contributions W_down[r, j] * a_j,
the row's largest entry, the whole row and the whole column — is zeroed on its own and the
model measured, beside random coordinates of the same layer as controls. Optionally the most
damaging candidates are zeroed in pairs, to show interactions (zeroing one can hide
another's damage), and the super activation is restored after the super weight is zeroed
(Yu et al.): how much quality comes back says how much of the damage goes through it.
"""

from __future__ import annotations

import math
import random
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Callable, ContextManager, Sequence

from ..analysis.super_weight import SuperWeight
from ..evaluation.metrics import PPL, metric_keys, metric_of
from ..models.loading import LoadedModel
from .activations import pin_ffn_output
from .variants import Variant, original, run_variants
from .weights import zero_down_line, zero_super_weight

MAX_PAIRS = 15  # default budget for pair variants (6 candidates)
NO_DAMAGE = 1.001  # perplexity within 0.1% of the original: too little damage to say how much of it returns


@dataclass(frozen=True)
class Candidate:
    name: str  # what it is: "super weight", "contribution #2", "largest down entry", "row", "column", "control ..."
    kind: str  # "scalar", "row" or "column"
    layer: int
    row: int | None
    column: int | None
    control: bool = False
    share: float | None = None  # the scalar's share of the super activation (contribution / output)

    @property
    def label(self) -> str:
        r = ":" if self.row is None else self.row
        c = ":" if self.column is None else self.column
        return f"layer {self.layer} W_down[{r}, {c}]"

    def edit(self, lm: LoadedModel) -> ContextManager:
        if self.kind == "scalar":
            return zero_super_weight(lm, self.layer, self.row, self.column)
        return zero_down_line(lm, self.layer, row=self.row, column=self.column)


def candidates(lm: LoadedModel, sw: SuperWeight, *, n: int = 3, controls: int = 2, lines: bool = True,
               seed: int = 0) -> list[Candidate]:
    """The super weight's layer: the super weight and its row's next largest contributions (``n`` scalars
    in all), the row's largest entry, and with ``lines`` the whole row and column; ``controls`` random
    scalars (and with ``lines`` one random row and column) of the same layer as controls."""
    if n < 1 or controls < 0:
        raise ValueError(f"need at least one candidate and no negative number of controls (n={n}, controls={controls})")
    layer, row, column = sw.coordinate
    rows, columns = lm.blocks.down_weight(layer).shape
    largest = sw.largest_down_entry["column"]
    picked = [Candidate("super weight", "scalar", layer, row, column, share=sw.share)]
    for rank, c in enumerate(sw.contributions, 1):
        if len(picked) >= n:
            break
        if c["channel"] != column:
            name = f"contribution #{rank}" + (" (largest down entry)" if c["channel"] == largest else "")
            picked.append(Candidate(name, "scalar", layer, row, c["channel"], share=c["share"]))
    if all(p.column != largest for p in picked):
        picked.append(Candidate("largest down entry", "scalar", layer, row, largest,
                                share=sw.largest_down_entry["share"]))
    if lines:
        picked += [Candidate("row", "row", layer, row, None), Candidate("column", "column", layer, None, column)]
    rng = random.Random(seed)
    taken = {(p.row, p.column) for p in picked}
    for i in range(controls):
        while (coordinate := (rng.randrange(rows), rng.randrange(columns))) in taken:
            pass
        taken.add(coordinate)
        picked.append(Candidate(f"control: random weight {i + 1}", "scalar", layer, *coordinate, control=True,
                                share=None))
    if lines:
        other_row = rng.choice([r for r in range(rows) if r != row])
        other_column = rng.choice([c for c in range(columns) if c not in {p.column for p in picked}])
        picked += [Candidate("control: random row", "row", layer, other_row, None, control=True),
                   Candidate("control: random column", "column", layer, None, other_column, control=True)]
    return picked


def check_pairs(pairs: int, max_pairs: int = MAX_PAIRS) -> int:
    """The number of pair variants ``pairs`` candidates take; refuses (before any model time) past the budget."""
    if pairs < 0 or pairs == 1:
        raise ValueError(f"pairs needs 0 (none) or at least 2 candidates, got {pairs}")
    count = pairs * (pairs - 1) // 2
    if count > max_pairs:
        raise ValueError(f"pairs of {pairs} candidates take {count} variants, more than the budget of {max_pairs} "
                         f"(--max-pairs); ask for fewer candidates or raise the budget")
    return count


def damage(row: dict, base: dict) -> float:
    """Geometric mean over the corpora of perplexity / original perplexity (1 = no damage)."""
    keys = [k for k in metric_keys(base) if metric_of(k) is PPL]
    logs = []
    for k in keys:
        if not math.isfinite(row[k]):
            return math.inf
        logs.append(math.log(row[k] / base[k]))
    return math.exp(sum(logs) / len(logs)) if logs else float("nan")


def _variant(name: str, description: str, edits: Sequence[Callable[[], ContextManager]], layer: int) -> Variant:
    def apply():
        with ExitStack() as stack:  # an edit that fails to enter undoes the ones entered before it
            for edit in edits:
                stack.enter_context(edit())
            return stack.pop_all()

    return Variant(name, description, apply, layer)


def rank_damage(lm: LoadedModel, super_weights: Sequence[SuperWeight], measure: Callable[[LoadedModel], dict], *,
                n: int = 3, controls: int = 2, lines: bool = True, pairs: int = 0, max_pairs: int = MAX_PAIRS,
                restore: bool = True, seed: int = 0, extra: Sequence[Candidate] = (),
                on_result: Callable[[dict], None] | None = None) -> dict:
    """Zero each candidate of every super weight's layer on its own (and ``extra`` ones, e.g. given by the
    user) and rank them by damage; with ``restore``, zero each super weight and put its super activation
    back (Yu et al.); with ``pairs``, zero the ``pairs`` most damaging candidates two at a time.

    Returns ``{"original", "candidates" (ranked, most damaging first), "pairs", "restore"}``.
    """
    check_pairs(pairs, max_pairs)
    if not super_weights and not extra:
        raise ValueError("no super weight and no candidate given: nothing to rank")
    pool = [c for sw in super_weights
            for c in candidates(lm, sw, n=n, controls=controls, lines=lines, seed=seed + sw.layer)]
    pool += list(extra)
    singles = [_variant(f"{c.name} ({c.label})", f"zero {c.label}", [lambda c=c: c.edit(lm)], c.layer)
               for c in pool]
    restores = [_restore_variant(lm, sw) for sw in super_weights] if restore else []
    # one run: the unedited layers before the earliest edit are computed once for all of them
    rows = run_variants(lm, [original()] + singles + restores, measure, on_result=on_result)
    base, measured, restored = rows[0], rows[1:1 + len(singles)], rows[1 + len(singles):]
    ranked = [{**asdict(c), "label": c.label, **_numbers(row), "damage": damage(row, base)}
              for c, row in zip(pool, measured)]
    ranked.sort(key=lambda r: -r["damage"])
    out = {"original": _numbers(base), "candidates": ranked, "pairs": [], "restore": []}
    zeroed = {(r["layer"], r["row"], r["column"]): r for r in ranked if r["name"] == "super weight"}
    for sw, row in zip(super_weights, restored):
        out["restore"].append(_returned(sw, zeroed[sw.coordinate], row, base))
    if pairs:
        out["pairs"] = _pairs(lm, pool, ranked, pairs, measure, base, on_result)
    return out


def _numbers(row: dict) -> dict:
    """The measured metrics of a results row (not the variant's own fields)."""
    return {k: row[k] for k in metric_keys(row)}


def _pairs(lm, pool, ranked, pairs, measure, base, on_result) -> list[dict]:
    """Zero the ``pairs`` most damaging candidates two at a time."""
    top = [r for r in ranked if not r["control"]][:pairs]
    by_label = {c.label: c for c in pool}
    variants, meta = [], []
    for i, a in enumerate(top):
        for b in top[i + 1:]:
            ca, cb = by_label[a["label"]], by_label[b["label"]]
            variants.append(_variant(f"{a['name']} + {b['name']}", f"zero {ca.label} and {cb.label}",
                                     [lambda c=ca: c.edit(lm), lambda c=cb: c.edit(lm)], min(ca.layer, cb.layer)))
            meta.append((a, b))
    out = []
    for (a, b), row in zip(meta, run_variants(lm, variants, measure, on_result=on_result)):
        both = damage(row, base)
        # > 0: the pair does more than the two apart would (log scale); < 0: one hides the other's damage
        finite = all(math.isfinite(x) and x > 0 for x in (both, a["damage"], b["damage"]))
        out.append({"a": a["label"], "b": b["label"], "a_name": a["name"], "b_name": b["name"], **_numbers(row),
                    "damage": both, "damage_a": a["damage"], "damage_b": b["damage"],
                    "log_excess": math.log(both) - math.log(a["damage"]) - math.log(b["damage"]) if finite else None})
    return out


def _restore_variant(lm: LoadedModel, sw: SuperWeight) -> Variant:
    """Yu et al.: zero the super weight, then pin the down projection's output at [carrier position, row]
    to its original value (the super activation)."""
    label, position = f"layer {sw.layer} W_down[{sw.row}, {sw.column}]", sw.carrier["position"]
    return _variant(f"super weight zeroed, super activation restored ({label})",
                    f"zero {label}, then set the FFN output at [position {position}, {sw.row}] to {sw.output:.6g}",
                    [lambda: zero_super_weight(lm, sw.layer, sw.row, sw.column),
                     lambda: pin_ffn_output(lm, sw.layer, sw.row, sw.output, position)], sw.layer)


def _returned(sw: SuperWeight, zeroed: dict, restored: dict, base: dict) -> dict:
    """How much of the super weight's damage comes back with the super activation (log scale, 1 = all)."""
    dz, dr = zeroed["damage"], damage(restored, base)
    # undefined where zeroing did (almost) nothing: there is no damage to bring back
    returned = (math.log(dz) - math.log(dr)) / math.log(dz) if math.isfinite(dz) and dz > NO_DAMAGE and \
        math.isfinite(dr) and dr > 0 else None
    return {"layer": sw.layer, "row": sw.row, "column": sw.column, "position": sw.carrier["position"],
            "super_activation": sw.output, "zeroed": _numbers(zeroed),
            "restored": _numbers(restored), "damage_zeroed": dz, "damage_restored": dr, "returned": returned}
