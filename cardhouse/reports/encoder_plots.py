"""Figures of the encoder analysis: the per-patch norm map over the photograph (Darcet et al. Fig. 2
style) and the carrier token's value and attention per layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..analysis.massive_activations import ScanResult
from .plots import plot_top_magnitudes, plt, save_figure


def model_view(inputs, index: int) -> np.ndarray:
    """The image exactly as the model saw it (resized, cropped): the processor's normalization undone."""
    pixels = inputs.pixel_values[index].double()
    mean = torch.tensor(getattr(inputs.processor, "image_mean", [0.5] * 3), dtype=torch.float64)[:, None, None]
    std = torch.tensor(getattr(inputs.processor, "image_std", [0.5] * 3), dtype=torch.float64)[:, None, None]
    return (pixels * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_norm_maps(inputs, maps: list | torch.Tensor, path: str | Path, *, count: int = 4, title: str = "") -> Path:
    """For the first ``count`` images: the photograph as the model saw it, and each patch token's norm drawn
    over it (one colour scale per image; the colour bar gives the norms)."""
    maps = torch.as_tensor(maps)
    count = min(count, len(inputs))
    fig, axes = plt.subplots(2, count, figsize=(3.1 * count, 6.4), dpi=110, squeeze=False)
    for i in range(count):
        view = model_view(inputs, i)
        axes[0, i].imshow(view)
        axes[0, i].set_title(inputs.names[i], fontsize=9)
        height, width = view.shape[:2]
        axes[1, i].imshow(view, alpha=0.45)
        shown = axes[1, i].imshow(maps[i].numpy(), cmap="inferno", alpha=0.75, interpolation="nearest",
                                  extent=(0, width, height, 0))
        fig.colorbar(shown, ax=axes[1, i], fraction=0.046, pad=0.03)
        axes[1, i].set_title(f"patch norms (max/median {float(maps[i].max() / maps[i].median()):.2f})", fontsize=8)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title or "Each patch token's norm after the last layer")
    return save_figure(fig, path)


def plot_carrier(result: dict, path: str | Path) -> Path:
    """Left: the carrier dim at the carrier token and at CLS, mean and spread across inputs, per layer.
    Right: the attention other tokens put on the carrier and on CLS, against a uniform spread."""
    carrier = result["carrier"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    for key, label in (("carrier_across_inputs", f"carrier ({carrier['role']})"), ("cls_across_inputs", "CLS")):
        rows = result[key]
        left.errorbar([r["layer"] for r in rows], [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                      fmt="o-", markersize=3, capsize=2, label=label)
    rows = result["carrier_across_inputs"]
    left.plot([r["layer"] for r in rows], [r["median_abs_all"] for r in rows], "x--", label="median |a| (all tokens)")
    left.set_xlabel("layer")
    left.set_ylabel(f"h[{carrier['dim']}] (mean ± std over inputs)")
    left.set_title(f"{result['model']['name']}: dimension {carrier['dim']}")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    att = result["attention"]
    layers = [a["layer"] for a in att]
    right.plot(layers, [a["on_carrier"] for a in att], "o-", markersize=3, label="on the carrier")
    right.plot(layers, [a["on_cls"] for a in att], "s:", markersize=3, label="on CLS")
    right.plot(layers, [a["uniform"] for a in att], "x--", label="uniform (1 / tokens)")
    right.set_yscale("log")
    right.set_xlabel("layer")
    right.set_ylabel("attention probability")
    right.set_title("attention of the other tokens (mean over heads)")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8)
    return save_figure(fig, path)


def plot_encoder(result: dict, inputs, out: Path, prefix: str = "") -> dict[str, str]:
    """The scan, carrier and (image models) norm-map figures of an ``analyze_encoder`` result, in ``out``."""
    out = Path(out)
    plots = {"top_magnitudes": str(plot_top_magnitudes(ScanResult(**result["scan"]), out / f"{prefix}scan.png")),
             "carrier": str(plot_carrier(result, out / f"{prefix}carrier.png"))}
    if "norm_maps" in result:
        plots["norm_maps"] = str(plot_norm_maps(inputs, result["norm_maps"]["maps"], out / f"{prefix}norm_map.png",
                                                title=f"{result['model']['name']}: each patch token's norm after "
                                                      f"layer {result['norm_maps']['layer']}"))
    return plots
