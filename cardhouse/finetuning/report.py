"""The comparison's table and plot: each run's metrics, original vs top-3 zeroed (House of Cards Table 4).

"attacked": the base model's massive rows zeroed, adapter on; "merged": the rows of the merged
fine-tuned weights zeroed (see ``train.robustness``).
"""

from __future__ import annotations

from pathlib import Path

from .._files import write_atomically
from ..evaluation.metrics import metric_keys, metric_of

VARIANTS = {"": "original", "_attacked": "top-3 zeroed", "_attacked_merged": "top-3 zeroed (merged)"}


def suffix_of(row: dict) -> str:
    """The key suffix of a ``train.robustness`` row's metrics in a comparison row, from its variant's fields."""
    if row["kind"] == "original":
        return ""
    return "_attacked" + ("_merged" if row.get("on") == "merged" else "")


def metrics_of(rows: list[dict]) -> list[str]:
    """Registered metrics measured original and attacked: val_loss, ppl_<corpus>, acc_<task>."""
    return [key for key in metric_keys(rows[0]) if f"{key}_attacked" in rows[0]]


def variants_of(rows: list[dict], metric: str) -> list[str]:
    return [suffix for suffix in VARIANTS if all(f"{metric}{suffix}" in row for row in rows)]


def comparison_table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("run", no_wrap=True)
    table.add_column("steps", justify="right")
    for metric in metrics_of(rows):
        for suffix in variants_of(rows, metric):
            table.add_column(f"{metric}{suffix.replace('_', ' ')}", justify="right")
    for row in rows:
        cells = []
        for metric in metrics_of(rows):
            cells += [metric_of(metric).format(row[metric + suffix]) for suffix in variants_of(rows, metric)]
        table.add_row(row["run"], str(row["steps"]), *cells)
    return table


def plot_comparison(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = metrics_of(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 + 1.2 * len(rows) * len(metrics), 4), squeeze=False)
    x = np.arange(len(rows))
    for ax, metric in zip(axes[0], metrics):
        suffixes = variants_of(rows, metric)
        width = 0.8 / len(suffixes)
        for i, suffix in enumerate(suffixes):
            ax.bar(x + (i - (len(suffixes) - 1) / 2) * width, [r[metric + suffix] for r in rows], width,
                   label=VARIANTS[suffix])
        ax.set_xticks(x, [r["run"] for r in rows], rotation=30, ha="right", fontsize=8)
        spec = metric_of(metric)
        ax.set_title(spec.label(metric))
        if spec.log_scale:
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper left", ncol=2, frameon=False)
    path = Path(path)
    try:  # atomically, like every result file: never a cut PNG in the place of one
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return path
