"""Commands that fine-tune with LoRA / DoRA and MacDrop: finetune, finetune-compare."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..analysis import Criterion
from ..validation import validate
from .common import (LR_HELP, BosOpt, CorpusOpt, KOpt, LayerOpt, MinAbsOpt, MinRatioOpt, ModelOpt, RelativeOpt, SeedOpt,
                     TaskLimitOpt, TasksOpt, app, batch_size_opt, budget_from, clear_errors, console, context_opt, err,
                     load, load_options, max_tokens_opt, out_opt, writable_folder)

DataOpt = typer.Option("alpaca", "--data", "-d", help="'alpaca' (999 bundled Alpaca records) or a .json/.jsonl file "
                       "of instruction/input/output records")
TemplateOpt = typer.Option("alpaca", "--template", help="prompt template: alpaca or chat (the tokenizer's)")
# Paper defaults (House of Cards Table 6); the CPU-sized overrides are --max-length, --records, --max-steps.
BatchOpt = batch_size_opt(8, "training records; an optimizer step every --grad-accum passes")
AccumOpt = typer.Option(4, "--grad-accum", help="gradient accumulation steps")
LrOpt = typer.Option(1e-4, "--lr", help=LR_HELP)
EpochsOpt = typer.Option(3.0, "--epochs", help="passes over the training records")
RankOpt = typer.Option(16, "--rank", help="LoRA rank r (alpha = --lora-alpha)")
LoraAlphaOpt = typer.Option(16, "--lora-alpha", help="LoRA scaling alpha (the update is scaled by alpha / r)")
MaxLenOpt = typer.Option(512, "--max-length", help="tokens per example (CPU: 128)")
RecordsOpt = typer.Option(None, "--records", help="use this many records (CPU: a few hundred)")
StepsOpt = typer.Option(-1, "--max-steps", help="optimisation steps (> 0 overrides --epochs; CPU: a few dozen)")
SaveOpt = typer.Option(50, "--save-steps", help="checkpoint every n steps (for --resume)")
P0Opt = typer.Option(0.8, "--p0", help="MacDrop's initial drop rate, in [0, 1]")
ScheduleOpt = typer.Option("step", "--schedule", help="constant, step, epoch-before, epoch-after, exponential")
AlphaOpt = typer.Option(None, "--alpha", help="exponential schedule's decay per step (default 3 / total steps)")
ScopeOpt = typer.Option("massive", "--scope", help="massive rows, non-massive (as many random rows) or all rows")
RowsOpt = typer.Option(None, "--rows", help="comma-separated massive rows, given by hand (needs --layer)")
TokensOpt = max_tokens_opt(2048, " (0: no perplexity)")
ContextOpt = context_opt(256)


# the options both fine-tuning commands share that validation checks against the model's config
SHARED = ("k", "layer", "rows", "batch_size", "grad_accum", "lr", "epochs", "rank", "lora_alpha", "max_length",
          "records", "max_steps", "save_steps", "p0", "alpha", "task_limit", "min_abs", "min_ratio")


def _validate(model: str, out: Path, own_checks, given: dict):
    """The options both fine-tuning commands share (``given``: the command's arguments), against the model's
    config before it loads; ``own_checks()`` builds the command's ``(FinetuneConfig, MacDropConfig)``.
    Returns the validation, those two (the MacDrop rows from ``--rows``), the criterion and the budget."""
    from ..finetuning import load_records

    if given["rows"] is not None and given["layer"] is None:
        raise ValueError("--rows needs --layer (the layer of the massive rows)")
    max_tokens = given["max_tokens"]

    def checks():
        config, drop = own_checks()
        criterion = Criterion.from_options(given["min_abs"], given["min_ratio"], given["relative"])
        budget = budget_from(given["corpus"], max_tokens, given["context"], given["task"], given["task_limit"],
                             optional=True)
        load_records(given["data"])  # bad data fails before any model time is spent
        return config, drop, criterion, budget

    checked = validate(model, folders={"--out": out}, also=checks, **{name: given[name] for name in SHARED},
                       context=given["context"] if max_tokens else None, finetune_max_tokens=max_tokens)
    config, drop, criterion, budget = checked.own
    drop.rows = checked.options["rows"]
    return checked, config, drop, criterion, budget


def _interrupted(out: Path) -> None:
    err.print(f"[bold yellow]interrupted:[/bold yellow] the base weights are restored; the checkpoints are in "
              f"{out / 'checkpoints'}: run the same command with --resume to continue")
    raise typer.Exit(130)


@app.command("finetune")
@load_options
def finetune_cmd(model: str = ModelOpt, data: str = DataOpt, method: str = typer.Option("lora", help="lora or dora"),
                 macdrop: bool = typer.Option(True, "--macdrop/--no-macdrop", help="MacDrop on the massive rows"),
                 p0: float = P0Opt, schedule: str = ScheduleOpt, alpha: Optional[float] = AlphaOpt,
                 scope: str = ScopeOpt, k: int = KOpt, layer: Optional[int] = LayerOpt, rows: Optional[str] = RowsOpt,
                 template: str = TemplateOpt, batch_size: int = BatchOpt, grad_accum: int = AccumOpt,
                 lr: float = LrOpt, epochs: float = EpochsOpt, rank: int = RankOpt, lora_alpha: int = LoraAlphaOpt,
                 max_length: int = MaxLenOpt, records: Optional[int] = RecordsOpt, max_steps: int = StepsOpt,
                 save_steps: int = SaveOpt, seed: int = SeedOpt,
                 resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in --out"),
                 corpus: list[str] = CorpusOpt, max_tokens: int = TokensOpt, context: int = ContextOpt,
                 task: list[str] = TasksOpt, task_limit: Optional[int] = TaskLimitOpt,
                 min_abs: Optional[float] = MinAbsOpt, min_ratio: Optional[float] = MinRatioOpt,
                 relative: bool = RelativeOpt, bos: Optional[bool] = BosOpt,
                 out: Path = out_opt(Path("cardhouse-out/finetune"), "and the adapter and checkpoints")):
    """Fine-tune with a LoRA/DoRA adapter (MacDrop on by default), then measure it original vs top-3 zeroed."""
    from ..evaluation.metrics import metric_keys, metric_of
    from ..finetuning import FinetuneConfig, MacDropConfig, finetune, robustness
    from ..results import write_result
    from ..finetuning.macdrop import detect_massive_rows

    def own_checks():
        config = FinetuneConfig(method=method, rank=rank, lora_alpha=lora_alpha, batch_size=batch_size,
                                grad_accum=grad_accum, lr=lr, epochs=epochs, max_length=max_length,
                                max_steps=max_steps, limit=records, template=template, data=data,
                                save_steps=save_steps, seed=seed)
        return config, MacDropConfig(p0=p0, schedule=schedule, alpha=alpha, k=k, scope=scope, layer=layer, seed=seed)

    with clear_errors():
        checked, config, drop, criterion, budget = _validate(model, out, own_checks, locals())
        writable_folder(out)
        lm = load(checked, bos)
        if drop.rows is None:  # the attack needs the massive rows, with or without MacDrop
            drop.layer, drop.rows, drop.expert = detect_massive_rows(lm, k, layer, criterion)
        try:
            result = finetune(lm, config, drop if macdrop else None, out=out, resume=resume)
        except KeyboardInterrupt:
            _interrupted(out)
        table = robustness(lm, result.trainer, drop.layer, drop.rows, expert=drop.expert, budget=budget,
                           progress=True)
        console.print(f"{lm.name}, {method}{' + MacDrop (' + schedule + ')' if macdrop else ''}: {result.steps} steps "
                      f"in {result.seconds:.0f} s; validation loss {result.val_loss_before or float('nan'):.4f} -> "
                      f"{result.val_loss:.4f}")
        for row in table:
            console.print(f"  {row['variant']:>14s}: " + ", ".join(
                f"{m} {metric_of(m).format(row[m])}" for m in metric_keys(row)))
        write_result(out / "results.json", {"finetune": result.to_dict(), "robustness": table}, model=lm.describe(),
                     settings={"config": config.to_dict(), "macdrop": drop.to_dict() if macdrop else None,
                               "layer": drop.layer, "massive_rows": drop.rows, "criterion": criterion.to_dict(),
                               "budget": budget.to_dict() if budget else None})
        console.print(f"wrote {out / 'adapter'} (PEFT format), {out / 'finetune.json'}, {out / 'results.json'}")


@app.command("finetune-compare")
@load_options
def compare_cmd(model: str = ModelOpt, data: str = DataOpt,
                methods: str = typer.Option("lora,dora", help="comma-separated: lora, dora"),
                schedules: str = typer.Option("constant,step,epoch-before,epoch-after,exponential",
                                              help="comma-separated MacDrop schedules (one run each)"),
                p0: float = P0Opt, alpha: Optional[float] = AlphaOpt, scope: str = ScopeOpt, k: int = KOpt,
                layer: Optional[int] = LayerOpt, rows: Optional[str] = RowsOpt, template: str = TemplateOpt,
                batch_size: int = BatchOpt, grad_accum: int = AccumOpt, lr: float = LrOpt, epochs: float = EpochsOpt,
                rank: int = RankOpt, lora_alpha: int = LoraAlphaOpt, max_length: int = MaxLenOpt,
                records: Optional[int] = RecordsOpt, max_steps: int = StepsOpt, save_steps: int = SaveOpt,
                seed: int = SeedOpt, corpus: list[str] = CorpusOpt, max_tokens: int = TokensOpt,
                context: int = ContextOpt, task: list[str] = TasksOpt, task_limit: Optional[int] = TaskLimitOpt,
                min_abs: Optional[float] = MinAbsOpt, min_ratio: Optional[float] = MinRatioOpt,
                relative: bool = RelativeOpt, bos: Optional[bool] = BosOpt,
                out: Path = out_opt(Path("cardhouse-out/finetune-compare"), "and each run's folder")):
    """House of Cards Table 4: LoRA and DoRA, without and with MacDrop (each schedule), original vs top-3 zeroed.

    Each run is saved in its own folder under --out; rerunning skips the finished runs.
    """
    import time

    from ..finetuning import FinetuneConfig, MacDropConfig, compare
    from ..finetuning.macdrop import SCHEDULES
    from ..finetuning.report import comparison_table, plot_comparison
    from ..finetuning.train import METHODS
    from ..results import write_result

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    schedule_list = [s.strip() for s in schedules.split(",") if s.strip()]

    def own_checks():
        for name, given, known in (("method", method_list, METHODS), ("schedule", schedule_list, SCHEDULES)):
            bad = [x for x in given if x not in known]
            if bad or not given:
                raise ValueError(f"unknown {name} {bad or given}; known: {', '.join(known)}")
        config = FinetuneConfig(rank=rank, lora_alpha=lora_alpha, batch_size=batch_size, grad_accum=grad_accum,
                                lr=lr, epochs=epochs, max_length=max_length, max_steps=max_steps, limit=records,
                                template=template, data=data, save_steps=save_steps, seed=seed)
        return config, MacDropConfig(p0=p0, alpha=alpha, k=k, scope=scope, layer=layer, seed=seed)

    with clear_errors():
        checked, config, drop, criterion, budget = _validate(model, out, own_checks, locals())
        folder = writable_folder(out)
        start = time.perf_counter()
        described = []

        def fresh():  # a new base model for every run; the first one describes the model in compare.json
            lm = load(checked, bos)
            described.append(lm.describe())
            return lm

        try:
            results = compare(fresh, config, drop, methods=tuple(method_list),
                              schedules=tuple(schedule_list), out=folder, budget=budget, criterion=criterion)
        except KeyboardInterrupt:
            _interrupted(folder)
        seconds = time.perf_counter() - start
        title = f"{model}: original vs top-3 zeroing of the massive rows {results[0]['attacked_rows']}"
        console.print(comparison_table(results, title))
        png = plot_comparison(results, folder / "compare.png", title)
        write_result(folder / "compare.json", results, model=described[0],
                     settings={"config": config.to_dict(), "macdrop": drop.to_dict(), "methods": method_list,
                               "schedules": schedule_list, "budget": budget.to_dict() if budget else None,
                               "criterion": criterion.to_dict()},
                     seconds=seconds)
        console.print(f"wrote {folder / 'compare.json'}, {png} ({seconds / 60:.1f} min)")
