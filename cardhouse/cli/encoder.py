"""``cardhouse encoder``: massive activations in vision transformers and sentence encoders."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..models.loading import BUNDLED
from .common import (ATTACK_K_HELP, IMAGES_HELP, K_MEANING, MODEL_HELP, SENTENCES_HELP, MinAbsOpt, MinRatioOpt, OutOpt,
                     RelativeOpt, SeedOpt, app, batch_size_opt, clear_errors, console, err, json_opt, limit_opt, load,
                     load_options, writable_folder)

ENCODERS = [name for name, b in BUNDLED.items() if b.inputs != "causal"]


def _check_kind(model: str, images: str | None, sentences: str | None, spec=None) -> None:
    """Before any weights load: one kind of input, the kind the model reads (bundled: known by name;
    else from its config, ``spec``)."""
    if (images is None) == (sentences is None):
        raise ValueError("give --images (image models) or --sentences (text encoders)")
    reads = BUNDLED[model].inputs if model in BUNDLED else None
    if reads is None and spec is not None:
        from types import SimpleNamespace

        from ..models.adapters import adapter_for

        reads = adapter_for(SimpleNamespace(config=spec.config)).inputs
    if reads is not None:
        given = "image" if images is not None else "text"
        if reads == "causal":
            raise ValueError(f"{model} is a decoder LM: use `cardhouse scan` (encoders: {', '.join(ENCODERS)})")
        if reads != given:
            raise ValueError(f"{model} reads {'images' if reads == 'image' else 'sentences'}, not "
                             f"{'images' if given == 'image' else 'sentences'}")


@app.command()
@load_options
def encoder(model: str = typer.Option("dinov2-s", "--model", "-m", help=MODEL_HELP),
            images: Optional[str] = typer.Option(None, "--images", "-i", help=IMAGES_HELP),
            sentences: Optional[str] = typer.Option(None, "--sentences", "-s", help=SENTENCES_HELP),
            limit: Optional[int] = limit_opt(None, " (images or sentences)"),
            k: int = typer.Option(5, "--k", help=f"{K_MEANING} (the carrier token's largest FFN neurons)"),
            attack_k: int = typer.Option(2, help=f"{ATTACK_K_HELP} (zeroed, beside as many random rows)"),
            min_abs: Optional[float] = MinAbsOpt, min_ratio: Optional[float] = MinRatioOpt,
            relative: bool = RelativeOpt,
            pairs: int = typer.Option(200, "--mrpc-pairs", help="MRPC sentence pairs of the text encoders' measure"),
            copies: int = typer.Option(4, help="augmented copies per photograph for the retrieval measure"),
            registers: bool = typer.Option(True, help="also add a test-time register (image models)"),
            seed: int = SeedOpt,
            batch_size: int = batch_size_opt(8, "images or sentences"),
            out: Path = OutOpt,
            json_path: Optional[Path] = json_opt("OUT/encoder.json")):
    """Massive activations in an encoder (image models: --images; sentence encoders: --sentences; bundled:
    dinov2-s, minilm-l6): scan, carrier token, massive weights, interventions, attention, the per-patch
    norm map and test-time registers."""
    from ..analysis import Criterion
    from ..encoders.inputs import ImageInputs, SentenceInputs
    from ..encoders.images import load_images
    from ..analysis.prompts import load_prompts
    from ..results import write_result
    from ..validation import validate
    from ..reports.encoder_plots import plot_encoder
    from .encoder_output import print_encoder

    with clear_errors():
        _check_kind(model, images, sentences)
        if attack_k > k:
            raise ValueError(f"--attack-k ({attack_k}) must be <= --k ({k}): the attack zeroes the top rows found")
        json_path = json_path or out / "encoder.json"
        checked = validate(model, prompt_limit=limit, files={"--json": json_path}, folders={"--out": out}, k=k,
                           attack_k=attack_k, min_abs=min_abs, min_ratio=min_ratio, batch_size=batch_size,
                           copies=copies, mrpc_pairs=pairs)
        _check_kind(model, images, sentences, checked.spec)
        photos = load_images(images, limit=limit) if images is not None else None
        texts = load_prompts(sentences, limit=limit) if sentences is not None else None
        criterion = Criterion.from_options(min_abs, min_ratio, relative)
        writable_folder(out)
        lm = load(checked, None)
        inputs = ImageInputs(lm, photos) if photos is not None else SentenceInputs(lm, texts)
        from ..encoders.analysis import analyze_encoder

        with err.status("analysing") as status:
            result = analyze_encoder(lm, inputs, criterion=criterion, k=k, attack_k=attack_k, seed=seed,
                                     batch_size=batch_size, pairs=pairs, copies=copies, registers=registers,
                                     tick=lambda step: status.update(f"analysing: {step}"))
        print_encoder(result, console)
        plots = plot_encoder(result, inputs, out)
        settings = {"images": images, "sentences": sentences, "limit": limit, "k": k, "attack_k": attack_k,
                    "criterion": criterion.to_dict(),
                    "pairs": pairs, "copies": copies, "registers": registers, "seed": seed}
        write_result(json_path, result, model=result["model"], settings=settings, plots=plots)
        console.print(f"wrote {json_path}, {', '.join(plots.values())}")
