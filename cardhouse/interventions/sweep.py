"""House of Cards Fig. 4: the model's quality as k grows, for top-k zeroing and top-k retaining,
each with its random control. Rows are appended to a JSONL file as they are produced, so an
interrupted sweep resumes where it stopped, and only under the same settings (``cardhouse.journal``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..analysis.massive_weights import MassiveWeights, find_massive_weights
from ..models.loading import LoadedModel
from .variants import attack, original, run_variants

KINDS = ("topk-zero", "random-zero", "topk-retain", "random-retain")


def default_ks(size: int) -> list[int]:
    """0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, ... up to the whole layer."""
    ks, base = [0, 1, 2, 3, 5], 10
    while base < size:
        ks += [k for k in (base, 2 * base, 5 * base) if k < size]
        base *= 10
    return sorted(set(ks + [size]))


def sweep_settings(model: str, *, layer: int | None = None, seed: int = 0, **measured) -> dict:
    """What a sweep's rows depend on that is known before the weights load: the model's name, the layer,
    the seed, the massive-weight criterion, the cardhouse version and what ``measured`` says about the
    measurement (corpora, tokens, context, tasks, limit)."""
    from .. import __version__
    from ..analysis.massive_weights import MASSIVE_ABS, MASSIVE_RATIO

    return {"model": model, "layer": layer, "seed": seed, "cardhouse": __version__,
            "criterion": {"min_abs": MASSIVE_ABS, "min_ratio": MASSIVE_RATIO}, **measured}


def model_settings(lm: LoadedModel) -> dict:
    """... and what is known once they have: where they came from, their digest, BOS first or not."""
    from .weights import weights_digest

    params = [p for _, p in sorted(lm.model.named_parameters())]
    return {"source": lm.source, "weights": weights_digest(params), "bos": lm.bos_id is not None}


def read_rows(path: Path) -> list[dict]:
    """The rows of a sweep file, whatever its settings (the journal's header line is skipped)."""
    from ..journal import HEADER

    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if HEADER not in row:
            rows.append(row)
    return rows


def sweep(lm: LoadedModel, measure: Callable[[LoadedModel], dict], path: Path, *, ks: list[int] | None = None,
          layer: int | None = None, seed: int = 0, progress: bool = True, settings: dict | None = None) -> list[dict]:
    """``settings``: what ``measure`` depends on (e.g. ``Budget.to_dict()``); with the model, its weights,
    the layer and the seed it decides whether the rows already in ``path`` are resumed or refused."""
    from ..journal import Journal

    size = lm.blocks.intermediate_size(layer if layer is not None else 0)
    ks = list(dict.fromkeys(ks)) if ks is not None else None  # --ks 2,2 measures k = 2 once
    bad = [k for k in ks or [] if not 0 <= k <= size]
    if bad:
        raise ValueError(f"k values out of range 0..{size}: {bad}")
    journal = Journal(path, {**sweep_settings(lm.name, layer=layer, seed=seed, **(settings or {})),
                             **model_settings(lm)})
    kept = journal.rows()  # refuses rows measured under other settings, before any model time
    mw: MassiveWeights = find_massive_weights(lm, layer=layer, k=size)  # every index, ranked
    ks = ks if ks is not None else default_ks(size)
    done = {row["variant"] for row in kept}
    todo = [] if "original" in done else [original()]
    for k in ks:
        for kind in KINDS:
            variant = attack(lm, mw, kind, k=k, seed=seed)
            if variant.name not in done:
                todo.append(variant)
    with journal.appending() as append:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="sweep", unit="variant", disable=not progress)
        run_variants(lm, todo, measure, on_result=lambda row: (append({**row, "layer": mw.layer}), bar.update()))
        bar.close()
    return journal.rows()


def sweep_table(rows: list[dict], metric: str) -> dict[str, list[tuple[int, float]]]:
    """kind -> [(k, metric)], with the original model as k = 0 of every curve."""
    curves: dict[str, list[tuple[int, float]]] = {kind: [] for kind in KINDS}
    base = next((r for r in rows if r["variant"] == "original"), None)
    for row in rows:
        if row["variant"] == "original":
            continue
        kind, k = row["variant"].split(" k=")
        curves[kind].append((int(k), row[metric]))
    for kind in curves:
        if base is not None and not any(k == 0 for k, _ in curves[kind]):
            curves[kind].append((0, base[metric]))
        curves[kind].sort()
    return curves
