"""Terminal tables (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..analysis.massive_activations import ScanResult
from ..analysis.massive_weights import MassiveWeights

TABLE1_COLUMNS = ("top-1", "top-2", "top-3", "top-10", "top 1%", "median")  # the full set is in the JSON


def _num(x: float) -> str:
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3g}"


def scan_tables(scan: ScanResult, console: Console) -> None:
    t = Table(title=f"{scan.model['name']}: |activation| per layer at {scan.point} "
                    f"({scan.prompts} prompts, {scan.tokens} tokens)")
    t.add_column("layer", justify="right")
    for c in TABLE1_COLUMNS:
        t.add_column(c, justify="right")
    t.add_column("massive dims")
    for row in scan.layers:
        style = "bold red" if row["massive_dims"] else None
        t.add_row(str(row["layer"]), *(_num(row[c]) for c in TABLE1_COLUMNS),
                  ",".join(map(str, row["massive_dims"])), style=style)
    console.print(t)
    if not scan.found:
        c = scan.criterion
        console.print(f"[yellow]No massive activations by the criterion |a| > {c['min_abs']} and > "
                      f"{c['min_ratio']}x the layer median; try a relative criterion (--relative).[/yellow]")
        return
    console.print(f"Massive activations: dims {scan.dims}, first in layer {scan.first_layer}, "
                  f"gone from layer {scan.vanish_layer if scan.vanish_layer is not None else '(never)'}.")
    roles = Table(title="Which tokens carry them (prompts where the token has one / prompts that have it)")
    roles.add_column("token role")
    roles.add_column("prompts", justify="right")
    for role, r in scan.roles.items():
        roles.add_row(role, f"{r['prompts_with_massive']}/{r['prompts_with_role']}")
    console.print(roles)
    layer = scan.massive_layers[len(scan.massive_layers) // 2]
    values = Table(title=f"Their values across prompts at layer {layer} (Sun et al. Table 2)")
    for c in ("dim", "token role", "count", "mean", "std", "max |a|"):
        values.add_column(c, justify="right")
    for v in scan.values_at(layer):
        values.add_row(str(v["dim"]), v["role"], str(v["count"]), _num(v["mean"]), _num(v["std"]), _num(v["max_abs"]))
    console.print(values)
    of = scan.outlier_features
    console.print(f"Classic outlier features (|a| >= {of['threshold']} on >= {of['min_token_share']:.0%} of tokens "
                  f"in >= {of['min_layer_share']:.0%} of layers, at the FFN input): dims {of['dims'] or 'none'}")


def weights_table(mw: MassiveWeights, console: Console) -> None:
    on_bos = set(mw.carrier.get("roles") or {"bos": 1}) == {"bos"}  # the same token at position 0 in every prompt
    t = Table(title=f"Massive weights: layer {mw.layer} FFN -> dim {mw.dim}"
                    + (f" (expert {mw.expert})" if mw.expert is not None else "")
                    + f", top-{mw.k} {'BOS' if on_bos else 'carrier-token'} intermediate indices of "
                      f"{mw.intermediate_size}")
    keys = [k for k in mw.rows[0] if k.endswith("_norm")] if mw.rows else []
    t.add_column("index", justify="right")
    t.add_column("activation", justify="right")
    for k in keys:
        t.add_column(k.replace("_norm", " |row|").replace("W_down_column |row|", "W_down |col|"), justify="right")
    t.add_column(f"W_down[{mw.dim}, i]", justify="right")
    for row, act in zip(mw.rows, mw.activations):
        t.add_row(str(row["index"]), _num(act), *(_num(row[k]) for k in keys), f"{row['down_at_dim']:.3f}")
    console.print(t)
    sw, big = mw.super_weight, mw.largest_down_entry
    console.print(f"Super weight (Yu et al.: the down projection's output spike x input spike on the first token): "
                  f"W_down[{sw['row']}, {sw['column']}] = {sw['value']:.4f} in layer {sw['layer']}; the largest "
                  f"entry of W_down[{big['row']}, top-k]: W_down[{big['row']}, {big['column']}] = {big['value']:.4f}. "
                  f"Top-{mw.k} indices the same in every prompt: {mw.stable_across_prompts}"
                  # by construction only where BOS carries it (--no-bos: each prompt's own first word)
                  + (" (position 0 sees only itself under causal attention, so this holds by construction)."
                     if on_bos else "."))
    for note in mw.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
