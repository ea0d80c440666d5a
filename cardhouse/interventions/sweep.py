"""House of Cards Fig. 4: the model's quality as k grows, for every registered attack that takes k
(top-k zeroing and retaining), each with its random control.

``sweep`` is pure: it measures the variants and returns the rows. Resuming is an optional sink:
a ``cardhouse.journal.Journal`` appends each row to a JSONL file as it is produced, and a sweep given
one skips the variants already in it, so an interrupted sweep goes on where it stopped; the journal
holds the settings the rows were measured under and refuses to resume under other ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol

from tqdm.auto import tqdm

from .._version import __version__
from ..analysis.criterion import Criterion
from ..analysis.massive_weights import MassiveWeights, find_massive_weights
from ..evaluation.metrics import ACC, ACC_MEAN
from ..journal import HEADER, Journal
from ..models.loading import LoadedModel
from ..models.streaming import streamer_of
from .variants import ATTACKS, Variant, attack, original, run_variants, sweep_attacks
from .weights import weights_digest


def default_ks(size: int) -> list[int]:
    """0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, ... up to the whole layer."""
    ks, base = [0, 1, 2, 3, 5], 10
    while base < size:
        ks += [k for k in (base, 2 * base, 5 * base) if k < size]
        base *= 10
    return sorted(set(ks + [size]))


def sweep_variants(lm: LoadedModel, mw: MassiveWeights, ks: list[int], seed: int = 0) -> list[Variant]:
    """The original model, then every k-taking attack (and its control) at each k."""
    size = lm.blocks.intermediate_size(mw.layer, mw.expert)  # the carrier expert's width (a shared one is wider)
    ks = list(dict.fromkeys(ks))  # --ks 2,2 measures k = 2 once
    bad = [k for k in ks if not 0 <= k <= size]
    if bad:
        raise ValueError(f"k values out of range 0..{size}: {bad}")
    return [original()] + [attack(lm, mw, kind, k=k, seed=seed) for k in ks for kind in sweep_attacks()]


class Sink(Protocol):
    def rows(self) -> list[dict]: ...
    def append(self, row: dict) -> None: ...


def sweep(lm: LoadedModel, massive_weights: MassiveWeights, measure: Callable[[LoadedModel], dict],
          ks: list[int] | None = None, *, seed: int = 0, sink: Sink | None = None, progress: bool = True) -> list[dict]:
    """Measure the sweep's variants; with a ``sink``, skip those it holds and give it each new row.

    ``massive_weights`` must rank enough indices for the largest k (``find_massive_weights(lm,
    k=size)`` ranks them all). Returns every row, the sink's earlier ones first.
    """
    ks = ks if ks is not None else default_ks(massive_weights.intermediate_size)
    kept = sink.rows() if sink is not None else []
    done = {row["variant"] for row in kept}
    todo = [v for v in sweep_variants(lm, massive_weights, ks, seed) if v.name not in done]
    new: list[dict] = []
    with tqdm(total=len(todo), desc="sweep", unit="variant", disable=not progress) as bar:
        def on_result(row: dict) -> None:
            new.append(row)
            if sink is not None:
                sink.append(row)
            bar.update()

        run_variants(lm, todo, measure, on_result=on_result, same_weights_once=True)
    return kept + new


def sweep_settings(model: str, *, layer: int | None = None, seed: int = 0, criterion: Criterion = Criterion(),
                   **measured) -> dict:
    """What a sweep's rows depend on that is known before the weights load: the model's name, the layer,
    the seed, the massive criterion, the cardhouse version and what ``measured`` says about the
    measurement (corpora, tokens, context, tasks, limit)."""
    return {"model": model, "layer": layer, "seed": seed, "cardhouse": __version__, "criterion": criterion.to_dict(),
            **measured}


def model_settings(lm: LoadedModel) -> dict:
    """... and what is known once they have: where they came from, their digest, BOS first or not."""
    params = [p for _, p in sorted(lm.model.named_parameters()) if not p.is_meta]
    settings = {"source": lm.source, "weights": weights_digest(params), "bos": lm.bos_id is not None}
    streamer = streamer_of(lm.model)  # its blocks stay on disk: their files stand for them
    return settings if streamer is None else {**settings, "checkpoint": streamer.fingerprint()}


def resumable_sweep(lm: LoadedModel, measure: Callable[[LoadedModel], dict], path: Path, *,
                    ks: list[int] | None = None, layer: int | None = None, seed: int = 0,
                    progress: bool = True, criterion: Criterion = Criterion(), settings: dict | None = None
                    ) -> list[dict]:
    """The CLI's sweep: search every index of the layer, then sweep with ``path`` (JSONL) as the resume sink.

    ``settings``: what ``measure`` depends on (e.g. ``Budget.to_dict()``); with the model, its weights, the
    layer, the seed, the criterion and the cardhouse version they decide whether the rows in ``path`` are
    resumed or refused (``cardhouse.journal.SettingsMismatch``, raised before anything is measured)."""
    journal = Journal(path, {**sweep_settings(lm.name, layer=layer, seed=seed, criterion=criterion,
                                              **(settings or {})), **model_settings(lm)})
    journal.rows()  # refuse rows measured under other settings before the search
    size = lm.blocks.intermediate_size(layer if layer is not None else 0)
    mw = find_massive_weights(lm, layer=layer, k=size, criterion=criterion)  # every index, ranked
    return sweep(lm, mw, measure, ks, seed=seed, sink=journal, progress=progress)


def read_rows(path: Path) -> list[dict]:
    """The rows of a sweep file, whatever its settings (the header line is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if HEADER not in row:
            rows.append(row)
    return rows


def sweep_table(rows: list[dict], metric: str) -> dict[str, list[tuple[int, float]]]:
    """attack -> [(k, metric)] for every k-taking attack, with the original model as k = 0 of every curve whose
    k = 0 edits nothing (not retaining: keeping no row zeroes the layer, measured only when asked for)."""
    kinds = sweep_attacks()
    curves: dict[str, list[tuple[int, float]]] = {kind: [] for kind in kinds}
    base = next((r for r in rows if r["kind"] == "original"), None)
    for row in rows:
        if row["kind"] in curves:
            curves[row["kind"]].append((row["k"], row[metric]))
    for kind in curves:
        if base is not None and ATTACKS[kind].unedited_at_0 and not any(k == 0 for k, _ in curves[kind]):
            curves[kind].append((0, base[metric]))
        curves[kind].sort()
    return curves


def task_table(rows: list[dict], tasks: list[str]) -> str:
    """The zero-shot accuracy of every variant per task and their mean, as a Markdown table."""
    head = ["variant", *tasks, "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [ACC.format(row.get(ACC.key(t))) for t in tasks] + [ACC_MEAN.format(row.get(ACC_MEAN.key()))]
        lines.append("| " + " | ".join([row["variant"]] + cells) + " |")
    return "\n".join(lines) + "\n"
