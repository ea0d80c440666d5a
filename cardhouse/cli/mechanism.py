"""Commands that explain the mechanism: attention (sinks, concentration, value updates), trace, position."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..results import write_result
from ..validation import validate
from .common import (TOP_HELP, BosOpt, KOpt, LayerOpt, MinAbsOpt, MinRatioOpt, ModelOpt, OutOpt, PromptsOpt,
                     RelativeOpt, app, batch_size_opt, clear_errors, console, err, limit_opt, load, load_options,
                     writable_folder)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _notes(notes: list[str]) -> None:
    for note in notes:
        err.print(f"[yellow]note:[/yellow] {note}")


@app.command()
@load_options
def attention(model: str = ModelOpt, prompts: str = PromptsOpt,
              limit: Optional[int] = limit_opt(16),
              map_layer: Optional[int] = typer.Option(None, help="heat-map layer (default: l + 1, the first layer whose "
                                                             "attention reads massive activations)"),
              map_head: Optional[int] = typer.Option(None, help="heat-map head (default: the one most on set C)"),
              prompt_index: int = typer.Option(0, help="heat-map prompt (index into the prompts)"),
              threshold: float = typer.Option(0.3, help="a key is a sink in a head if its mean received attention "
                                                        "exceeds this"),
              attn_implementation: str = typer.Option("eager", help="attention implementation for the analysis "
                                                                    "(must return probabilities: eager)"),
              min_abs: Optional[float] = MinAbsOpt, min_ratio: Optional[float] = MinRatioOpt,
              relative: bool = RelativeOpt,
              batch_size: int = batch_size_opt(8),
              bos: Optional[bool] = BosOpt, out: Path = OutOpt):
    """Attention concentration on the massive tokens, attention sinks per token role, the set-C value updates."""
    from ..analysis import Criterion
    from ..analysis.attention import analyze_attention, default_head
    from ..analysis.attention_map import attention_map
    from ..reports.mechanism_plots import plot_attention, plot_attention_map

    with clear_errors():
        if attn_implementation != "eager":
            raise ValueError(f"--attn-implementation must be 'eager' (the analysis needs the attention "
                             f"probabilities), got {attn_implementation!r}")
        checked = validate(model, prompts=prompts, prompt_limit=limit, folders={"--out": out}, map_layer=map_layer,
                           map_head=map_head, prompt_index=prompt_index, threshold=threshold, min_abs=min_abs,
                           min_ratio=min_ratio, batch_size=batch_size)
        criterion = Criterion.from_options(min_abs, min_ratio, relative)
        texts = checked.prompts
        writable_folder(out)
        lm = load(checked, bos)
        result = analyze_attention(lm, texts, criterion=criterion, threshold=threshold,
                                   implementation=attn_implementation, batch_size=batch_size)
        _notes(result.notes)
        l = result.massive_layer
        if map_layer is None:
            map_layer = min(l + 1, len(lm.blocks) - 1) if l is not None else 0
        if map_head is None:
            map_head = default_head(result, map_layer)
        amap = attention_map(lm, texts[prompt_index], map_layer, map_head, implementation=attn_implementation)
        _notes(amap.notes[len(result.notes):] if amap.notes[:len(result.notes)] == result.notes else amap.notes)

        positions = sorted({p for prompt in result.massive_positions for p in prompt})  # was a list of tuples
        t = Table(title=f"{lm.name}: attention and massive activations (l = {l}, set C: the tokens at position(s) "
                        f"{', '.join(map(str, positions[:5]))}{' ...' if len(positions) > 5 else ''})")
        for c in ("layer", "share on C", "heads: C sink", "heads: delim sink", "cos C part", "cos rest", "C norm share"):
            t.add_column(c, justify="right")
        for r in result.layers:
            u = r["update"]
            t.add_row(str(r["layer"]), _fmt(sum(r["concentration"]) / len(r["concentration"])),
                      _fmt(r["sink_heads"].get("massive")), _fmt(r["sink_heads"].get("first delimiter")),
                      _fmt(u.get("cos_c_all")), _fmt(u.get("cos_rest_all")), _fmt(u.get("norm_share_c")),
                      style="bold" if l is not None and r["layer"] > l else None)
        console.print(t)
        for name, s in result.summary.items():
            console.print(f"layers {name} l: share on C {_fmt(s['concentration'])}, heads with C as sink "
                          f"{_fmt(s['sink_heads']['massive'])}, cos of set-C updates {_fmt(s['cos_c_all'])} "
                          f"(rest {_fmt(s['cos_rest_all'])})")
        plots = {"attention": str(plot_attention(result, out / "attention.png")),
                 "attention_map": str(plot_attention_map(amap, out / "attention_map.png",
                                                         f"{lm.name}: layer {map_layer}, head {map_head}, "
                                                         f"prompt {prompt_index}"))}
        write_result(out / "attention.json", {
            "attention": result.to_dict(),
            "map": {"layer": map_layer, "head": map_head, "prompt_index": prompt_index, "tokens": amap.tokens,
                    "logits": None if amap.logits is None else amap.logits.nan_to_num(float("-inf")).tolist(),
                    "probs": amap.probs.tolist()}},
            model=lm.describe(), settings={"prompts": prompts, "limit": limit, "criterion": criterion.to_dict(),
                                           "threshold": threshold, "attn_implementation": attn_implementation},
            plots=plots)
        console.print(f"wrote {out / 'attention.json'}, {', '.join(plots.values())}")


@app.command()
@load_options
def trace(model: str = ModelOpt, prompts: str = PromptsOpt,
          k: int = KOpt,
          layer: Optional[int] = LayerOpt,
          top: int = typer.Option(3, help=f"{TOP_HELP} (the largest dimensions per state)"),
          n_prompts: int = typer.Option(8, help="prompts used (position 0 is the same in all of them)"),
          min_abs: Optional[float] = MinAbsOpt, min_ratio: Optional[float] = MinRatioOpt, relative: bool = RelativeOpt,
          bos: Optional[bool] = BosOpt, out: Path = OutOpt):
    """The BOS token's states through the layers (House of Cards Fig. 3) and the q/k/v of the massive tokens."""
    from ..analysis import Criterion
    from ..analysis.trace import STATES, UPDATES, trace_bos
    from ..reports.mechanism_plots import plot_trace

    with clear_errors():
        checked = validate(model, prompts=prompts, folders={"--out": out}, k=k, layer=layer, top=top,
                           n_prompts=n_prompts, min_abs=min_abs, min_ratio=min_ratio)
        criterion = Criterion.from_options(min_abs, min_ratio, relative)
        writable_folder(out)
        lm = load(checked, bos)
        result = trace_bos(lm, checked.prompts, k=k, layer=layer, top=top, n_prompts=n_prompts, criterion=criterion)
        _notes(result.notes)
        l = result.layer
        t = Table(title=f"{lm.name}: BOS token, max |x| [top dims] per state (l = {l}, massive dim {result.dim})")
        t.add_column("layer", justify="right")
        labels = [*STATES, *UPDATES]
        for label in labels:
            t.add_column(label, justify="right")
        t.add_column("intermediate top-k")
        for row in result.states[max(0, l - 2):l + 3]:
            inter = next((r for r in result.intermediate if r["layer"] == row["layer"]), None)
            t.add_row(str(row["layer"]), *(f"{row[s]['max_abs']:,.0f} [{row[s]['top_dims'][0]}]" for s in labels),
                      "" if inter is None else " ".join(f"{i}:{v:,.0f}" for i, v in
                                                        zip(inter["indices"][:2], inter["values"][:2])),
                      style="bold" if row["layer"] == l else None)
        console.print(t)
        plot = plot_trace(result, out / "trace.png")
        write_result(out / "trace.json", {"trace": result.to_dict()}, model=lm.describe(),
                     settings={"prompts": prompts, "k": k, "layer": layer, "top": top, "n_prompts": n_prompts,
                               "criterion": criterion.to_dict()},
                     plots={"trace": str(plot)})
        console.print(f"wrote {out / 'trace.json'}, {plot}")


@app.command()
@load_options
def position(model: str = ModelOpt,
             prompt: Optional[str] = typer.Option(None, help="the prompt (default: the first built-in sentence)"),
             out: Path = OutOpt):
    """Put the BOS token at the start, in the middle, at the end, or leave it out: who carries the massive activation?"""
    from ..analysis import load_prompts
    from ..analysis.position import position_study
    from ..reports.mechanism_plots import plot_position

    with clear_errors():
        if prompt is not None and not prompt.strip():
            raise ValueError("--prompt must hold some text, got an empty prompt")
        checked = validate(model, folders={"--out": out})
        writable_folder(out)
        text = prompt if prompt is not None else load_prompts()[0]
        lm = load(checked, None)
        study = position_study(lm, text)
        t = Table(title=f"{lm.name}: largest |h| at layer {study.reference_layer} with BOS placed ({text!r})")
        for c in ("BOS", "carrier", "position", "dim", "value", "BOS h[dim]", "next largest"):
            t.add_column(c, justify="right")
        for placement, s in study.summary.items():
            bos_value = s["at_dim"]["bos"]
            t.add_row(placement, f"{s['role']} {s['token']!r}", str(s["position"]), str(s["dim"]), f"{s['value']:,.0f}",
                      "-" if bos_value is None else f"{bos_value:,.1f}", f"{s['second_largest']:,.1f}")
        console.print(t)
        plot = plot_position(study, out / "position.png")
        write_result(out / "position.json", {"position": study.to_dict()}, model=lm.describe(),
                     settings={"prompt": text}, plots={"position": str(plot)})
        console.print(f"wrote {out / 'position.json'}, {plot}")
