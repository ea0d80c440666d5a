"""Commands that break and repair a model and measure it: attack, intervene, sweep."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import typer

from ..analysis.moe import FRACTION, PERCENTILE
from ..interventions.experts import MOE_ATTACKS
from ..interventions.variants import ATTACKS, INTERVENTIONS, control_of
from ..validation import validate
from .common import (FRACTION_HELP, KS_HELP, PERCENTILE_HELP, BackendOpt, BosOpt, CorpusOpt, IndicesOpt, KOpt,
                     LayerOpt, MinAbsOpt, MinRatioOpt, ModelOpt, OutOpt, PromptsOpt, RelativeOpt, SeedOpt, TaskLimitOpt,
                     TasksOpt, app, budget_from, check_streamed_run, clear_errors, console, context_opt, err, json_opt, load,
                     load_options, max_tokens_opt, parse_int_list, window_tokens, writable_folder)

TokensOpt = max_tokens_opt(4096)
ContextOpt = context_opt(512)


def _results_table(rows: list[dict], title: str) -> None:
    from rich.table import Table

    from ..evaluation.metrics import metric_keys, metric_of

    metrics = metric_keys(rows[0])
    t = Table(title=title)
    t.add_column("variant")
    for m in metrics:
        t.add_column(m, justify="right")
    for row in rows:
        t.add_row(row["variant"], *(metric_of(m).format(row[m]) for m in metrics))
    console.print(t)


def _measure(lm, variants, budget, json_path: Path | None, title: str, settings: dict | None = None,
             **extra) -> None:
    """Measure the variants, print the table; the JSON is rewritten after every variant so that an
    interrupted run keeps what it measured (``"complete": false``)."""
    from ..evaluation.measure import measurer
    from ..interventions import run_variants
    from ..results import write_result

    done: list[dict] = []

    def save(complete: bool) -> None:
        if json_path:
            write_result(json_path, done, model=lm.describe(), settings={"budget": budget.to_dict(), **(settings or {})},
                         complete=complete, **extra)

    rows = run_variants(lm, variants, measurer(lm, budget), on_result=lambda row: (done.append(row), save(False)))
    save(True)
    _results_table(rows, title)
    if json_path:
        console.print(f"wrote {json_path}")


# from the registries: a new attack (or control) is listed here too
KIND_HELP = (f"a registered attack ({', '.join(a for a in ATTACKS if control_of(a) is None)}; the controls "
             f"{', '.join(a for a in ATTACKS if control_of(a))}), or 'all' for every attack and the activation "
             f"interventions ({', '.join(INTERVENTIONS)}); Mixture of Experts: {', '.join(MOE_ATTACKS)} (each with its "
             f"controls), or 'moe' for all {len(MOE_ATTACKS)}")


@app.command("attack")
@load_options
def attack_cmd(kind: str = typer.Argument(..., help=KIND_HELP),
               model: str = ModelOpt, k: int = KOpt, layer: Optional[int] = LayerOpt,
               indices: Optional[str] = IndicesOpt,
               expert: Optional[str] = typer.Option(None, help="MoE: the expert to attack (an index or 'shared'; "
                                                    "default: the carrier's)"),
               percentile: Optional[float] = typer.Option(None, help=f"{PERCENTILE_HELP} (MoE attacks; default "
                                                          f"{PERCENTILE:g})"),
               fraction: Optional[float] = typer.Option(None, help=f"{FRACTION_HELP} (MoE attacks; default "
                                                        f"{FRACTION:g})"),
               seed: int = SeedOpt, corpus: list[str] = CorpusOpt, max_tokens: int = TokensOpt,
               context: int = ContextOpt, task: list[str] = TasksOpt, task_limit: Optional[int] = TaskLimitOpt,
               min_abs: Optional[float] = MinAbsOpt,
               min_ratio: Optional[float] = MinRatioOpt, relative: bool = RelativeOpt, bos: Optional[bool] = BosOpt,
               json_path: Optional[Path] = json_opt("none: nothing written")):
    """Evaluate a House of Cards weight attack against the unedited model and its random control."""

    if kind == "moe" or kind in MOE_ATTACKS:
        return _moe_attack(kind, model, k, layer, indices, expert, percentile, fraction, seed, corpus, max_tokens,
                           context, task, task_limit, (min_abs, min_ratio, relative), bos, json_path)
    from ..analysis import Criterion, find_massive_weights
    from ..analysis import scan as run_scan
    from ..interventions import attack, get_attack, intervention, original

    with clear_errors():
        if kind != "all":
            try:
                get_attack(kind)
            except ValueError as e:
                raise ValueError(f"{e}, all; Mixture of Experts: {', '.join(MOE_ATTACKS)}, moe") from None
        if expert is not None or percentile is not None or fraction is not None:
            raise ValueError("--expert, --percentile and --fraction are for the Mixture-of-Experts attacks")
        checked = validate(model, files={"--json": json_path}, k=k, layer=layer, indices=indices, context=context,
                           max_tokens=max_tokens, task_limit=task_limit, min_abs=min_abs, min_ratio=min_ratio)
        criterion = Criterion.from_options(min_abs, min_ratio, relative)
        budget = budget_from(corpus, max_tokens, context, task, task_limit)
        check_streamed_run(checked, window_tokens(max_tokens, context), copies=len(budget.corpora) + 1, tasks=task)
        chosen = checked.options["indices"]
        lm = load(checked, bos)
        mw = find_massive_weights(lm, k=max(k, len(chosen or [])), layer=layer, criterion=criterion)
        if not mw.massive:
            err.print(f"[yellow]warning:[/yellow] {mw.not_massive}")
        kinds = list(ATTACKS) if kind == "all" else [kind] + [c for c in [ATTACKS[kind].control] if c]
        variants = [original()] + [attack(lm, mw, kd, k=k, indices=chosen, seed=seed) for kd in kinds]
        if kind == "all":
            result = run_scan(lm, criterion=criterion, progress=False)
            variants += [intervention(lm, result, "set-zero"), intervention(lm, result, "set-mean")]
        _measure(lm, variants, budget, json_path, f"{lm.name}: layer {mw.layer}, massive indices {mw.indices[:k]}",
                 settings={"attack": kind, "k": k, "layer": layer, "indices": chosen, "seed": seed,
                           "criterion": criterion.to_dict()},
                 massive_weights=mw.to_dict())


def _moe_attack(kind, model, k, layer, indices, expert, percentile, fraction, seed, corpus, max_tokens, context, task,
                task_limit, criterion_options, bos, json_path) -> None:
    """``attack`` for the Mixture-of-Experts attacks (interventions/experts.py), each beside its controls."""
    from ..analysis import Criterion
    from ..interventions.experts import moe_variants
    from ..models.routing import routing_of
    from .moe import check_moe_options

    with clear_errors():
        check_moe_options(0.5, PERCENTILE if percentile is None else percentile,
                          FRACTION if fraction is None else fraction)
        which = expert if expert in (None, "shared") else parse_int_list(expert, "--expert")[0]
        checked = validate(model, files={"--json": json_path}, k=k, layer=layer, indices=indices, context=context,
                           max_tokens=max_tokens, task_limit=task_limit, percentile=percentile, fraction=fraction,
                           min_abs=criterion_options[0], min_ratio=criterion_options[1])
        criterion = Criterion.from_options(*criterion_options)
        routing_of(checked.spec.blocks.adapter)  # a dense model is refused from its config
        budget = budget_from(corpus, max_tokens, context, task, task_limit)
        chosen = checked.options["indices"]
        lm = load(checked, bos)
        variants, target, mw = moe_variants(lm, kind, k=k, layer=layer, expert=which, indices=chosen, seed=seed,
                                            percentile=percentile, fraction=fraction, criterion=criterion)
        if not mw.massive:
            err.print(f"[yellow]warning:[/yellow] {mw.not_massive}")
        _measure(lm, variants, budget, json_path, f"{lm.name}: layer {target.layer}, expert {target.expert}, "
                 f"rows {target.top}; super experts {target.super_experts}",
                 settings={"attack": kind, "k": k, "layer": layer, "expert": expert, "indices": chosen, "seed": seed,
                           "percentile": percentile, "fraction": fraction, "criterion": criterion.to_dict()},
                 massive_weights=mw.to_dict(),
                 target={"layer": target.layer, "expert": target.expert, "rows": target.top,
                         "super_experts": target.super_experts, "random_experts": target.random_experts})


@app.command("intervene")
@load_options
def intervene_cmd(kind: str = typer.Argument(..., help="set-zero or set-mean"), model: str = ModelOpt,
                  every_layer: bool = typer.Option(False, help="at every layer that has massive activations"),
                  prompts: str = PromptsOpt,
                  corpus: list[str] = CorpusOpt, max_tokens: int = TokensOpt, context: int = ContextOpt,
                  task: list[str] = TasksOpt, task_limit: Optional[int] = TaskLimitOpt,
                  min_abs: Optional[float] = MinAbsOpt, min_ratio: Optional[float] = MinRatioOpt,
                  relative: bool = RelativeOpt, bos: Optional[bool] = BosOpt,
                  json_path: Optional[Path] = json_opt("none: nothing written")):
    """Set the massive activations to zero or to their mean (Sun et al. Sec. 4.1) and measure the model."""
    from ..analysis import Criterion
    from ..analysis import scan as run_scan
    from ..interventions import INTERVENTIONS, intervention, original

    with clear_errors():
        if kind not in INTERVENTIONS:
            raise ValueError(f"unknown intervention {kind!r}; known: {', '.join(INTERVENTIONS)}")
        checked = validate(model, prompts=prompts, files={"--json": json_path}, context=context,
                           max_tokens=max_tokens, task_limit=task_limit, min_abs=min_abs, min_ratio=min_ratio)
        criterion = Criterion.from_options(min_abs, min_ratio, relative)
        budget = budget_from(corpus, max_tokens, context, task, task_limit)
        check_streamed_run(checked, window_tokens(max_tokens, context), copies=len(budget.corpora) + 1, tasks=task)
        lm = load(checked, bos)
        result = run_scan(lm, checked.prompts, criterion=criterion, progress=False)
        others = [kd for kd in INTERVENTIONS if kd != kind]  # the other one is the comparison
        variants = [original()] + [intervention(lm, result, kd, every_layer=every_layer) for kd in [kind] + others]
        _measure(lm, variants, budget, json_path, f"{lm.name}: massive dims {result.dims} at layer {result.first_layer}",
                 settings={"intervention": kind, "every_layer": every_layer, "prompts": prompts,
                           "criterion": criterion.to_dict()}, scan=result.to_dict())


@app.command("sweep")
@load_options
def sweep_cmd(model: str = ModelOpt, ks: Optional[str] = typer.Option(None, "--ks", help=f"{KS_HELP} (default 0,1,2,"
                                                                      "3,5,10,20,50,... up to the whole layer)"),
              layer: Optional[int] = LayerOpt, seed: int = SeedOpt, corpus: list[str] = CorpusOpt,
              max_tokens: int = max_tokens_opt(2048, " (0: zero-shot accuracy only)"), context: int = ContextOpt,
              task: list[str] = TasksOpt, task_limit: Optional[int] = TaskLimitOpt, backend: str = BackendOpt,
              min_abs: Optional[float] = MinAbsOpt, min_ratio: Optional[float] = MinRatioOpt,
              relative: bool = RelativeOpt, bos: Optional[bool] = BosOpt, out: Path = OutOpt):
    """House of Cards Fig. 4: perplexity and, with --task, mean zero-shot accuracy as k grows, for top-k zeroing
    and retaining with their random controls (sweep.png; per task: sweep_tasks.png and sweep_tasks.md); resumes
    if interrupted."""
    from ..evaluation.measure import measurer
    from ..evaluation.metrics import ACC, curve_metrics
    from ..analysis import Criterion
    from ..interventions.sweep import resumable_sweep, sweep_settings, sweep_table, task_table
    from ..journal import Journal
    from ..reports import plot_sweep
    from ..results import write_result

    with clear_errors():
        checked = validate(model, folders={"--out": out}, ks=ks, layer=layer, context=context,
                           finetune_max_tokens=max_tokens,  # 0 allowed: zero-shot only
                           task_limit=task_limit, min_abs=min_abs, min_ratio=min_ratio)
        criterion = Criterion.from_options(min_abs, min_ratio, relative)
        budget = budget_from(corpus, max_tokens, context, task, task_limit, optional=True, backend=backend)
        if budget is None:
            raise ValueError("nothing to measure: --max-tokens 0 needs at least one --task")
        # rows of an earlier run under other settings are refused now, before the weights load
        Journal(out / "sweep.jsonl", {}).check(sweep_settings(model, layer=layer, seed=seed, criterion=criterion,
                                                              **budget.to_dict()))
        check_streamed_run(checked, window_tokens(max_tokens, context, len(budget.corpora)),
                           copies=len(budget.corpora) + 1, tasks=task)
        folder = writable_folder(out)
        lm = load(checked, bos)
        rows = resumable_sweep(lm, measurer(lm, budget, progress=False), folder / "sweep.jsonl",
                               ks=checked.options["ks"], layer=layer, seed=seed, criterion=criterion,
                               settings=budget.to_dict())
        curves = {m: sweep_table(rows, m) for m in curve_metrics(rows[0])}
        title = f"{lm.name}: top-k zeroing and retaining, layer {rows[-1]['layer']}"
        png = plot_sweep(curves, folder / "sweep.png", title)
        plots = {"sweep": str(png)}
        if budget.tasks:  # Fig. 4 per task, and the table beside it
            plots["tasks"] = str(plot_sweep({ACC.key(t): sweep_table(rows, ACC.key(t)) for t in budget.tasks},
                                            folder / "sweep_tasks.png", title))
            (folder / "sweep_tasks.md").write_text(task_table(rows, budget.tasks))
        write_result(folder / "sweep.json", rows, model=lm.describe(),
                     settings={"budget": budget.to_dict(), "ks": checked.options["ks"], "layer": layer, "seed": seed,
                               "criterion": criterion.to_dict()},
                     plots=plots)
        with (folder / "sweep.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        _results_table(rows, f"{lm.name}: sweep")
        console.print(f"wrote {folder / 'sweep.json'}, {folder / 'sweep.csv'}, {', '.join(plots.values())}"
                      + (f", {folder / 'sweep_tasks.md'}" if budget.tasks else ""))
