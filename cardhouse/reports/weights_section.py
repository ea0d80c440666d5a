"""The report's massive-weight sections (House of Cards): the FFN that writes the massive activation,
then the attacks on its rows beside their random controls and the sweep over k."""

from __future__ import annotations

import itertools

from ..analysis import find_massive_weights
from ..evaluation.measure import measurer
from ..evaluation.metrics import metric_keys, metric_of
from ..interventions import ATTACKS, attack, run_variants, sweep_attacks
from ..interventions.sweep import default_ks, sweep, sweep_table
from .context import Context
from .html import Figure, Section, Table, facts
from .plots import plot_bos_trace, plot_sweep


def weights_step(ctx: Context) -> Section:
    lm, s = ctx.lm, ctx.settings
    mw = find_massive_weights(lm, ctx.prompts, k=s.k, layer=s.layer, criterion=s.criterion)
    ctx.keep("weights", mw)
    sw = mw.super_weight
    summary = facts("The FFN that writes the massive activation", {
        "layer l": mw.layer, "hidden dim": mw.dim, "top-k indices": mw.indices, "intermediate size":
        mw.intermediate_size, "expert": mw.expert, "gated FFN": mw.gated, "weights in the top-k rows": mw.n_weights,
        "super weight (Yu et al.)": f"W_down[{sw['row']}, {sw['column']}]", "super weight value": sw["value"],
        "largest W_down entry of the top-k": f"W_down[{mw.largest_down_entry['row']}, "
                                            f"{mw.largest_down_entry['column']}]",
        "same top-k in every prompt": mw.stable_across_prompts})
    norm_keys = [k for k in mw.rows[0] if k.endswith("_norm")]
    rows = Table("The top-k intermediate indices of the position-0 token in layer l, and their weights",
                 ["index", "activation", *(k.replace("_norm", " norm") for k in norm_keys), "W_down[dim, index]"],
                 [[r["index"], a, *(r[k] for k in norm_keys), r["down_at_dim"]]
                  for r, a in zip(mw.rows, mw.activations)])
    trace = Table("The position-0 token's value in the massive dim, layer by layer",
                  ["layer", "before", "attention adds", "FFN adds", "after"],
                  [[t["layer"], t["resid_pre"], t["attention"], t["ffn"], t["resid_post"]] for t in mw.trace])
    png = plot_bos_trace(mw.trace, mw.dim, mw.layer, ctx.figure("bos_trace"), lm.name)
    return Section(
        text=list(mw.notes), tables=[summary, rows, trace],
        figures=[Figure(png.name, "The position-0 token's value in the massive dim after each layer, with what "
                                  "attention and the FFN add to it; the dotted line marks layer l.")],
        data={"massive_weights": mw.to_dict()})


def attacks_step(ctx: Context) -> Section:
    lm, s, mw = ctx.lm, ctx.settings, ctx.need("weights")
    ks = sorted({*(s.ks if s.ks is not None else default_ks(mw.intermediate_size)), s.attack_k})
    measure = measurer(lm, s.budget(), progress=False)
    count = itertools.count(1)

    def measured(model):
        ctx.tick(f"variant {next(count)}")
        return measure(model)

    ranked = find_massive_weights(lm, layer=mw.layer, k=mw.intermediate_size, criterion=s.criterion)  # all, ranked
    rows = sweep(lm, ranked, measured, ks, seed=s.seed, progress=False)  # a fresh sweep, never a resumed one
    rows += run_variants(lm, [attack(lm, mw, kind, seed=s.seed) for kind, spec in ATTACKS.items() if not spec.takes_k],
                         measured)
    metrics = metric_keys(rows[0])
    base = next(r for r in rows if r["kind"] == "original")
    chosen = [r for r in rows if r["kind"] == "original" or r["k"] in (None, s.attack_k)]
    first = metrics[0]
    label = {m: metric_of(m).label(m) for m in metrics}  # "perplexity (wikipedia)": the page's words, not row keys
    table = Table("Attacks on layer l and their random controls (k = number of rows)",
                  ["variant", "what is changed", *(label[m] for m in metrics), f"{label[first]} / original"],
                  [[r["variant"], r["description"], *(r[m] for m in metrics), r[first] / base[first]] for r in chosen])
    curves = {m: sweep_table(rows, m) for m in metrics}
    kinds = sweep_attacks()
    sweep_rows = Table(f"The sweep: {label[first]} as k grows", ["k", *kinds],
                       [[k, *(dict(curves[first][kind]).get(k) for kind in kinds)]
                        for k in sorted({k for points in curves[first].values() for k, _ in points})])
    png = plot_sweep(curves, ctx.figure("sweep"), f"{lm.name}: top-k zeroing and retaining, layer {mw.layer}")
    return Section(
        text=["Top-k zeroing sets the W_up and W_gate rows of the k largest intermediate indices of layer l to zero; "
              "top-k retaining keeps only those rows. Each has a control that does the same to k random rows, and "
              "every edit is undone bit-identically before the next variant is measured."],
        tables=[table, sweep_rows],
        figures=[Figure(png.name, "Perplexity as more rows are zeroed or retained, for the top-k rows and for "
                                  "random rows, on log scales.")],
        data={"budget": s.budget().to_dict(), "results": rows})
