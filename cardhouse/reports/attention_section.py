"""The report's optional attention section (``--with attention``): Sun et al. Sec. 4."""

from __future__ import annotations

from ..analysis.attention import MASSIVE, analyze_attention
from .context import Context
from .html import Figure, Section, Table, layer_ranges
from .mechanism_plots import plot_attention


def attention_step(ctx: Context) -> Section:
    """Sun et al. Sec. 4: the tokens that carry massive activations (set C) as attention sinks, and the
    set-C part of each attention output as an implicit bias (``analysis.attention``)."""
    result = analyze_attention(ctx.lm, ctx.prompts, criterion=ctx.settings.criterion, progress=False)
    mean = lambda values: sum(values) / len(values)  # noqa: E731  over heads
    first = result.massive_layer  # where set C first appears: not the massive-weight layer of the weights section
    summary = Table(f"Layers up to {first if first is not None else 'the last'} (the first whose output carries a "
                    "massive activation) against the layers after it (means over layers)",
                    ["layers", "which", "attention share on set C", "sink heads: set C", "sink heads: BOS",
                     "sink heads: first delimiter", "cos of set-C parts", "cos of the rest", "norm share of set C"],
                    [[layer_ranges(part["layers"]), name, part["concentration"], part["sink_heads"][MASSIVE],
                      part["sink_heads"]["bos"], part["sink_heads"]["first delimiter"], part["cos_c_all"],
                      part["cos_rest_all"], part["norm_share_c"]]
                     for name, part in result.summary.items() if part["layers"]])
    layers = Table("Per layer (attention share and sink heads averaged over heads)",
                   ["layer", "attention share on set C", "sink heads: set C", "cos of set-C parts", "cos of the rest",
                    "norm share of set C"],
                   [[r["layer"], mean(r["concentration"]), r["sink_heads"].get(MASSIVE), r["update"].get("cos_c_all"),
                     r["update"].get("cos_rest_all"), r["update"].get("norm_share_c")] for r in result.layers])
    png = plot_attention(result, ctx.figure("attention"))
    return Section(
        text=[f"Set C holds the tokens that carry massive activations; a head treats a token group as a sink when "
              f"the mean attention it receives exceeds {result.threshold}. Each attention output splits exactly "
              "into the part read from set C's values and the rest; cosines compare those parts across queries.",
              *result.notes],
        tables=[summary, layers],
        figures=[Figure(png.name, "Left: the attention share of ordinary tokens on set C per head and layer; middle: "
                                  "the fraction of heads in which each token group is a sink; right: how alike the "
                                  "set-C parts of the attention outputs are across queries.")],
        data={"attention": result.to_dict()})

