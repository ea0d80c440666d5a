"""``cardhouse emergence``: train small decoders from scratch, with and without an explicit attention bias."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..validation import validate
from .common import LR_HELP, SEED_HELP, app, batch_size_opt, clear_errors, console, err, out_opt, writable_folder


def _fmt(value: float) -> str:
    return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"


def final_table(results: dict) -> Table:
    """Sun et al. Table 1 style, per layer, one row per variant so that they sit side by side."""
    table = Table(title="final models: |a| in the residual stream per layer, and attention shares")
    for name in ("layer", "variant", "top-1", "top-2", "median", "top-1/median", "top at dim@pos", "attn first",
                 "attn k'"):
        table.add_column(name, justify="left" if name == "variant" else "right")
    for row in results["final"]["layers"]:
        for v in results["final"]["summary"]:
            r = row[v]
            table.add_row(str(row["layer"]), v, _fmt(r["top-1"]), _fmt(r["top-2"]), _fmt(r["median"]),
                          f"{r['ratio']:.1f}x", f"{r['top_dim']}@{r['top_position']}",
                          f"{r['attention_first_token']:.3f}", f"{r['attention_k_bias']:.3f}")
        table.add_section()
    return table


@app.command()
def emergence(config: str = typer.Option("cpu", help="cpu (a few minutes on 2 cores) or gpu (the larger scale)"),
              variants: str = typer.Option("standard,bias", help="comma-separated: standard, bias (learned k', v'), "
                                           "sink (learned k', v' fixed at zero)"),
              steps: Optional[int] = typer.Option(None, help="training steps (default: the config's)"),
              every: Optional[int] = typer.Option(None, help="measure, validate and checkpoint every N steps"),
              n_layer: Optional[int] = typer.Option(None, help="layers"),
              n_head: Optional[int] = typer.Option(None, help="attention heads (must divide --n-embd)"),
              n_embd: Optional[int] = typer.Option(None, help="width"),
              block_size: Optional[int] = typer.Option(None, help="context length in tokens"),
              batch_size: Optional[int] = batch_size_opt(None, "training windows, one optimizer step each"),
              lr: Optional[float] = typer.Option(None, help=LR_HELP),
              warmup: Optional[int] = typer.Option(None, help="warmup steps (then cosine decay)"),
              corpora: Optional[str] = typer.Option(None, help="comma-separated training text: wikipedia, c4, austen, "
                                                    "kjv, wiki-demo, botchan (default: the config's)"),
              seed: Optional[int] = typer.Option(None, help=f"{SEED_HELP} (of the weights and of the batches)"),
              device: Optional[str] = typer.Option(None, help="cpu or cuda (falls back to the CPU without CUDA)"),
              stop_at: Optional[int] = typer.Option(None, help="stop after this step; run again to resume"),
              fresh: bool = typer.Option(False, "--fresh", help="ignore and overwrite existing checkpoints"),
              threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's)"),
              out: Path = out_opt(Path("cardhouse-out/emergence"), "and the checkpoints")):
    """Train a small GPT-2-style decoder from scratch in two variants (standard attention, and an explicit
    attention bias k', v' per head, Sun et al. Sec. 5; optionally a third, a sink slot: k' with v' = 0) and
    follow the massive-activation statistics of the project's scan and the attention on the first token and
    on k' over training.

    An interrupted run resumes from its last checkpoint when the same command is run again.
    """
    import torch

    from ..emergence import config_with, run

    with clear_errors():
        validate(None, folders={"--out": out}, steps=steps, every=every, n_layer=n_layer, n_head=n_head,
                 n_embd=n_embd, block_size=block_size, batch_size=batch_size, lr=lr, warmup=warmup, threads=threads,
                 stop_at=stop_at)
        if threads:
            torch.set_num_threads(threads)
        names = tuple(v.strip() for v in variants.split(",") if v.strip())
        cfg = config_with(config, steps=steps, every=every, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                          block_size=block_size, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed, device=device,
                          corpora=tuple(c.strip() for c in corpora.split(",")) if corpora else None)
        for name in names:
            cfg.model_config(1, name)  # an unknown variant fails before anything is written
        from ..data.corpora import get_corpus

        for name in cfg.corpora:
            get_corpus(name)
        writable_folder(out)
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            err.print(f"[yellow]warning:[/yellow] {cfg.device} requested but CUDA is not available: training on the CPU")
            warnings.filterwarnings("ignore", message=".*CUDA is not available")  # said once, above
        try:
            results = run(cfg, out, variants=names, resume=not fresh, stop_at=stop_at)
        except KeyboardInterrupt:
            err.print(f"[yellow]interrupted:[/yellow] run the same command again to resume from the last "
                      f"checkpoint in {out}")
            raise typer.Exit(130)
        console.print(final_table(results["results"]))
        for v, s in results["results"]["final"]["summary"].items():
            r = results["results"]["runs"][v]
            speed = f"{r['tokens_per_second']:,.0f} tokens/s" if r["tokens_per_second"] else "no step trained"
            console.print(f"{v}: {r['parameters']:,} parameters, step {s['step']} ({r['tokens_seen']:,} tokens), "
                          f"held-out loss {s['val_loss']:.3f} (best {s['best_val_loss']:.3f}), largest |a| "
                          f"{s['max_top1']:.1f} = {s['max_ratio']:.0f}x the median, massive layers "
                          f"{s['massive_layers'] or 'none'}, {speed} on {r['device']}")
        console.print(f"wrote {out / 'emergence.json'}, {', '.join(results['plots'].values())}")
