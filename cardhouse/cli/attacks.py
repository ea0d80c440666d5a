"""Commands that break and repair a model and measure it: attack, intervene, sweep."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import typer

from ..validation import validate
from .common import BosOpt, ModelOpt, OutOpt, app, clear_errors, console, err, load, writable_folder, write_json

CorpusOpt = typer.Option(["wikipedia"], "--corpus", "-c", help="perplexity corpora (wikipedia, c4, austen, ...)")
TokensOpt = typer.Option(4096, "--max-tokens", help="corpus tokens per corpus (the evaluation budget)")
ContextOpt = typer.Option(512, "--context", help="perplexity window length, BOS first")
TasksOpt = typer.Option([], "--task", "-t", help="zero-shot tasks through lm-eval (repeatable)")
LimitOpt = typer.Option(None, "--limit", help="zero-shot examples per task")


def _budget(corpus, max_tokens, context, tasks, limit):
    from ..evaluation.measure import Budget

    return Budget(corpora=list(corpus), max_tokens=max_tokens, context=context, tasks=list(tasks), limit=limit)


def _results_table(rows: list[dict], title: str) -> None:
    from rich.table import Table

    metrics = [k for k in rows[0] if k.startswith(("ppl_", "acc_"))]
    t = Table(title=title)
    t.add_column("variant")
    for m in metrics:
        t.add_column(m, justify="right")
    for row in rows:
        t.add_row(row["variant"], *(f"{row[m]:,.2f}" if m.startswith("ppl") else f"{row[m]:.3f}" for m in metrics))
    console.print(t)


def _measure(lm, variants, budget, json_path: Path | None, title: str, **header) -> None:
    """Measure the variants, print the table; the JSON is rewritten after every variant so that an
    interrupted run keeps what it measured (``"complete": false``)."""
    from ..evaluation.measure import measurer
    from ..interventions import run_variants

    done: list[dict] = []

    def save(complete: bool) -> None:
        if json_path:
            write_json({"model": lm.describe(), "budget": budget.to_dict(), **header, "results": done,
                        "complete": complete}, json_path)

    rows = run_variants(lm, variants, measurer(lm, budget), on_result=lambda row: (done.append(row), save(False)))
    save(True)
    _results_table(rows, title)
    if json_path:
        console.print(f"wrote {json_path}")


@app.command("attack")
def attack_cmd(kind: str = typer.Argument(..., help="topk-zero, topk-retain, super-weight, or 'all' for the papers' table"),
               model: str = ModelOpt, k: int = typer.Option(5, help="rows to attack"),
               layer: Optional[int] = typer.Option(None, help="layer (default: detected)"),
               indices: Optional[str] = typer.Option(None, help="comma-separated intermediate indices (overrides top-k)"),
               seed: int = typer.Option(0, help="seed of the random control"),
               corpus: list[str] = CorpusOpt, max_tokens: int = TokensOpt, context: int = ContextOpt,
               task: list[str] = TasksOpt, limit: Optional[int] = LimitOpt, bos: Optional[bool] = BosOpt,
               json_path: Optional[Path] = typer.Option(None, "--json", help="write every number here")):
    """Evaluate a House of Cards weight attack against the unedited model and its random control."""
    from ..analysis import find_massive_weights
    from ..analysis import scan as run_scan
    from ..interventions import CONTROL, attack, intervention, original

    with clear_errors():
        if kind != "all" and kind not in CONTROL:
            raise ValueError(f"unknown attack {kind!r}; known: {', '.join(CONTROL)}, all")
        checked = validate(model, files={"--json": json_path}, k=k, layer=layer, indices=indices, context=context,
                           max_tokens=max_tokens, limit=limit)
        budget = _budget(corpus, max_tokens, context, task, limit)
        chosen = checked.options["indices"]
        lm = load(checked, bos)
        mw = find_massive_weights(lm, k=max(k, len(chosen or [])), layer=layer)
        if not mw.massive:
            err.print(f"[yellow]warning:[/yellow] {next(n for n in mw.notes if n.startswith('no massive'))}")
        kinds = ["topk-zero", "topk-retain", "random-zero", "super-weight"] if kind == "all" else [kind, CONTROL[kind]]
        variants = [original()] + [attack(lm, mw, kd, k=k, indices=chosen, seed=seed) for kd in kinds]
        if kind == "all":
            result = run_scan(lm, progress=False)
            variants += [intervention(lm, result, "set-zero"), intervention(lm, result, "set-mean")]
        _measure(lm, variants, budget, json_path, f"{lm.name}: layer {mw.layer}, massive indices {mw.indices[:k]}",
                 massive_weights=mw.to_dict())


@app.command("intervene")
def intervene_cmd(kind: str = typer.Argument(..., help="set-zero or set-mean"), model: str = ModelOpt,
                  every_layer: bool = typer.Option(False, help="at every layer that has massive activations"),
                  prompts: str = typer.Option("builtin", help="calibration prompts for the scan (and the mean)"),
                  corpus: list[str] = CorpusOpt, max_tokens: int = TokensOpt, context: int = ContextOpt,
                  task: list[str] = TasksOpt, limit: Optional[int] = LimitOpt, bos: Optional[bool] = BosOpt,
                  json_path: Optional[Path] = typer.Option(None, "--json", help="write every number here")):
    """Set the massive activations to zero or to their mean (Sun et al. Sec. 4.1) and measure the model."""
    from ..analysis import scan as run_scan
    from ..interventions import INTERVENTIONS, intervention, original

    with clear_errors():
        if kind not in INTERVENTIONS:
            raise ValueError(f"unknown intervention {kind!r}; known: {', '.join(INTERVENTIONS)}")
        checked = validate(model, prompts=prompts, files={"--json": json_path}, context=context,
                           max_tokens=max_tokens, limit=limit)
        budget = _budget(corpus, max_tokens, context, task, limit)
        lm = load(checked, bos)
        result = run_scan(lm, checked.prompts, progress=False)
        others = [kd for kd in INTERVENTIONS if kd != kind]  # the other one is the comparison
        variants = [original()] + [intervention(lm, result, kd, every_layer=every_layer) for kd in [kind] + others]
        _measure(lm, variants, budget, json_path, f"{lm.name}: massive dims {result.dims} at layer {result.first_layer}",
                 scan=result.to_dict())


@app.command("sweep")
def sweep_cmd(model: str = ModelOpt, ks: Optional[str] = typer.Option(None, help="comma-separated k values "
              "(default 0,1,2,3,5,10,20,50,... up to the whole layer)"),
              layer: Optional[int] = typer.Option(None, help="layer (default: detected)"),
              seed: int = typer.Option(0), corpus: list[str] = CorpusOpt,
              max_tokens: int = typer.Option(2048, "--max-tokens", help="corpus tokens per corpus and variant"),
              context: int = ContextOpt, task: list[str] = TasksOpt, limit: Optional[int] = LimitOpt,
              bos: Optional[bool] = BosOpt, out: Path = OutOpt):
    """House of Cards Fig. 4: perplexity (and zero-shot accuracy) as k grows; resumes if interrupted."""
    from ..evaluation.measure import measurer
    from ..interventions.sweep import sweep, sweep_settings, sweep_table
    from ..journal import Journal
    from ..reports import plot_sweep

    with clear_errors():
        checked = validate(model, folders={"--out": out}, ks=ks, layer=layer, context=context, max_tokens=max_tokens,
                           limit=limit)
        budget = _budget(corpus, max_tokens, context, task, limit)
        # rows of an earlier run under other settings are refused now, before the weights load
        Journal(out / "sweep.jsonl", {}).check(sweep_settings(model, layer=layer, seed=seed, **budget.to_dict()))
        folder = writable_folder(out)
        lm = load(checked, bos)
        rows = sweep(lm, measurer(lm, budget, progress=False), folder / "sweep.jsonl", ks=checked.options["ks"],
                     layer=layer, seed=seed, settings=budget.to_dict())
        metrics = [m for m in rows[0] if m.startswith("ppl_") or m == "acc_mean"]
        curves = {m: sweep_table(rows, m) for m in metrics}
        png = plot_sweep(curves, folder / "sweep.png", f"{lm.name}: top-k zeroing and retaining, layer {rows[-1]['layer']}")
        write_json({"model": lm.describe(), "budget": budget.to_dict(), "results": rows}, folder / "sweep.json")
        with (folder / "sweep.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        _results_table(rows, f"{lm.name}: sweep")
        console.print(f"wrote {folder / 'sweep.json'}, {folder / 'sweep.csv'}, {png}")
