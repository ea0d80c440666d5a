"""``cardhouse super-weight``: find the super weights as Yu et al. do, and rank candidates by their damage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..validation import validate
from .common import (TOP_HELP, BosOpt, CorpusOpt, ModelOpt, OutOpt, PromptsOpt, SeedOpt, app, batch_size_opt,
                     clear_errors, console, context_opt, json_opt, limit_opt, load, max_tokens_opt, writable_folder)


def parse_weights(texts: list[str]) -> list[tuple[int, int, int]]:
    """``["11:507:1229"]`` -> ``[(11, 507, 1229)]`` (ranges are checked once the model is loaded)."""
    out = []
    for text in texts:
        parts = text.split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            out.append(tuple(int(p) for p in parts))
        except ValueError:
            raise ValueError(f"--weight takes LAYER:ROW:COLUMN (a W_down coordinate, e.g. 11:507:1229), got {text!r}"
                             ) from None
    return out


@app.command("super-weight")
def super_weight_cmd(
        model: str = ModelOpt, prompts: str = PromptsOpt,
        limit: Optional[int] = limit_opt(None),
        ratio: float = typer.Option(20.0, help="a layer spikes when its largest |input| and |output| of W_down are "
                                               "both above this times the median over layers"),
        top: int = typer.Option(10, help=f"{TOP_HELP} (contributions W_down[r, j] * a_j per super weight)"),
        damage: bool = typer.Option(True, "--damage/--no-damage", help="zero each candidate and measure perplexity"),
        candidates: int = typer.Option(3, help="scalar candidates per super weight: the row's largest contributions"),
        controls: int = typer.Option(2, help="random weights of the same layer zeroed as controls"),
        lines: bool = typer.Option(True, "--lines/--no-lines", help="also zero the whole W_down row and column "
                                                                    "(and a random row and column as controls)"),
        pairs: int = typer.Option(0, help="zero the N most damaging candidates two at a time (N(N-1)/2 variants)"),
        max_pairs: int = typer.Option(15, help="the most pair variants --pairs may ask for"),
        restore: bool = typer.Option(True, "--restore/--no-restore",
                                     help="also zero the super weight and restore the super activation (Yu et al.)"),
        weight: list[str] = typer.Option([], "--weight", help="a W_down coordinate LAYER:ROW:COLUMN to rank as well "
                                                              "(repeatable)"),
        seed: int = SeedOpt, corpus: list[str] = CorpusOpt, max_tokens: int = max_tokens_opt(2044),
        context: int = context_opt(512),
        batch_size: int = batch_size_opt(8, "prompts, of the detection"),
        bos: Optional[bool] = BosOpt, out: Path = OutOpt,
        json_path: Optional[Path] = json_opt("OUT/super_weight.json")):
    """Find the super weights (Yu et al. 2024: where W_down's input and output spikes meet), each channel's
    contribution to the super activation, and the damage of zeroing each candidate against random controls."""
    from ..analysis.super_weight import check_coordinate, check_dense_down, find_super_weights
    from ..evaluation.measure import Budget, measurer
    from ..models.offload import shapes_only
    from ..interventions.damage import Candidate, check_pairs, rank_damage
    from ..reports.super_weight import plot_super_weights, super_weight_tables
    from ..results import write_result
    from tqdm.auto import tqdm

    with clear_errors():
        json_path = json_path or out / "super_weight.json"
        chosen = parse_weights(weight)
        checked = validate(model, prompts=prompts, prompt_limit=limit, files={"--json": json_path},
                           folders={"--out": out}, ratio=ratio, contributions=top, candidates=candidates,
                           controls=controls, pairs=pairs, max_pairs=max_pairs, batch_size=batch_size,
                           context=context if damage else None, max_tokens=max_tokens if damage else None)
        check_pairs(pairs, max_pairs)
        budget = Budget(corpora=list(corpus), max_tokens=max_tokens, context=context) if damage else None
        with shapes_only():  # the family and the given coordinates, from the config's shapes
            check_dense_down(checked.spec)
            given = [check_coordinate(checked.spec, l, r, c) for l, r, c in chosen]
        texts = checked.prompts
        writable_folder(out)
        lm = load(checked, bos)
        extra = [Candidate(f"given {l}:{r}:{c}", "scalar", l, r, c) for l, r, c in given]
        scan = find_super_weights(lm, texts, ratio=ratio, top=top, batch_size=batch_size, progress=True)
        settings = {"prompts": prompts, "limit": limit, "ratio": ratio, "top": top, "candidates": candidates,
                    "controls": controls, "lines": lines, "pairs": pairs, "restore": restore, "weights": weight,
                    "seed": seed, "budget": budget.to_dict() if budget else None}
        ranked = None
        done: list[dict] = []

        def save(complete: bool, plots: dict | None = None) -> None:
            write_result(json_path, {"detection": scan.to_dict(), "damage": ranked, "measured": done},
                         model=lm.describe(), settings=settings, complete=complete, plots=plots or {})

        def measured(row: dict) -> None:  # the file keeps every row measured so far ("complete": false)
            done.append(row)
            save(False)
            bar.update()

        if damage and (scan.found or extra):
            with tqdm(desc="variants measured", unit="variant") as bar:
                ranked = rank_damage(lm, scan.super_weights, measurer(lm, budget, progress=False), n=candidates,
                                     controls=controls, lines=lines, pairs=pairs, max_pairs=max_pairs,
                                     restore=restore, seed=seed, extra=extra, on_result=measured)
        super_weight_tables(scan, console, ranked)
        png = plot_super_weights(scan, out / "super_weight.png", f"{lm.name}: super weights (Yu et al.)", ranked)
        save(True, {"super_weight": str(png)})
        console.print(f"wrote {json_path}, {png}")
