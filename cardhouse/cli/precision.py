"""Commands for deployment precision: precision (headroom, float16 run, rescale), quantize, export."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (ADAPTER_HELP, K_HELP, PROTECT_HELP, RESCALE_HELP, BackendOpt, BosOpt, CorpusOpt, ForceOpt,
                     IndicesOpt, LayerOpt, MarginOpt, MinAbsOpt, MinRatioOpt, ModelOpt, OutOpt, PowerOpt, PromptsOpt,
                     RelativeOpt, SeedOpt, TaskLimitOpt, TasksOpt, app, batch_size_opt, budget_from, clear_errors,
                     console, context_opt, err, limit_opt, load, max_tokens_opt, parse_int_list)

LimitOpt = limit_opt(16)


def _headroom_table(title: str, room: dict, run: dict) -> None:
    from rich.table import Table

    t = Table(title=title)
    for col in ("layer", "worst point", "max |a|", "float16 margin", "fp8 e4m3 margin", "token"):
        t.add_column(col, justify="right" if col != "worst point" else "left")
    by_layer: dict[int, dict] = {}
    for p in room["points"]:
        if p["max_abs"] > by_layer.get(p["layer"], {"max_abs": -1})["max_abs"]:
            by_layer[p["layer"]] = p
    for layer, p in sorted(by_layer.items()):
        m16 = p["margins"]["float16"]
        style = "bold red" if m16 < 0 else ""
        t.add_row(str(layer), p["point"], f"{p['max_abs']:,.1f}", f"[{style}]{m16:+.2f}[/{style}]" if style else f"{m16:+.2f}",
                  f"{p['margins']['fp8_e4m3']:+.2f}", f"pos {p['position']}")
    console.print(t)
    if run["unsupported"]:
        console.print(f"[yellow]{run['dtype']} run impossible here:[/yellow] {run['unsupported']}")
    elif run["finite"]:
        console.print(f"{run['dtype']} run: no inf/NaN in any module")
    else:
        console.print(f"[bold red]{run['dtype']} run: first {run['first_kind']} in {run['first_module']}[/bold red] "
                      f"({run['first_module_type']}, layer {run['first_layer']}; largest finite input "
                      f"{run['input_max_abs'] or 0:,.0f}); {run['modules_nonfinite']} module outputs non-finite")


@app.command("precision")
def precision_cmd(model: str = ModelOpt, prompts: str = PromptsOpt,
                  limit: Optional[int] = LimitOpt,
                  run_dtype: str = typer.Option("float16", "--run-dtype", help="the format to really run the model in "
                                                "(float16, bfloat16); the model loads in float32"),
                  rescale: bool = typer.Option(False, "--rescale", help=f"{RESCALE_HELP} (--run-dtype; verified: "
                                               "the float32 logits, the headroom and the run again)"),
                  power: Optional[int] = PowerOpt, margin: float = MarginOpt,
                  corpus: list[str] = CorpusOpt,
                  max_tokens: int = max_tokens_opt(0, " (0: no perplexity; in DTYPE against float32, slow on a CPU)"),
                  context: int = context_opt(256),
                  export: Optional[Path] = typer.Option(None, "--export", help="with --rescale: write the rescaled "
                                                        "model here as a Hugging Face folder"),
                  force: bool = ForceOpt, batch_size: int = batch_size_opt(8), bos: Optional[bool] = BosOpt,
                  out: Path = OutOpt):
    """Headroom of every activation against float16 / bfloat16 / FP8, the first module that overflows when the
    model really runs in float16, and (--rescale) a function-preserving fix."""
    from ..capture import tokenize_prompts
    from ..export import check_export_folder, export_model
    from ..validation import validate
    from ..precision.check import PrecisionSettings, check_precision
    from ..precision.rescale import check_rescalable, plan_rescale, rescaled
    from ..reports.precision_plots import plot_headroom
    from ..results import write_result

    with clear_errors():
        dtype = run_dtype
        if export is not None and not rescale:
            raise ValueError("--export writes the rescaled model: give --rescale too (or use `cardhouse export`)")
        if power is not None and not rescale:
            raise ValueError("--power belongs to --rescale")
        if export is not None:
            check_export_folder(export, force)
        folder = out
        checked = validate(model, prompts=prompts, prompt_limit=limit, files={"--out": folder / "precision.json"},
                           batch_size=batch_size, power=power, margin=margin,
                           **({"context": context, "max_tokens": max_tokens} if max_tokens else {}))
        settings = PrecisionSettings(dtype=dtype, rescale=rescale, power=power, margin=margin, batch_size=batch_size,
                                     corpora=tuple(corpus), max_tokens=max_tokens, context=context)
        if rescale:  # a family where dividing the stream would change the function: from the config alone
            check_rescalable(checked.spec.blocks.adapter)
        texts = checked.prompts
        lm = load(checked, bos)
        if rescale:  # and each norm really ignores its input's scale: before anything is written
            plan_rescale(lm, power if power is not None else 1)
        folder.mkdir(parents=True, exist_ok=True)  # checked writable above
        token_lists = tokenize_prompts(lm, texts)
        with err.status(f"headroom and a real {dtype} run of {lm.name}"):
            result = check_precision(lm, token_lists, settings, progress=False)
        _headroom_table(f"{lm.name}: largest |activation| per layer ({result['headroom']['tokens']} tokens)",
                        result["headroom"], result["run"])
        rs = result.get("rescale")
        if rs:
            change = rs["logits_change_float32"]
            console.print(f"rescale: residual stream / 2^{rs['plan']['power']} (margin {margin:g} doublings); "
                          f"float32 logits change at most {change['max_abs_logit_diff']:.3g} "
                          f"({change['relative']:.2e} of the largest), same top-1 on {change['same_top1']:.1%} of tokens")
            if rs["unfixed"]:
                err.print(f"[yellow]warning:[/yellow] points the rescale does not scale still exceed the margin: "
                          f"{', '.join(rs['unfixed'][:5])}")
            _headroom_table(f"{lm.name} after / 2^{rs['plan']['power']}", rs["after"]["headroom"], rs["after"]["run"])
        for key, part in (("before", result), ("after", (rs or {}).get("after", {}))):
            for p in part.get("perplexity", []):
                console.print(f"perplexity {key}: float32 {p['float32']:.3f}, {dtype} {p[dtype]:.3f} "
                              f"(x{p['ratio']:.4f}, {p['tokens']} tokens of {p['corpus']})")
        png = plot_headroom(result["headroom"], folder / "precision.png", f"{lm.name}: headroom per layer",
                            after=rs["after"]["headroom"] if rs else None, power=rs["plan"]["power"] if rs else None)
        write_result(folder / "precision.json", result, model=lm.describe(), settings=settings.to_dict(),
                     plots={"headroom": str(png)})
        console.print(f"wrote {folder / 'precision.json'}, {png}")
        if export is not None:
            p = rs["plan"]["power"]
            with rescaled(lm, p) as plan:
                export_model(lm, export, edit={"kind": "rescale", "power": p, "plan": plan.to_dict(),
                                               "logits_change_float32": rs["logits_change_float32"]}, force=force)
            console.print(f"wrote the rescaled model to {export}")


# edits that act on activations at run time: no exact form as weights, so an export refuses them (with why)
FOLD_REFUSED = {"set-zero": "sets the massive activations to zero on the carrier tokens only",
                "set-mean": "sets the massive activations to their mean on the carrier tokens only",
                "expert-ablate": "reroutes the router's output around the carrier's expert at run time",
                "random-expert-ablate": "reroutes the router's output around another expert at run time"}


@app.command("export")
def export_cmd(folder: Path = typer.Argument(..., help="output folder (Hugging Face format)"), model: str = ModelOpt,
               attack_kind: Optional[str] = typer.Option(None, "--attack", help="a weight attack to fold in: "
                                                         "topk-zero, topk-retain, super-weight, largest-down-entry, "
                                                         "their controls random-zero, random-retain, random-weight; "
                                                         "MoE: expert-topk-zero, expert-topk-retain, super-experts, "
                                                         "their controls expert-random-zero, expert-other-zero, "
                                                         "expert-random-retain, expert-other-retain, random-experts "
                                                         "(expert-ablate and random-expert-ablate reroute at run "
                                                         "time: refused)"),
               k: int = typer.Option(5, "--k", help=K_HELP),
               layer: Optional[int] = LayerOpt,
               indices: Optional[str] = IndicesOpt,
               seed: int = SeedOpt,
               rescale: bool = typer.Option(False, "--rescale", help=f"{RESCALE_HELP} (float16)"),
               power: Optional[int] = PowerOpt, margin: float = MarginOpt,
               quantize: Optional[str] = typer.Option(None, "--quantize", help="fake-quantize the block weights "
                                                      "(round-to-nearest, as `cardhouse quantize --weights`): BITS per "
                                                      "channel or BITSgGROUP, e.g. 8, 4, 4g64; applied after the "
                                                      "other edits"),
               protect: str = typer.Option("none", "--protect", help=f"{PROTECT_HELP} (with --quantize: massive-rows, "
                                           "the top --k rows; super-weight; or their random controls random-rows, "
                                           "random-weight)"),
               prompts: str = PromptsOpt, limit: Optional[int] = LimitOpt,
               adapter: Optional[Path] = typer.Option(None, "--adapter", help=f"{ADAPTER_HELP} (merged into the "
                                                      "weights first, MacDrop or not)"),
               intervention: Optional[str] = typer.Option(None, "--intervention", help="set-zero or set-mean: refused "
                                                          "(they act on activations of single tokens)"),
               gguf: bool = typer.Option(False, "--gguf", help="also write the tensors as model.gguf"),
               force: bool = ForceOpt, min_abs: Optional[float] = MinAbsOpt,
               min_ratio: Optional[float] = MinRatioOpt, relative: bool = RelativeOpt, bos: Optional[bool] = BosOpt):
    """Write a model with its edits folded into the weights as a standard Hugging Face folder (safetensors, config,
    tokenizer) plus cardhouse-edit.json; `transformers` loads it without cardhouse. Order: the adapter merge, the
    attack, the rescale, the quantization."""
    from ..analysis import Criterion, find_massive_weights
    from ..export import check_export_folder, export_variants
    from ..interventions import attack
    from ..interventions.experts import EXPERT_ATTACKS
    from ..interventions.variants import ATTACKS
    from ..models.routing import routing_of
    from ..precision.quantize import check_scheme
    from ..precision.rescale import check_rescalable
    from ..precision.study import foldable_scheme
    from ..validation import validate

    with clear_errors():
        for name, what in ((intervention, "--intervention"), (attack_kind, "--attack")):
            if name in FOLD_REFUSED:
                raise ValueError(f"{what} {name} {FOLD_REFUSED[name]}: an edit of activations has no exact form as "
                                 "weights, so it cannot be exported (nothing was written)")
        if intervention is not None:
            raise ValueError(f"unknown intervention {intervention!r}; known: set-zero, set-mean")
        if attack_kind is not None and attack_kind not in ATTACKS and attack_kind not in EXPERT_ATTACKS:
            raise ValueError(f"unknown attack {attack_kind!r}; known: {', '.join(ATTACKS)}; Mixture of Experts: "
                             f"{', '.join(EXPERT_ATTACKS)}")
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
        if power is not None and not rescale:
            raise ValueError("--power belongs to --rescale")
        if protect != "none" and quantize is None:
            raise ValueError("--protect belongs to --quantize")
        scheme = foldable_scheme(quantize, protect) if quantize is not None else None
        chosen = parse_int_list(indices, "--indices")
        criterion = Criterion.from_options(min_abs, min_ratio, relative)  # the attack's and the protection's rows
        check_export_folder(folder, force)
        checked = validate(model, prompts=prompts if rescale else None, prompt_limit=limit if rescale else None,
                           power=power, margin=margin, min_abs=min_abs, min_ratio=min_ratio,
                           **({"k": k, "layer": layer, "indices": chosen} if attack_kind else
                              {"k": k} if scheme is not None and "rows" in scheme.protect else {}))
        if rescale:
            check_rescalable(checked.spec.blocks.adapter)  # a family where it would change the function
        if scheme is not None:
            check_scheme(checked.spec, scheme)  # the group size against every quantized weight's input width
        if attack_kind in EXPERT_ATTACKS:
            routing_of(checked.spec.blocks.adapter)  # a dense model is refused from its config
        texts = checked.prompts
        lm = load(checked, bos)
        extra, records = [], {}
        if adapter is not None:
            lm = _merge_adapter(lm, adapter)
            extra.append({"kind": "adapter", "path": str(adapter), "merged": True})
        variants = []
        if attack_kind in EXPERT_ATTACKS:
            variants.append(_expert_variant(lm, attack_kind, k=k, layer=layer, indices=chosen, seed=seed,
                                            criterion=criterion))
        elif attack_kind is not None:
            mw = find_massive_weights(lm, k=max(k, len(chosen or [])), layer=layer, criterion=criterion)
            variants.append(attack(lm, mw, attack_kind, k=k, indices=chosen, seed=seed))
        if attack_kind is not None:
            records[variants[-1].name] = {"criterion": criterion.to_dict()}
        if rescale:
            variants.append(_rescale_variant(lm, texts, power, margin))
        if scheme is not None:
            variants.append(_quantize_variant(lm, scheme, k, seed, records, criterion))
        record = export_variants(lm, variants, folder, force=force, gguf=gguf, extra=extra, records=records)
        done = ", ".join(e.get("name", e["kind"]) for e in record["edit"]) or "no edit"
        console.print(f"wrote {folder} ({done}): {', '.join(record['files'])}")


def _expert_variant(lm, kind, **options):  # options: moe_variants's (k, layer, indices, seed, criterion)
    from ..interventions.experts import MOE_ATTACKS, moe_variants

    family = kind if kind in MOE_ATTACKS else next(a for a, controls in MOE_ATTACKS.items() if kind in controls)
    variants, _, _ = moe_variants(lm, family, **options)
    return next(v for v in variants if v.kind == kind)


def _quantize_variant(lm, scheme, k, seed, records, criterion):
    from ..precision.quantize import find_targets
    from ..precision.study import quantize_variant

    targets = None
    if scheme.protect != "none":
        with err.status("finding the massive weights and the super weight"):
            targets = find_targets(lm, k=k, seed=seed, criterion=criterion)
    variant = quantize_variant(lm, scheme, targets)
    records[variant.name] = {"quantization": {"scheme": scheme.to_dict(), "method": "symmetric round-to-nearest, "
                                              "absmax scale per output channel or group; weights stored dequantized",
                                              "targets": targets.to_dict() if targets is not None else None},
                             **({"criterion": criterion.to_dict()} if targets is not None else {})}
    return variant


def _merge_adapter(lm, adapter: Path):
    from peft import PeftModel

    from ..models.loading import from_pretrained_objects

    with err.status(f"merging the adapter {adapter}"):
        merged = PeftModel.from_pretrained(lm.model, str(adapter)).merge_and_unload()
    return from_pretrained_objects(merged, lm.tokenizer, name=f"{lm.name}+{adapter.name}", source=lm.source, bos=lm.bos)


def _rescale_variant(lm, texts, power, margin):
    from ..capture import tokenize_prompts
    from ..interventions.variants import Variant
    from ..precision import choose_power, headroom, rescaled
    from ..precision.rescale import scaled_points

    if power is None:
        room = headroom(lm, tokenize_prompts(lm, texts), progress=False)
        power, unfixed = choose_power(room, scaled_points(lm), margin=margin)
        if unfixed:
            err.print(f"[yellow]warning:[/yellow] not scaled by the rescale and above the margin: {', '.join(unfixed[:5])}")
    return Variant(f"rescale 2^-{power}", f"residual stream divided by 2^{power} (function-preserving; float16 "
                   f"margin {margin:g} doublings)", lambda: rescaled(lm, power))


@app.command("quantize")
def quantize_cmd(model: str = ModelOpt,
                 weights: str = typer.Option("8,4,4g64", help="weight schemes: BITS (per channel) or BITSgGROUP, "
                                             "comma-separated; '' for none"),
                 acts: str = typer.Option("8:tensor,8:token", help="activation schemes BITS:tensor or BITS:token; "
                                          "'' for none"),
                 protect: bool = typer.Option(True, "--protect/--no-protect", help=f"{PROTECT_HELP} (each scheme with "
                                              "every protection and its random control; --no-protect: none)"),
                 k: int = typer.Option(2, "--k", help=K_HELP),
                 seed: int = SeedOpt,
                 prompts: str = PromptsOpt, limit: Optional[int] = LimitOpt,
                 corpus: list[str] = CorpusOpt,
                 max_tokens: int = max_tokens_opt(1022),
                 context: int = context_opt(512),
                 task: list[str] = TasksOpt, task_limit: Optional[int] = TaskLimitOpt, backend: str = BackendOpt,
                 min_abs: Optional[float] = MinAbsOpt, min_ratio: Optional[float] = MinRatioOpt,
                 relative: bool = RelativeOpt, bos: Optional[bool] = BosOpt, out: Path = OutOpt):
    """Simulated round-to-nearest quantization (weights int8/int4 per channel or group, activations and keys/values
    int8 per tensor or token) by perplexity (and, with --task, zero-shot accuracy), with and without protecting the
    massive weights, the super weight, the BOS token's keys/values and the massive activation channels, each against
    a random protection of equal size."""
    from ..analysis import Criterion
    from ..capture import tokenize_prompts
    from ..evaluation.metrics import ACC_MEAN, PPL
    from ..precision.quantize import check_scheme, find_targets
    from ..precision.study import check_budget, quantization_study, study_schemes
    from ..validation import validate
    from ..reports.precision_plots import plot_quantization
    from ..results import write_result

    with clear_errors():
        specs_w = [s for s in weights.split(",") if s.strip()]
        specs_a = [s for s in acts.split(",") if s.strip()]
        schemes = study_schemes(specs_w, specs_a, protect=protect)
        if not schemes:
            raise ValueError("no scheme: give --weights and/or --acts")
        folder = out
        checked = validate(model, prompts=prompts, prompt_limit=limit, files={"--out": folder / "quantize.json"},
                           k=k, context=context, max_tokens=max_tokens, task_limit=task_limit, min_abs=min_abs,
                           min_ratio=min_ratio)
        criterion = Criterion.from_options(min_abs, min_ratio, relative)
        for scheme in schemes:  # the group sizes against every linear map's input width, before any weights load
            check_scheme(checked.spec, scheme)
        budget = budget_from(corpus, max_tokens, context, task, task_limit, backend=backend)
        check_budget(schemes, budget)
        corpus = budget.corpora[0]  # the table and the plot (every corpus is in the JSON)
        texts = checked.prompts
        lm = load(checked, bos)
        folder.mkdir(parents=True, exist_ok=True)  # checked writable above
        with err.status("finding the massive weights, the super weight and the massive channels"):
            targets = find_targets(lm, tokenize_prompts(lm, texts), k=k, seed=seed, criterion=criterion)
        settings = {"weights": specs_w, "acts": specs_a, "protect": protect, "k": k, "seed": seed,
                    "criterion": criterion.to_dict(), "budget": budget.to_dict()}
        done: list[dict] = []

        def save(complete: bool):
            write_result(folder / "quantize.json", {"targets": targets.to_dict(), "rows": done}, model=lm.describe(),
                         settings=settings, complete=complete)

        result = quantization_study(lm, schemes, budget, targets, on_result=lambda row: (done.append(row), save(False)),
                                    progress=True)
        save(True)
        pngs = []
        shown = [(PPL.key(corpus), "quantize.png", f"{result.rows[0][f'tokens_{corpus}']} tokens of {corpus}")]
        if task:  # the mean accuracy too (each task's is in the JSON)
            shown.append((ACC_MEAN.key(), "quantize_tasks.png", f"{', '.join(task)}, {task_limit or 'all'} examples each"))
        for key, name, what in shown:
            base = result.rows[0][key]
            table = result.table(key)
            _quant_table(lm.name, table, base, key, what)
            pngs.append(plot_quantization(table, base, folder / name, f"{lm.name}: RTN fake quantization, {what}",
                                          key=key))
        console.print(f"wrote {folder / 'quantize.json'}, {', '.join(map(str, pngs))}")


def _quant_table(name: str, table: dict, base: float, key: str, what: str) -> None:
    from rich.table import Table

    from ..evaluation.metrics import metric_of

    spec = metric_of(key)
    protections = list(dict.fromkeys(p for row in table.values() for p in row))
    t = Table(title=f"{name}: {spec.title}, {what} (float32 {spec.format(base)})")
    t.add_column("scheme")
    for p in protections:
        t.add_column(p, justify="right")
    for scheme, row in table.items():
        t.add_row(scheme, *(spec.format(row[p]) if p in row else "" for p in protections))
    console.print(t)
