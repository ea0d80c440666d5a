"""Plots of the precision commands: headroom per layer, the quantization study."""

from __future__ import annotations

from pathlib import Path

from ..evaluation.metrics import PPL, metric_of
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


_PROTECT_COLORS = {"none": "0.55", "massive-rows": "tab:red", "random-rows": "mistyrose", "super-weight": "tab:purple",
                   "random-weight": "thistle", "bos-kv": "tab:blue", "random-kv": "lightsteelblue",
                   "massive-dims": "tab:green", "random-dims": "honeydew"}


def plot_quantization(table: dict[str, dict[str, float]], baseline: float, path: str | Path, title: str,
                      key: str = PPL.key("wikipedia")) -> Path:
    """The metric ``key`` (perplexity by default, log scale) per scheme (groups) and protection (bars; pale: the
    random control), against the unquantized model's value."""
    import math

    import numpy as np

    spec = metric_of(key)

    schemes = list(table)
    protections = list(dict.fromkeys(p for row in table.values() for p in row))
    width = 0.8 / max(len(protections), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(schemes)), 4.5))
    x = np.arange(len(schemes))
    for i, protect in enumerate(protections):
        values = [table[s].get(protect, math.nan) for s in schemes]
        shown = [v if math.isfinite(v) else math.nan for v in values]
        ax.bar(x + (i - (len(protections) - 1) / 2) * width, shown, width, label=protect,
               color=_PROTECT_COLORS.get(protect, None), edgecolor="0.3", linewidth=0.4)
    ax.axhline(baseline, color="k", linestyle="--", linewidth=1, label=f"float32 {spec.format(baseline)}")
    ax.set_xticks(x, schemes, fontsize=8)
    if spec.log_scale:
        ax.set_yscale("log")
    ax.set_ylabel(spec.label(key))
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=3)
    return save_figure(fig, path)
