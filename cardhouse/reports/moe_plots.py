"""Mixture-of-Experts figures: the router heat maps (House of Cards Fig. 5) and the super-expert map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..analysis.moe import MoEAnalysis
from .plots import plt, save_figure


def _matrix(analysis: MoEAnalysis, group: str) -> np.ndarray:
    width = max(r["n_experts"] for r in analysis.router)
    rows = [r[group]["probs"] + [np.nan] * (width - r["n_experts"]) for r in analysis.router]
    return np.array(rows)


def _layer_ticks(ax, layers: list[int]) -> None:
    step = max(1, len(layers) // 16)
    ax.set_yticks(range(0, len(layers), step), [str(l) for l in layers[::step]])


def plot_router(analysis: MoEAnalysis, path: str | Path, title: str | None = None) -> Path:
    """House of Cards Fig. 5: the router's probabilities, layers x experts, for the carrier token (left)
    beside the mean over ordinary tokens (right), on one colour scale; the collapse layer marked."""
    layers = [r["layer"] for r in analysis.router]
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.5 + 0.22 * len(layers)), dpi=120, sharey=True)
    labels = ("carrier token (position 0)", "ordinary tokens (mean)")
    for ax, group, label in zip(axes, ("carrier", "ordinary"), labels):
        image = ax.imshow(_matrix(analysis, group), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("expert")
        if analysis.collapse_layer is not None:
            ax.axhline(layers.index(analysis.collapse_layer), color="tab:red", lw=0.8, alpha=0.6)
    _layer_ticks(axes[0], layers)
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(image, ax=axes, fraction=0.03, label="router probability")
    collapse = (f"carrier collapses in layer {analysis.collapse_layer}" if analysis.collapse_layer is not None
                else f"no layer where the carrier's top-1 probability reaches {analysis.collapse}")
    fig.suptitle(title or f"{analysis.model['name']}: router probabilities ({collapse})", fontsize=10, y=1.04)
    return save_figure(fig, path, layout=False, bbox_inches="tight")  # tight_layout does not know the colour bar


def plot_super_experts(analysis: MoEAnalysis, path: str | Path, title: str | None = None) -> Path:
    """Largest |down-projection output| per expert over the calibration set (log colour), super experts
    circled; experts the router never chose are blank."""
    se = analysis.super_experts
    layers = [r["layer"] for r in analysis.router]
    width = max(r["n_experts"] for r in analysis.router)
    grid = np.full((len(layers), width), np.nan)
    for e in se["experts"]:
        if e["max_abs"] > 0:  # blank: never chosen on the calibration set
            grid[layers.index(e["layer"]), e["expert"]] = e["max_abs"]
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.22 * len(layers)), dpi=120)
    image = ax.imshow(np.log10(grid), aspect="auto", cmap="magma", interpolation="nearest")
    for e in se["flagged"]:
        ax.plot(e["expert"], layers.index(e["layer"]), "o", mfc="none", mec="tab:cyan", ms=9, mew=1.5)
    _layer_ticks(ax, layers)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    fig.colorbar(image, ax=ax, label="log10 max |W_down output|")
    ax.set_title(title or f"{analysis.model['name']}: super experts (circled; > P{se['percentile']:g} and "
                 f"> {se['fraction']:g} x layer max)", fontsize=9)
    return save_figure(fig, path)
