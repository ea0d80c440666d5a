"""The report's massive-activation sections: magnitudes per layer (Sun et al. Table 1) and where the
massive ones are (dims, layers, the tokens that carry them)."""

from __future__ import annotations

from ..analysis import scan
from .context import Context
from .html import Figure, Section, Table, facts, layer_ranges
from .plots import plot_top_magnitudes
from .tables import TABLE1_COLUMNS


def scan_step(ctx: Context) -> Section:
    result = scan(ctx.lm, ctx.prompts, criterion=ctx.settings.criterion, progress=False)
    ctx.keep("scan", result)
    columns = ["layer", *TABLE1_COLUMNS, "top-1 / median", "massive dims"]
    rows = [[r["layer"], *(r[c] for c in TABLE1_COLUMNS), r["ratio_top1_median"], r["massive_dims"]]
            for r in result.layers]
    png = plot_top_magnitudes(result, ctx.figure("top_magnitudes"))
    return Section(
        text=[f"Hidden states at {result.point}: the k-th largest |activation| of each prompt, averaged over "
              "the prompts, and the median |activation| of the layer."],
        tables=[Table("|activation| per layer", columns, rows)],
        figures=[Figure(png.name, "The three largest and the median |activation| in each layer, on a log scale; "
                                  "shaded layers hold massive activations.")],
        data={"scan": result.to_dict()})


def activations_step(ctx: Context) -> Section:
    result = ctx.need("scan")
    c = result.criterion
    where = facts("Where they are", {
        "criterion: |a| above": c["min_abs"], "criterion: times the layer median": c["min_ratio"],
        "massive dims": result.dims, "layers": layer_ranges(result.massive_layers),
        "first layer": result.first_layer, "gone from layer": result.vanish_layer})
    dims = Table("Massive dimensions", ["dim", "layers", "number of layers"],
                 [[d["dim"], layer_ranges(d["layers"]), len(d["layers"])] for d in result.massive_dims])
    roles = Table("Which tokens carry them", ["token role", "prompts where it carries one", "prompts with it"],
                  [[role, r["prompts_with_massive"], r["prompts_with_role"]] for role, r in result.roles.items()])
    tables = [where, dims, roles]
    text = []
    if result.found:
        layer = result.massive_layers[len(result.massive_layers) // 2]
        tables.append(Table("Their values across prompts in a middle massive layer (Sun et al. Table 2)",
                            ["layer", "dim", "token role", "count", "mean", "std", "max |a|"],
                            [[v["layer"], v["dim"], v["role"], v["count"], v["mean"], v["std"], v["max_abs"]]
                             for v in result.values_at(layer)]))
        tables.append(Table("Tokens that carry them", ["token", "token id", "occurrences"],
                            [[repr(t["token"]), t["token_id"], t["count"]] for t in result.token_strings]))
    else:
        text.append("No activation meets the criterion in any layer; a relative criterion (--relative) suits "
                    "models whose magnitudes are smaller.")
    of = result.outlier_features
    tables.append(facts("Classic outlier features at the FFN input (Dettmers et al.), for contrast",
                        {"|a| at least": of["threshold"], "share of tokens": of["min_token_share"],
                         "share of layers": of["min_layer_share"], "dims": of["dims"] or "none"}))
    return Section(text=text, tables=tables)

