"""The comparison's table and plot: each run's metrics, original vs top-3 zeroed (House of Cards Table 4)."""

from __future__ import annotations

from pathlib import Path


def metrics_of(rows: list[dict]) -> list[str]:
    """Metrics measured both ways: val_loss, ppl_<corpus>, acc_<task>."""
    return [key for key in rows[0] if f"{key}_attacked" in rows[0]]


def comparison_table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("run", no_wrap=True)
    table.add_column("steps", justify="right")
    for metric in metrics_of(rows):
        table.add_column(metric, justify="right")
        table.add_column(f"{metric} attacked", justify="right")
    for row in rows:
        cells = []
        for metric in metrics_of(rows):
            cells += [f"{row[metric]:,.3f}", f"{row[f'{metric}_attacked']:,.3f}"]
        table.add_row(row["run"], str(row["steps"]), *cells)
    return table


def plot_comparison(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = metrics_of(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 + 1.2 * len(rows) * len(metrics), 4), squeeze=False)
    x = np.arange(len(rows))
    for ax, metric in zip(axes[0], metrics):
        ax.bar(x - 0.2, [r[metric] for r in rows], 0.4, label="original")
        ax.bar(x + 0.2, [r[f"{metric}_attacked"] for r in rows], 0.4, label="top-3 zeroed")
        ax.set_xticks(x, [r["run"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        if metric.startswith("ppl"):
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper left", ncol=2, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
