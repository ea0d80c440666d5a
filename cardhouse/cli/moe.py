"""``cardhouse moe``: the Mixture-of-Experts picture (router collapse, the carrier's experts, super experts)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..analysis.moe import COLLAPSE, FRACTION, PERCENTILE
from ..validation import validate
from .common import (FRACTION_HELP, PERCENTILE_HELP, BosOpt, KOpt, LayerOpt, MinAbsOpt, MinRatioOpt, ModelOpt, OutOpt,
                     PromptsOpt, RelativeOpt, app, batch_size_opt, clear_errors, console, json_opt, limit_opt, load,
                     load_options, writable_folder)

CollapseOpt = typer.Option(COLLAPSE, help="the carrier's routing has collapsed where its top-1 probability "
                                          "reaches this")
PercentileOpt = typer.Option(PERCENTILE, help=PERCENTILE_HELP)
FractionOpt = typer.Option(FRACTION, help=FRACTION_HELP)


def check_moe_options(collapse: float, percentile: float, fraction: float) -> None:
    from ..analysis.moe import super_expert_rule

    if not 0 < collapse <= 1:
        raise ValueError(f"--collapse must be in (0, 1], got {collapse}")
    if not 0 <= percentile <= 100:
        raise ValueError(f"--percentile must be in 0..100, got {percentile}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"--fraction must be in 0..1, got {fraction}")
    super_expert_rule({(0, 0): 1.0}, percentile=percentile, fraction=fraction)


def run_moe(lm, texts, folder: Path, json_path: Path, *, k: int, layer: int | None, collapse: float,
            percentile: float, fraction: float, batch_size: int, criterion=None):
    """Analyse, print, plot and write ``moe.json``; the analysis and the plot paths."""
    from ..analysis.moe import analyze_moe
    from ..reports.moe_plots import plot_router, plot_super_experts
    from ..reports.moe_tables import moe_tables
    from ..results import write_result

    analysis = analyze_moe(lm, texts, k=k, layer=layer, collapse=collapse, percentile=percentile, fraction=fraction,
                           batch_size=batch_size, **({"criterion": criterion} if criterion is not None else {}))
    moe_tables(analysis, console)
    plots = {"router": str(plot_router(analysis, folder / "moe_router.png")),
             "super_experts": str(plot_super_experts(analysis, folder / "moe_super_experts.png"))}
    settings = {"prompts": len(texts), "k": k, "layer": layer, "collapse": collapse, "percentile": percentile,
                "fraction": fraction, "criterion": criterion.to_dict() if criterion is not None else None}
    write_result(json_path, analysis.to_dict(), model=lm.describe(), settings=settings, plots=plots)
    return analysis, plots


@app.command("moe")
@load_options
def moe_cmd(model: str = ModelOpt, prompts: str = PromptsOpt,
            limit: Optional[int] = limit_opt(None),
            k: int = KOpt, layer: Optional[int] = LayerOpt, min_abs: Optional[float] = MinAbsOpt,
            min_ratio: Optional[float] = MinRatioOpt, relative: bool = RelativeOpt,
            collapse: float = CollapseOpt, percentile: float = PercentileOpt, fraction: float = FractionOpt,
            batch_size: int = batch_size_opt(8), bos: Optional[bool] = BosOpt,
            out: Path = OutOpt,
            json_path: Optional[Path] = json_opt("OUT/moe.json")):
    """Mixture of Experts: where the router sends the carrier token (House of Cards Fig. 5), the expert that
    holds the massive weights and its rows (Table 7), and the super experts (Su et al. 2025)."""
    from ..analysis import Criterion
    from ..models.routing import routing_of

    with clear_errors():
        check_moe_options(collapse, percentile, fraction)
        json_path = json_path or out / "moe.json"
        checked = validate(model, prompts=prompts, prompt_limit=limit, files={"--json": json_path},
                           folders={"--out": out}, k=k, layer=layer, batch_size=batch_size, collapse=collapse,
                           percentile=percentile, fraction=fraction, min_abs=min_abs, min_ratio=min_ratio)
        criterion = Criterion.from_options(min_abs, min_ratio, relative)
        routing_of(checked.spec.blocks.adapter)  # a dense model or an undescribed router: refused from the config
        texts = checked.prompts
        folder = writable_folder(out)
        lm = load(checked, bos)
        _, plots = run_moe(lm, texts, folder, json_path, k=k, layer=layer, collapse=collapse, percentile=percentile,
                           fraction=fraction, batch_size=batch_size, criterion=criterion)
        console.print(f"wrote {json_path}, {', '.join(plots.values())}")
