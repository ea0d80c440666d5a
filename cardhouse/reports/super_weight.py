"""Tables and the figure of ``cardhouse super-weight``: the spikes, the contributions, the damage."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..analysis.super_weight import SuperWeightScan
from ..evaluation.metrics import metric_keys
from .plots import plt, save_figure


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3g}"


def super_weight_tables(scan: SuperWeightScan, console: Console, damage: dict | None = None) -> None:
    t = Table(title=f"Down projections: largest |input| and |output| per layer ({scan.prompts} prompts, "
                    f"{scan.tokens} tokens); spike = both > {scan.ratio:g} x the median over layers")
    for c in ("layer", "max |input|", "channel", "x median", "max |output|", "dim", "x median", "spike"):
        t.add_column(c, justify="right")
    for row in scan.layers:
        t.add_row(str(row["layer"]), _num(row["input_max"]), str(row["input_channel"]), _num(row["input_ratio"]),
                  _num(row["output_max"]), str(row["output_dim"]), _num(row["output_ratio"]),
                  "yes" if row["spike"] else "", style="bold red" if row["spike"] else None)
    console.print(t)
    for sw in scan.super_weights:
        console.print(f"[bold]Super weight[/bold] (Yu et al.): layer {sw.layer} W_down[{sw.row}, {sw.column}] = "
                      f"{sw.value:.4g}; input a_{sw.column} = {_num(sw.input)} on token {sw.carrier['token']!r} "
                      f"(position {sw.carrier['position']}); it writes {_num(sw.contribution)} of the super "
                      f"activation {_num(sw.output)} ({sw.share:.1%})"
                      + ("" if sw.same_token else "; the input spike sits on another token"))
        c = Table(title=f"Layer {sw.layer}, row {sw.row}: the largest contributions W_down[{sw.row}, j] * a_j")
        for col in ("channel", "W_down[r, j]", "a_j", "contribution", "share"):
            c.add_column(col, justify="right")
        for entry in sw.contributions:
            c.add_row(str(entry["channel"]), f"{entry['weight']:.4g}", _num(entry["input"]),
                      _num(entry["contribution"]), f"{entry['share']:.1%}")
        console.print(c)
        big = sw.largest_down_entry
        if big["column"] == sw.column:  # (it said "not the super weight" and named the same coordinate)
            console.print(f"The row's largest entry is the super weight itself: W_down[{sw.row}, {sw.column}]")
        else:
            console.print(f"The row's largest entry (not the super weight): W_down[{sw.row}, {big['column']}] = "
                          f"{big['value']:.4g}, input {_num(big['input'])}, contribution {_num(big['contribution'])} "
                          f"({big['share']:.1%})")
    for note in scan.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if damage:
        damage_tables(damage, console)


def damage_tables(damage: dict, console: Console) -> None:
    metrics = metric_keys(damage["original"])
    t = Table(title="Candidates zeroed one at a time, most damaging first (damage = perplexity / original, "
                    "geometric mean over corpora)")
    for c in ("candidate", "weights", "share", *metrics, "damage"):
        t.add_column(c, justify="left" if c in ("candidate", "weights") else "right")
    t.add_row("original", "", "", *(_num(damage["original"][m]) for m in metrics), "1")
    for r in damage["candidates"]:
        t.add_row(r["name"], r["label"], "" if r["share"] is None else f"{r['share']:.1%}",
                  *(_num(r[m]) for m in metrics), _num(r["damage"]), style="dim" if r["control"] else None)
    console.print(t)
    if damage["pairs"]:
        p = Table(title="Pairs: log excess < 0 means one hides the other's damage")
        for c in ("a", "b", "damage a", "damage b", "damage both", "log excess"):
            p.add_column(c)
        for r in damage["pairs"]:
            p.add_row(r["a_name"], r["b_name"], _num(r["damage_a"]), _num(r["damage_b"]), _num(r["damage"]),
                      _num(r["log_excess"]))
        console.print(p)
    for r in damage["restore"]:
        returned = "-" if r["returned"] is None else f"{r['returned']:.0%}"
        console.print(escape(f"Super activation restored (layer {r['layer']}, W_down[{r['row']}, {r['column']}] "
                             f"zeroed, FFN output at [position {r['position']}, {r['row']}] set to "
                             f"{_num(r['super_activation'])}): damage {_num(r['damage_zeroed'])} -> "
                             f"{_num(r['damage_restored'])}; {returned} of it returns"))


def plot_super_weights(scan: SuperWeightScan, path: str | Path, title: str = "", damage: dict | None = None) -> Path:
    """Left: the largest |input| and |output| of each layer's down projection (Yu et al. Fig. 3 style),
    with the spike thresholds. Right (with ``damage``): each candidate's damage, controls in grey."""
    panels = 2 if damage else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4), dpi=120, squeeze=False)
    ax = axes[0][0]
    layers = [r["layer"] for r in scan.layers]
    ax.plot(layers, [r["input_max"] for r in scan.layers], "o-", markersize=3, label="max |input| of W_down")
    ax.plot(layers, [r["output_max"] for r in scan.layers], "s-", markersize=3, label="max |output| of W_down")
    ax.axhline(scan.ratio * scan.median_input, color="tab:blue", ls=":", lw=1, label="input spike threshold")
    ax.axhline(scan.ratio * scan.median_output, color="tab:orange", ls=":", lw=1, label="output spike threshold")
    for sw in scan.super_weights:
        ax.axvline(sw.layer, color="tab:red", alpha=0.3, lw=4)
        ax.annotate(f"layer {sw.layer}: W_down[{sw.row}, {sw.column}]", (sw.layer, abs(sw.output)), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_title("down projection spikes (red: super weights)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    if damage:
        ax = axes[0][1]
        rows = damage["candidates"][::-1]
        values = [r["damage"] if r["damage"] != float("inf") else 1e9 for r in rows]
        colors = ["tab:gray" if r["control"] else "tab:red" for r in rows]
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_yticks(range(len(rows)), [f"{r['name']}: {r['label']}" for r in rows], fontsize=6)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xlabel("perplexity / original (grey: random controls)")
        ax.set_title("damage of zeroing each candidate", fontsize=9)
        ax.grid(alpha=0.3, axis="x", which="both")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
