"""PNG figures of the mechanism analyses: attention sinks and updates, heat maps, the BOS trace, the position study."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..analysis.attention import GROUPS, AttentionResult  # noqa: E402
from ..analysis.attention_map import AttentionMap  # noqa: E402
from ..analysis.position import PositionStudy  # noqa: E402
from ..analysis.trace import STATES, UPDATES, BosTrace  # noqa: E402
from .plots import save_figure  # noqa: E402




def _mark(ax, layer: int | None, label: str = "l") -> None:
    if layer is not None:
        ax.axvline(layer, color="tab:red", ls=":", lw=1, label=f"{label} = {layer}")


def plot_attention(result: AttentionResult, path: str | Path, title: str = "") -> Path:
    """Sun et al. Sec. 4: attention share on set C per layer and head, sinks per token group, set-C updates."""
    layers = [r["layer"] for r in result.layers]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2), dpi=110)
    grid = np.array([r["concentration"] for r in result.layers]).T  # [head, layer]
    im = axes[0].imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    fig.colorbar(im, ax=axes[0], fraction=0.04)
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("head")
    axes[0].set_title("attention share of ordinary tokens on set C")
    if result.massive_layer is not None:
        axes[0].axvline(result.massive_layer + 0.5, color="white", ls=":", lw=1)
    for g in GROUPS:
        values = [r["sink_heads"].get(g) for r in result.layers]
        if any(v is not None for v in values):
            axes[1].plot(layers, [np.nan if v is None else v for v in values], "o-", ms=3, label=g)
    _mark(axes[1], result.massive_layer)
    axes[1].set_ylim(-0.03, 1.03)
    axes[1].set_xlabel("layer")
    axes[1].set_title(f"fraction of heads where the token group is a sink (> {result.threshold})")
    axes[1].legend(fontsize=8)
    for key, style, label in (("cos_c_all", "o-", "cos, set-C part"), ("cos_rest_all", "s--", "cos, rest"),
                              ("norm_share_c", "^:", "norm share of set-C part")):
        axes[2].plot(layers, [r["update"].get(key, np.nan) for r in result.layers], style, ms=3, label=label)
    _mark(axes[2], result.massive_layer)
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].set_xlabel("layer")
    axes[2].set_title("value updates across queries and prompts")
    axes[2].legend(fontsize=8)
    for ax in axes[1:]:
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"{result.model['name']}: attention and massive activations ({result.prompts} prompts)")
    return save_figure(fig, path)


def plot_attention_map(amap: AttentionMap, path: str | Path, title: str = "") -> Path:
    """Logits and probabilities of one head (Sun et al. Figs. 5-6)."""
    panels = [("logits", amap.logits.numpy(), "coolwarm"), ("probabilities", amap.probs.numpy(), "viridis")]
    n = len(amap.tokens)
    size = min(6.0, 2.0 + 0.25 * n)
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels) + 1, size), dpi=110, squeeze=False)
    labels = [t.replace("\n", "\\n") for t in amap.tokens]
    for ax, (name, values, cmap) in zip(axes[0], panels):
        im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap)
        fig.colorbar(im, ax=ax, fraction=0.04)
        ax.set_title(name)
        if n <= 40:
            ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.suptitle(title or f"layer {amap.layer}, head {amap.head}")
    return save_figure(fig, path)


def plot_trace(trace: BosTrace, path: str | Path, title: str = "") -> Path:
    """House of Cards Fig. 3 and Sun et al. Fig. 7: the BOS token's states per layer, its intermediate
    top-k values, and the q/k/v norms of the massive tokens against the others."""
    layers = [r["layer"] for r in trace.states]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2), dpi=110)
    for label in [*STATES, *UPDATES]:
        style = "x:" if label in UPDATES else "o-"
        axes[0].plot(layers, [r[label]["max_abs"] for r in trace.states], style, ms=3, label=label)
    axes[0].set_yscale("log")
    axes[0].set_title(f"BOS token: max |x| of each state (massive dim {trace.dim})")
    if trace.intermediate:
        k = len(trace.intermediate[0]["values"])
        for rank in range(k):
            axes[1].plot(layers, [abs(r["values"][rank]) for r in trace.intermediate], "o-", ms=3,
                         label=f"top-{rank + 1}")
        axes[1].set_yscale("log")
        axes[1].set_title(f"BOS intermediate state |act(W_gate x)(W_up x)|; layer {trace.layer}: {trace.indices[:3]}")
    for who, style in (("massive", "-"), ("other", "--")):
        for name, color in (("q", "tab:blue"), ("k", "tab:orange"), ("v", "tab:green")):
            key = f"{who}_{name}"
            if trace.qkv and key in trace.qkv[0]:
                axes[2].plot([r["layer"] for r in trace.qkv], [r.get(key, np.nan) for r in trace.qkv], style,
                             color=color, label=f"|{name}| {who}")
    axes[2].set_title("q/k/v projection norms: massive tokens vs others")
    for ax in axes:
        _mark(ax, trace.layer)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title or f"{trace.model['name']}: where the BOS token's massive activation comes from")
    return save_figure(fig, path)


def plot_position(study: PositionStudy, path: str | Path, title: str = "") -> Path:
    """House of Cards Fig. 2: the largest activation per layer with BOS at each placement, and who carries it."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), dpi=110)
    layers = [r["layer"] for r in study.layers]
    for placement in study.bos_position:
        axes[0].plot(layers, [abs(r[placement]["value"]) for r in study.layers], "o-", ms=3, label=placement)
        bos = [r[placement]["at_dim"]["bos"] for r in study.layers]
        if bos[0] is not None:
            axes[1].plot(layers, [abs(v) for v in bos], "o-", ms=3, label=f"BOS ({placement})")
        axes[1].plot(layers, [abs(r[placement]["at_dim"]["position 0"]) for r in study.layers], "x--", ms=3,
                     label=f"position 0 ({placement})")
    axes[0].set_title("largest |h| in the residual stream")
    axes[1].set_title(f"|h[{study.dim}]| at the BOS token and at position 0")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    carriers = ", ".join(f"{p}: {s['role']} {s['token']!r}" for p, s in study.summary.items())
    fig.suptitle(title or f"{study.model['name']}: BOS placement; carrier at layer {study.reference_layer}: {carriers}",
                 fontsize=9)
    return save_figure(fig, path)
