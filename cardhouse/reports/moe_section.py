"""The report's Mixture-of-Experts section (a step of ``reports.steps``; it appears for MoE models only)."""

from __future__ import annotations

from ..analysis.moe import analyze_moe
from ..evaluation.measure import measurer
from ..evaluation.metrics import metric_keys, metric_of
from ..interventions import run_variants
from ..interventions.experts import EXPERT_ATTACKS, MOE_ATTACKS, SUPER_EXPERTS, ExpertTarget, expert_attack
from ..interventions.variants import original
from .html import Figure, Section, Table, facts
from .moe_plots import plot_router, plot_super_experts


def is_moe(ctx) -> bool:
    return ctx.lm.blocks.is_moe


def moe_step(ctx) -> Section:
    """House of Cards Fig. 5 and Table 7 for an MoE model: where the router sends the carrier token, the
    expert that holds the massive weights, the super experts, and the MoE attacks beside their controls."""
    lm, s, mw = ctx.lm, ctx.settings, ctx.need("weights")
    a = analyze_moe(lm, ctx.prompts, k=s.k, layer=mw.layer, progress=False, massive_weights=False)
    a.massive_weights = mw.to_dict()
    summary = facts("Experts and routing", {
        "MoE layers": len(a.moe_layers), "experts per layer": a.n_experts, "experts per token": a.top_k,
        "shared expert": a.shared_expert, "carrier routing collapses in layer": a.collapse_layer,
        "collapsed layers (top-1 ≥ " + f"{a.collapse})": a.collapsed_layers,
        "expert holding the massive weights": mw.expert, "super experts flagged": len(a.flagged)})
    router = Table("The router per MoE layer: the position-0 (carrier) token and the ordinary tokens",
                   ["layer", "carrier top-1", "carrier's expert", "carrier entropy", "ordinary top-1",
                    "ordinary entropy"],
                   [[r["layer"], r["carrier"]["top1"], r["carrier"]["top1_expert"], r["carrier"]["entropy"],
                     r["ordinary"]["top1"], r["ordinary"]["entropy"]] for r in a.router])
    tables = [summary, router]
    if mw.experts:
        tables.append(Table(f"The carrier's experts in layer l = {mw.layer} (House of Cards Table 7)",
                            ["expert", "routing weight", f"adds to dim {mw.dim}", "top-k intermediate indices"],
                            [[e["expert"], e["weight"], e["contribution"], e["indices"]] for e in mw.experts]))
    se = a.super_experts
    tables.append(Table(f"Super experts: max |W_down output| above P{se['percentile']:g} of all experts and above "
                        f"{se['fraction']:g} of their layer's largest",
                        ["layer", "expert", "max |output|", "tokens routed"],
                        [[e["layer"], e["expert"], e["max_abs"], e["tokens"]] for e in se["flagged"]]))
    text = list(a.notes)
    rows = []
    if mw.expert is None:
        text.append(f"Layer l = {mw.layer} is a dense FFN layer: no expert attacks.")
    else:
        target = ExpertTarget.build(lm, mw, k=s.attack_k, super_experts=a.flagged, seed=s.seed)
        kinds = [k for attack, controls in MOE_ATTACKS.items() for k in (attack, *controls)
                 if a.flagged or EXPERT_ATTACKS[k].aims_at != SUPER_EXPERTS]
        rows = run_variants(lm, [original()] + [expert_attack(target, k, seed=s.seed) for k in kinds],
                            measurer(lm, s.budget(), progress=False))
        metrics = metric_keys(rows[0])
        tables.append(Table("Attacks on the carrier's expert and on the super experts, each beside its controls",
                            ["variant", "what is changed", *(metric_of(m).label(m) for m in metrics)],
                            [[r["variant"], r["description"], *(r[m] for m in metrics)] for r in rows]))
    router_png = plot_router(a, ctx.figure("moe_router"))
    super_png = plot_super_experts(a, ctx.figure("moe_super_experts"))
    return Section(
        text=text, tables=tables,
        figures=[Figure(router_png.name, "Router probabilities per MoE layer and expert, for the position-0 token "
                                         "(left) and the mean over ordinary tokens (right), House of Cards Fig. 5."),
                 Figure(super_png.name, "The largest |output| of each expert's down projection over the prompts; "
                                        "super experts circled, experts never chosen blank.")],
        data={"moe": a.to_dict(), "budget": s.budget().to_dict(), "results": rows})
