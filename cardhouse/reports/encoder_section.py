"""The report section of an encoder (vision transformer or sentence encoder): ``cardhouse encoder`` on a page.

Image models show the per-patch norm map over real photographs first (Darcet et al. Fig. 2 style),
then the carrier token, its FFN neurons, the interventions with their measures, attention on the
carrier and, for image models, the test-time register.
"""

from __future__ import annotations

from ..analysis import load_prompts
from ..encoders.analysis import SUN_ET_AL, analyze_encoder  # (its measures module registers the encoder metrics)
from ..evaluation.metrics import metric_keys
from ..encoders.images import load_images
from ..encoders.inputs import ImageInputs, SentenceInputs
from .encoder_plots import plot_encoder
from .html import Figure, Section, Table, facts


def encoder_step(ctx) -> Section:
    lm, s = ctx.lm, ctx.settings
    if lm.inputs == "image":
        inputs = ImageInputs(lm, load_images(s.images, limit=s.prompt_limit))
    else:
        inputs = SentenceInputs(lm, load_prompts(s.sentences, limit=s.prompt_limit))
    result = analyze_encoder(lm, inputs, criterion=s.criterion, k=s.k, attack_k=s.attack_k, seed=s.seed,
                             pairs=s.pairs, copies=s.copies, tick=ctx.tick)
    plot_encoder(result, inputs, ctx.folder, prefix=ctx.prefix)
    c, mw = result["carrier"], result["massive_weights"]
    kind = "images" if lm.inputs == "image" else "sentences"
    tables = [
        facts("The token that carries the largest activation", {
            "inputs": f"{len(inputs)} {kind}", "layer (largest top-1 / median)": c["layer"], "dim": c["dim"],
            "token role": c["role"], "token (first input)": c["token"], "value (mean over inputs)": c["value"],
            "times the layer median": c["ratio"],
            f"massive ({SUN_ET_AL.describe()})": c["massive"],
            "the same token in every input": len(set(c["positions"])) == 1}),
        Table("|activation| per layer", ["layer", "top-1", "median", "top-1 / median", "top dim", "top token"],
              [[r["layer"], r["top-1"], r["median"], r["ratio_top1_median"], r["top_entries"][0]["dim"],
                r["top_entries"][0]["token"]] for r in result["scan"]["layers"]]),
        Table(f"CLS in dim {c['dim']} across the {kind}: bidirectional attention lets every input change it",
              ["layer", "mean", "std", "min", "max", "median |a| of all tokens"],
              [[r["layer"], r["mean"], r["std"], r["min"], r["max"], r["median_abs_all"]]
               for r in result["cls_across_inputs"]]),
        facts("The FFN that writes it (House of Cards, at the carrier token)", {
            "layer l": mw["layer"], "top-k neurons": mw["indices"], "their activations": mw["activations"],
            "same top-k in every input": mw["stable_across_prompts"],
            "super weight": f"W_down[{mw['super_weight']['row']}, {mw['super_weight']['column']}]",
            "super weight value": mw["super_weight"]["value"]}),
    ]
    rows = result["interventions"]["rows"]
    metrics = metric_keys(rows[0])
    tables.append(Table("Interventions at layer l, measured against the original model's outputs",
                        ["variant", "what is changed", *metrics], [[r["variant"], r["description"],
                                                                    *(r[m] for m in metrics)] for r in rows]))
    tables.append(Table("Attention of the other tokens (mean over heads) on the carrier and on CLS",
                        ["layer", "on the carrier", "on CLS", "uniform (1 / tokens)"],
                        [[a["layer"], a["on_carrier"], a["on_cls"], a["uniform"]] for a in result["attention"]]))
    figures = []
    if "norm_maps" in result:
        summary = result["norm_maps"]["summary"]
        tables.insert(0, facts("Patch token norms after the last layer (Darcet et al.'s artifacts are patches far "
                               "above the median)", {
            "grid": f"{result['norm_maps']['grid'][0]} x {result['norm_maps']['grid'][1]}",
            "max / median (mean over images)": summary["max_over_median_mean"],
            "max / median (largest)": summary["max_over_median_max"],
            "share of patches above 2x the median": summary["high_norm_share"]}))
        figures.append(Figure(f"{ctx.prefix}norm_map.png", "Each patch token's norm after the last layer, drawn over "
                                                           "the photograph as the model saw it (resized, cropped)."))
    if "registers" in result:
        r = result["registers"]
        tables.append(Table(f"A test-time register (Jiang et al. 2025): neurons {r['neurons']} of layer {r['layer']} "
                            "moved onto one extra token", ["layer", "", "carrier norm", "median patch norm",
                                                           "patch max / median", "register norm"],
                            [[n["layer"], side, n[side]["carrier_norm"], n[side]["patch_norm_median"],
                              n[side]["patch_max_over_median"], n[side]["register_norm"]]
                             for n in r["norms"] for side in ("without", "with")]))
        tables.append(Table("Output measures without and with the register", ["", *r["measures"]["with"]],
                            [[side, *r["measures"][side].values()] for side in ("without", "with")]))
    figures += [Figure(f"{ctx.prefix}carrier.png", f"Left: dim {c['dim']} at the carrier and at CLS per layer (mean ± "
                                                   "std over the inputs); right: the attention they receive."),
                Figure(f"{ctx.prefix}scan.png", "The three largest and the median |activation| in each layer.")]
    verdict = "massive by Sun et al.'s criterion" if c["massive"] else \
        f"large, but not massive by Sun et al.'s criterion ({SUN_ET_AL.describe()})"
    text = [f"The largest activation relative to its layer's median sits in dim {c['dim']} of the {c['role']} token, "
            f"{c['ratio']:.0f}x the median in layer {c['layer']}: {verdict}."]
    return Section(text=text, tables=tables, figures=figures, data={"encoder": result})
