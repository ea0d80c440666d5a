"""Terminal tables and figures of ``cardhouse encoder`` (shared with the report)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _num(x) -> str:
    return "–" if x is None else (f"{x:,.1f}" if abs(x) >= 10 else f"{x:.4g}")


def print_encoder(result: dict, console: Console) -> None:
    from ..encoders.analysis import SUN_ET_AL
    from ..encoders.measures import metric_keys  # the module registers the encoder metrics

    c = result["carrier"]
    t = Table(title=f"{result['model']['name']}: |activation| per layer ({result['inputs']['count']} "
                    f"{'images' if result['inputs']['kind'] == 'image' else 'sentences'})")
    for col in ("layer", "top-1", "median", "top-1 / median", "top dim", "top token"):
        t.add_column(col, justify="right")
    for row in result["scan"]["layers"]:
        top = row["top_entries"][0]
        t.add_row(str(row["layer"]), _num(row["top-1"]), _num(row["median"]), _num(row["ratio_top1_median"]),
                  str(top["dim"]), top["token"], style="bold" if row["layer"] == c["layer"] else None)
    console.print(t)
    verdict = f"massive by Sun et al.'s criterion ({SUN_ET_AL.describe()})" if c["massive"] else \
        f"large but NOT massive by Sun et al.'s criterion ({SUN_ET_AL.describe()})"
    console.print(f"Carrier: dim {c['dim']} on the {c['role']} token ({c['token']!r}), layer {c['layer']}: "
                  f"{_num(c['value'])} = {_num(c['ratio'])}x the median; {verdict}.")
    mw = result["massive_weights"]
    console.print(f"Its FFN: layer {mw['layer']}, top-{mw['k']} neurons {mw['indices']} "
                  f"(same in every input: {mw['stable_across_prompts']}).")
    rows = result["interventions"]["rows"]
    t = Table(title="Interventions at layer l (measured against the original outputs)")
    metrics = metric_keys(rows[0])
    for col in ("variant", *metrics):
        t.add_column(col, justify="right")
    for row in rows:
        t.add_row(row["variant"], *(_num(row[m]) for m in metrics))
    console.print(t)
    if "registers" in result:
        r = result["registers"]
        last = r["norms"][-1]
        console.print(f"Test-time register (neurons {r['neurons']} of layer {r['layer']} moved onto an extra token): "
                      f"carrier norm {_num(last['without']['carrier_norm'])} -> {_num(last['with']['carrier_norm'])}, "
                      f"patch max/median {_num(last['without']['patch_max_over_median'])} -> "
                      f"{_num(last['with']['patch_max_over_median'])} (layer {last['layer']}); output cosine "
                      f"{_num(r['measures']['with']['cos_mean'])}.")
