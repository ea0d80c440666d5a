"""House of Cards Fig. 4: the model's quality as k grows, for top-k zeroing and top-k retaining,
each with its random control. Rows are appended to a JSONL file as they are produced, so an
interrupted sweep resumes where it stopped.
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


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interruption: that variant is redone
            break
    return rows


def sweep(lm: LoadedModel, measure: Callable[[LoadedModel], dict], path: Path, *, ks: list[int] | None = None,
          layer: int | None = None, seed: int = 0, progress: bool = True) -> list[dict]:
    size = lm.blocks.intermediate_size(layer if layer is not None else 0)
    mw: MassiveWeights = find_massive_weights(lm, layer=layer, k=size)  # every index, ranked
    ks = ks if ks is not None else default_ks(size)
    bad = [k for k in ks if not 0 <= k <= size]
    if bad:
        raise ValueError(f"k values out of range 0..{size}: {bad}")
    kept = read_rows(path)
    if path.exists():  # drop a line cut by an interruption before appending to the file
        path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    done = {row["variant"] for row in kept}
    todo = [] if "original" in done else [original()]
    for k in ks:
        for kind in KINDS:
            variant = attack(lm, mw, kind, k=k, seed=seed)
            if variant.name not in done:
                todo.append(variant)
    with path.open("a") as out:
        def append(row):
            out.write(json.dumps({**row, "layer": mw.layer}) + "\n")
            out.flush()

        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="sweep", unit="variant", disable=not progress)
        run_variants(lm, todo, measure, on_result=lambda row: (append(row), bar.update()))
        bar.close()
    return read_rows(path)


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
