"""Curves over training for the variants (Sun et al. Figs. 9-10 style) and the final side-by-side table."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..reports.plots import save_figure  # noqa: E402

COLORS = {"standard": "tab:blue", "bias": "tab:orange", "sink": "tab:green"}


def plot_curves(runs: dict[str, dict], path: str | Path, baselines: dict[str, float] | None = None) -> Path:
    """Loss, largest |a| and median, top-1/median ratio and attention shares over training; final per layer.

    ``baselines``: held-out losses of counting models (``ngram_baselines``), drawn as lines.
    """
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), dpi=110)
    (loss, mags, ratio), (attn, final, final_attn) = axes
    for variant, run in runs.items():
        h, c = run["history"], COLORS.get(variant)
        steps = [r["step"] for r in h]
        trained = [r for r in h if r["train_loss"] is not None]
        loss.plot([r["step"] for r in trained], [r["train_loss"] for r in trained], ":", color=c,
                  label=f"{variant} train")
        loss.plot(steps, [r["val_loss"] for r in h], "-", color=c, label=f"{variant} held-out")
        peak = [r["layers"][r["max_ratio_layer"]] for r in h]  # the layer where top-1 stands out most
        mags.plot(steps, [p["top-1"] for p in peak], "-", color=c, label=f"{variant} top-1")
        mags.plot(steps, [p["median"] for p in peak], "--", color=c, label=f"{variant} median")
        ratio.plot(steps, [r["max_ratio"] for r in h], "-", color=c, label=variant)
        attn.plot(steps, [_mean(r["attention"]["first_token"]) for r in h], "-", color=c,
                  label=f"{variant}: on the first token")
        has_slot = run["model"]["attn_bias"]
        if has_slot:
            attn.plot(steps, [_mean(r["attention"]["k_bias"]) for r in h], "--", color=c, label=f"{variant}: on k'")
        last = h[-1]
        layers = [r["layer"] for r in last["layers"]]
        final.plot(layers, [r["top-1"] for r in last["layers"]], "o-", color=c, label=f"{variant} top-1")
        final.plot(layers, [r["median"] for r in last["layers"]], "x--", color=c, label=f"{variant} median")
        final_attn.plot(layers, last["attention"]["first_token"], "o-", color=c, label=f"{variant}: first token")
        if has_slot:
            final_attn.plot(layers, last["attention"]["k_bias"], "s--", color=c, label=f"{variant}: k'")
    for (name, value), style in zip((baselines or {}).items(), (":", "--")):
        loss.axhline(value, color="gray", linestyle=style, linewidth=1, label=f"{name} model, held-out")
    loss.set(title="cross-entropy", xlabel="step")
    mags.set(title="top-1 and median |a| (layer of the largest ratio)", xlabel="step", yscale="log")
    ratio.set(title="top-1 / median |a| (largest over layers)", xlabel="step", yscale="log")
    attn.set(title="attention share (mean over layers, heads, queries)", xlabel="step", ylim=(0, 1))
    final.set(title="final: top-1 and median |a| per layer", xlabel="layer", yscale="log")
    final_attn.set(title="final: attention share per layer", xlabel="layer", ylim=(0, 1))
    for ax in axes.flat:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def side_by_side(runs: dict[str, dict]) -> dict:
    """Table-1-style statistics per layer of the final models, with both variants' losses."""
    final = {v: r["history"][-1] for v, r in runs.items()}
    n_layers = len(next(iter(final.values()))["layers"])
    layers = [{"layer": layer, **{v: {k: f["layers"][layer][k] for k in ("top-1", "top-2", "top-3", "median", "ratio",
                                                                         "top_dim", "top_position", "top_token")}
                                  | {"attention_first_token": f["attention"]["first_token"][layer],
                                     "attention_k_bias": f["attention"]["k_bias"][layer]}
                                  for v, f in final.items()}}
              for layer in range(n_layers)]
    summary = {v: {"step": f["step"], "val_loss": f["val_loss"], "best_val_loss": min(r["val_loss"] for r in
                                                                                       runs[v]["history"]),
                   "max_top1": f["max_top1"], "max_ratio": f["max_ratio"], "massive_layers": f["massive_layers"],
                   "massive_dims": f["massive_dims"]} for v, f in final.items()}
    return {"summary": summary, "layers": layers}
