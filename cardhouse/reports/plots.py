"""PNG figures (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .._files import write_atomically  # noqa: E402
from ..analysis.massive_activations import ScanResult  # noqa: E402
from ..evaluation.metrics import metric_of  # noqa: E402
from ..interventions.variants import get_attack  # noqa: E402



def save_figure(fig, path: str | Path, layout: bool = True, **savefig) -> Path:
    """Lay out, write and close a figure (closing matters: pyplot keeps every open figure alive). Written
    atomically like every result file: a full disk or a kill never leaves a cut PNG in the place of one."""
    if layout:
        fig.tight_layout()
    path = Path(path)
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig))
    finally:
        plt.close(fig)
    return path

def plot_top_magnitudes(scan: ScanResult, path: str | Path, title: str | None = None) -> Path:
    """Sun et al. Fig. 1 style: top-1/2/3 and median |activation| per layer, log scale."""
    layers = [row["layer"] for row in scan.layers]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    for key, style in (("top-1", "o-"), ("top-2", "s-"), ("top-3", "^-"), ("median", "x--")):
        ax.plot(layers, [row[key] for row in scan.layers], style, markersize=3, label=key)
    for layer in scan.massive_layers:
        ax.axvspan(layer - 0.5, layer + 0.5, color="tab:red", alpha=0.08, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("|activation| (mean over prompts)")
    ax.set_title(title or f"{scan.model['name']}: largest residual-stream magnitudes (shaded: massive)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)


def plot_bos_trace(trace: list[dict], dim: int, layer: int, path: str | Path, name: str = "") -> Path:
    """The BOS token's value in the massive dimension, and the attention and FFN contributions per layer."""
    layers = [t["layer"] for t in trace]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    ax.plot(layers, [t["resid_post"] for t in trace], "o-", markersize=3, label=f"h[{dim}] after the layer")
    ax.bar([l - 0.2 for l in layers], [t["ffn"] for t in trace], width=0.4, label="FFN contribution")
    ax.bar([l + 0.2 for l in layers], [t["attention"] for t in trace], width=0.4, label="attention contribution")
    ax.axvline(layer, color="tab:red", ls=":", label=f"layer {layer} (massive weights)")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("layer")
    ax.set_title(f"{name} BOS token, dimension {dim}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_sweep(curves_by_metric: dict[str, dict[str, list[tuple[int, float]]]], path: str | Path,
               title: str = "") -> Path:
    """House of Cards Fig. 4 style: one panel per metric, a curve per attack and its random control."""
    fig, axes = plt.subplots(1, len(curves_by_metric), figsize=(6 * len(curves_by_metric), 3.8), dpi=120,
                             squeeze=False)
    for ax, (metric, curves) in zip(axes[0], curves_by_metric.items()):
        for kind, points in curves.items():
            if points:
                ax.plot([k + 1 for k, _ in points], [v for _, v in points], get_attack(kind).style, markersize=3,
                        label=kind)
        ax.set_xscale("log")  # of k + 1, so that k = 0 has a place; the ticks name k itself (not 2 x 10^0)
        ks = sorted({k for points in curves.values() for k, _ in points})
        ax.set_xticks([k + 1 for k in ks], [str(k) for k in ks], fontsize=7, rotation=45)  # 1000, 1536 close
        ax.set_xticks([], minor=True)
        ax.set_xlabel("k (rows of W_up and W_gate; log scale of k + 1)")
        spec = metric_of(metric)
        ax.set_ylabel(spec.label(metric) if spec else metric)
        if spec and spec.log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_longctx(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Retrieval accuracy by context length (x) and needle depth (y): one heat map per task and variant."""
    kinds = list(dict.fromkeys(c["kind"] for c in rows[0]["cells"]))
    lengths = sorted({c["length"] for c in rows[0]["cells"]})
    depths = sorted({c["depth"] for c in rows[0]["cells"]})
    # constrained layout leaves the colour bar its own room (tight_layout ignores it and drew it over a panel)
    fig, axes = plt.subplots(len(kinds), len(rows), figsize=(2.6 * len(rows) + 1, 2.4 * len(kinds) + 0.6), dpi=120,
                             squeeze=False, layout="constrained")
    for col, row in enumerate(rows):
        for r, kind in enumerate(kinds):
            grid = [[next(c["accuracy"] for c in row["cells"] if (c["kind"], c["length"], c["depth"]) == (kind, n, d))
                     for n in lengths] for d in depths]
            ax = axes[r][col]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_title(f"{row['variant']}\n{kind}", fontsize=8)
            if col == 0:
                ax.set_ylabel("depth")
            if r == len(kinds) - 1:
                ax.set_xlabel("context length")
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, layout=False)
