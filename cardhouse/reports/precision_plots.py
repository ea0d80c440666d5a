"""Plots of the precision commands: headroom per layer, the quantization study."""

from __future__ import annotations

from pathlib import Path

from .plots import plt, save_figure

_LIMITS = {"float16": ("float16 max 65,504", "tab:red"), "fp8_e4m3": ("FP8 E4M3 max 448", "tab:orange")}


def _per_layer(points: list[dict], point: str) -> tuple[list[int], list[float]]:
    rows = [p for p in points if p["point"] == point]
    return [p["layer"] for p in rows], [max(p["max_abs"], 1e-12) for p in rows]


def plot_headroom(headroom: dict, path: str | Path, title: str, after: dict | None = None,
                  power: int | None = None) -> Path:
    """Largest |a| per layer at each hook point (log scale) against the formats' largest values;
    with ``after``, the residual stream after the rescale (dashed)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(dict.fromkeys(p["point"] for p in headroom["points"]))
    for point in names:
        ax.plot(*_per_layer(headroom["points"], point), marker=".", label=point, linewidth=1.8 if "resid" in point else 1)
    if after is not None:
        ax.plot(*_per_layer(after["points"], "hook_resid_post"), "k--", marker="x",
                label=f"hook_resid_post after / 2^{power}")
    for fmt, (label, color) in _LIMITS.items():
        ax.axhline(headroom["formats"][fmt], color=color, linestyle=":", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("largest |activation|")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)
