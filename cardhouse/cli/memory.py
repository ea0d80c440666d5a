"""The memory command: what a model needs, from its config, before anything is loaded."""

from __future__ import annotations

import typer

from .common import app, clear_errors, console


@app.command("memory")
def memory_cmd(model: str = typer.Argument(..., help="a bundled name, a local HF folder, a GGUF file, a config.json "
                                                     "file or a hub id in the local Hugging Face cache"),
               dtype: str = typer.Option("bfloat16", "--dtype",
                                         help="float32, bfloat16 or float16: the dtype to plan for (the other "
                                              "commands load float32 unless given --dtype: plan such a run with "
                                              "--dtype float32)"),
               tokens: int = typer.Option(2048, help="hidden states kept at once (prompts x tokens, or windows x "
                                          "context)")):
    """Memory needed by an ordinary load, --device-map and --stream, and the disk --stream --spill-dir uses,
    computed from the config."""
    from pathlib import Path

    from transformers import AutoConfig

    from ..models.memory import requirements
    from ..models.placement import DTYPES
    from ..models.spec import probe
    from ..validation import check_options

    with clear_errors():
        check_options(None, tokens=tokens)
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
        path = Path(model)
        try:  # the same config every other command reads (probe: bundled names and GGUF headers too)
            config = AutoConfig.from_pretrained(path.parent) if path.name == "config.json" else probe(model).config
        except Exception as e:  # noqa: BLE001  whatever cannot be read is one line naming the model
            raise ValueError(f"cannot read the config of {model!r}: {str(e).splitlines()[0][:200]}") from None
        r = requirements(config, dtype, tokens)
        gib = 2**30
        console.print(f"{model}: {r.parameters:,} parameters in {r.dtype}")
        console.print(f"  ordinary load (one device):        {r.model_bytes / gib:8.2f} GiB")
        console.print(f"  --device-map: spread over devices   {r.model_bytes / gib:8.2f} GiB in all (+ activations)")
        console.print(f"  --stream: one block                 {r.block_bytes / gib:8.2f} GiB")
        console.print(f"            embeddings, head          {r.rest_bytes / gib:8.2f} GiB")
        console.print(f"            hidden states ({tokens} tok) {2 * r.hidden_bytes / gib:8.2f} GiB")
        console.print(f"            total                     {r.stream_bytes / gib:8.2f} GiB")
        console.print(f"  --stream --spill-dir: in memory     {(r.block_bytes + r.rest_bytes) / gib:8.2f} GiB "
                      "(+ one batch)")
        console.print(f"            on disk (hidden states)   {r.spill_bytes / gib:8.2f} GiB")
