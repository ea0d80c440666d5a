"""The report's optional MacDrop section (``--macdrop-compare FOLDER``): House of Cards Table 4, read
from a finished ``cardhouse finetune-compare`` run."""

from __future__ import annotations

from pathlib import Path

from ..finetuning.report import metrics_of, plot_comparison
from ..results import read_result
from .context import Context
from .html import Figure, Section, Table, facts


def compare_json(path: str | Path) -> Path:
    """The ``compare.json`` of a ``cardhouse finetune-compare`` run: the file itself or its folder."""
    path = Path(path)
    path = path / "compare.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no MacDrop comparison at {path} (give a `cardhouse finetune-compare` output "
                                "folder or its compare.json)")
    return path


def macdrop_step(ctx: Context) -> Section:
    """House of Cards Table 4, from a finished ``cardhouse finetune-compare`` run (fine-tuning takes far
    longer than a report, so the report reads its results rather than starting it)."""
    path = compare_json(ctx.settings.macdrop)
    saved = read_result(path)
    if saved["model"]["name"] != ctx.lm.name:
        return Section(text=[f"The comparison in {path} is of {saved['model']['name']}; none was given for this "
                             "model."])
    rows = saved["results"]
    metrics = metrics_of(rows)
    columns = ["run", "method", "MacDrop schedule", "steps"]
    for m in metrics:
        columns += [m, f"{m} attacked", f"{m} attacked / original"]
    cells = []
    for r in rows:
        cells.append([r["run"], r["method"], r["schedule"] or "no MacDrop", r["steps"]])
        for m in metrics:
            cells[-1] += [r[m], r[f"{m}_attacked"], r[f"{m}_attacked"] / r[m] if r[m] else None]
    c, drop = saved["settings"]["config"], saved["settings"]["macdrop"]
    setup = facts("How they were fine-tuned", {
        "data": c["data"], "records used": c["limit"], "max length": c["max_length"], "batch size": c["batch_size"],
        "gradient accumulation": c["grad_accum"], "learning rate": c["lr"], "epochs": c["epochs"],
        "max steps": c["max_steps"], "adapter rank": c["rank"], "MacDrop p0": drop["p0"],
        "MacDrop scope": drop["scope"],
        "rows zeroed by the attack": rows[0]["attacked_rows"]})
    png = plot_comparison(rows, ctx.figure("macdrop"), f"{ctx.lm.name}: original vs top-3 zeroed")
    return Section(
        text=["Each adapter is fine-tuned without and with MacDrop (the massive rows of the base model dropped "
              "with a decaying rate during training); then the top-3 massive rows are zeroed. A model that "
              f"learned not to lean on them loses less. Read from {path}."],
        tables=[Table("Fine-tuned models, original and with the massive rows zeroed", columns, cells), setup],
        figures=[Figure(png.name, "Each fine-tuned model's metrics before and after the top-3 massive rows are "
                                  "zeroed, without and with MacDrop.")],
        data={"compare": saved})

