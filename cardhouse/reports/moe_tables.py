"""Terminal tables of the Mixture-of-Experts analysis (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..analysis.moe import MoEAnalysis
from .tables import _num


def moe_tables(analysis: MoEAnalysis, console: Console, *, max_experts: int = 8) -> None:
    a = analysis
    t = Table(title=f"{a.model['name']}: router per MoE layer ({a.n_experts} experts, top-{a.top_k}"
                    + (", shared expert" if a.shared_expert else "") + f", {a.prompts} prompts)")
    for c in ("layer", "carrier top-1", "its expert", "carrier entropy", "ordinary top-1", "ordinary entropy"):
        t.add_column(c, justify="right")
    for r in a.router:
        c, o = r["carrier"], r["ordinary"]
        style = "bold red" if r["layer"] in a.collapsed_layers else None
        t.add_row(str(r["layer"]), f"{c['top1']:.3f}", str(c["top1_expert"]), f"{c['entropy']:.2f}",
                  f"{o['top1']:.3f}", f"{o['entropy']:.2f}", style=style)
    console.print(t)
    console.print(f"Carrier routing collapses (top-1 >= {a.collapse}) in layers {a.collapsed_layers or 'none'}"
                  + (f"; first: {a.collapse_layer}" if a.collapse_layer is not None else "") + ".")
    mw = a.massive_weights
    if mw and mw["experts"]:
        e = Table(title=f"The carrier's experts in the massive-weight layer {mw['layer']} (-> dim {mw['dim']}; "
                        "House of Cards Table 7)")
        for c in ("expert", "routing weight", f"adds to dim {mw['dim']}", "top intermediate indices"):
            e.add_column(c, justify="right")
        for row in mw["experts"]:
            e.add_row(str(row["expert"]), f"{row['weight']:.3f}", _num(row["contribution"]),
                      ", ".join(map(str, row["indices"])), style="bold red" if row["expert"] == mw["expert"] else None)
        console.print(e)
    se = a.super_experts
    s = Table(title=f"Super experts: max |W_down output| > P{se['percentile']:g} ({_num(se['threshold'])}) "
                    f"and > {se['fraction']:g} x the layer's largest")
    for c in ("layer", "expert", "max |output|", "tokens routed", "at prompt", "position", "dim"):
        s.add_column(c, justify="right")
    for row in se["flagged"][:max_experts * 4]:
        s.add_row(*(str(row.get(k, "")) if k != "max_abs" else _num(row[k])
                    for k in ("layer", "expert", "max_abs", "tokens", "prompt", "position", "dim")))
    console.print(s if se["flagged"] else "[yellow]No super experts by this rule.[/yellow]")
    for note in a.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
