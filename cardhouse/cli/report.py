"""The report command: one self-contained HTML page (and its JSON and PNGs) for one or more models."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..models.loading import DEFAULT_MODEL
from ..results import command_line
from .common import (ATTACK_K_HELP, CONTEXT_HELP, CORPUS_HELP, IMAGES_HELP, K_HELP, KS_HELP, MAX_TOKENS_HELP, MODEL_HELP,
                     SENTENCES_HELP, BosOpt, LayerOpt, MinAbsOpt, MinRatioOpt, PromptsOpt, RelativeOpt, SeedOpt,
                     TaskLimitOpt, TasksOpt, app, check_streamed_run, clear_errors, console, err, load_options, out_opt,
                     placement_options, window_tokens)


@app.command("report")
@load_options
def report_cmd(model: list[str] = typer.Option([DEFAULT_MODEL], "--model", "-m",
                                               help=f"{MODEL_HELP} (repeat for a side-by-side page)"),
               quick: bool = typer.Option(True, "--quick/--full", help="--quick (default): about a minute per model "
                                          "on a laptop CPU (one corpus, 510 tokens, k in 1, 2, 5); --full: the "
                                          "papers' sets (wikipedia and c4, 2048 tokens each, k from 0 to the whole "
                                          "layer), an estimated 15-20 minutes for SmolLM2-135M on 2 cores "
                                          "(55 variants x 4,096 tokens)"),
               out: Path = out_opt(Path("cardhouse-report"), "report.html beside them"),
               overwrite: bool = typer.Option(False, help="write into an existing folder, replacing only the "
                                              "report's own files"),
               seed: int = SeedOpt,
               prompts: str = PromptsOpt,
               k: Optional[int] = typer.Option(None, "--k", help=f"{K_HELP} (default 5)"),
               attack_k: Optional[int] = typer.Option(None, help=f"{ATTACK_K_HELP} (zeroed or retained, and as "
                                                      "many random rows; default 2)"),
               ks: Optional[str] = typer.Option(None, "--ks", help=f"{KS_HELP} (default: the mode's)"),
               layer: Optional[int] = LayerOpt,
               corpus: list[str] = typer.Option([], "--corpus", "-c", help=f"{CORPUS_HELP} (default: the mode's)"),
               max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help=f"{MAX_TOKENS_HELP} (default: "
                                                        "the mode's)"),
               context: Optional[int] = typer.Option(None, "--context", help=f"{CONTEXT_HELP} (default: the mode's)"),
               task: list[str] = TasksOpt, task_limit: Optional[int] = TaskLimitOpt,
               min_abs: Optional[float] = MinAbsOpt, min_ratio: Optional[float] = MinRatioOpt,
               relative: bool = RelativeOpt,
               with_: list[str] = typer.Option([], "--with", help="an extra section by name (repeatable): "
                                               "attention; see docs/report.md"),
               macdrop: Optional[Path] = typer.Option(None, "--macdrop-compare", help="add the MacDrop section from a "
                                                      "finished `cardhouse finetune-compare` output folder"),
               images: str = typer.Option("builtin", "--images", help=f"{IMAGES_HELP} (image models, e.g. "
                                          "dinov2-s)"),
               sentences: str = typer.Option("builtin", "--sentences", help=f"{SENTENCES_HELP} (sentence "
                                             "encoders, e.g. minilm-l6)"),
               bos: Optional[bool] = BosOpt):
    """Write a report folder: report.html (self-contained), results.json (every number in it) and the PNG plots.

    With --stream every section runs block by block (the scan, the massive weights, the attacks and the
    sweep on perplexity, --with attention); zero-shot --task needs whole forward passes and is refused,
    and Mixture-of-Experts checkpoints cannot stream."""
    from ..reports.report import Settings, build_report
    from ..validation import check_options

    with clear_errors():
        overrides = {"prompts": prompts, "seed": seed, "bos": bos, "relative": relative, "min_abs": min_abs,
                     "min_ratio": min_ratio, "layer": layer, "images": images, "sentences": sentences,
                     "tasks": tuple(task), "limit": task_limit,
                     "extras": tuple(with_) + (("macdrop",) if macdrop and "macdrop" not in with_ else ()),
                     "macdrop": str(macdrop) if macdrop else None, "load": placement_options()}
        for name, value in (("k", k), ("attack_k", attack_k), ("max_tokens", max_tokens), ("context", context)):
            if value is not None:
                overrides[name] = value
        if corpus:
            overrides["corpora"] = tuple(corpus)
        if ks:
            overrides["ks"] = tuple(check_options(ks=ks)["ks"])  # against each model's size in build_report
        settings = (Settings.quick if quick else Settings.full)(**overrides)
        if settings.load.get("stream"):
            from ..validation import validate

            for name in model:  # the spill's disk and what cannot stream, before any model loads
                check_streamed_run(validate(name), window_tokens(settings.max_tokens, settings.context),
                                   copies=len(settings.corpora) + 1, tasks=list(settings.tasks))
        results = build_report(model, out, settings, overwrite=overwrite, command=command_line())
        console.print(f"wrote {out / 'report.html'}, {out / 'results.json'} and the PNG plots")
        if results["failures"]:
            for f in results["failures"]:
                err.print(f"[bold red]error:[/bold red] {f['model']}: step {f['step']!r} failed: {f['error']}")
            err.print("the other sections are in the report")
            raise typer.Exit(1)
