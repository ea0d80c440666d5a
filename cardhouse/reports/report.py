"""The report pipeline: a list of steps, each of which computes one section of the page.

``build_report(models, out)`` runs every step for every model under one progress display,
then writes ``report.html``, ``results.json`` and the PNG figures into ``out``. A step is a
function ``run(ctx) -> Section``; it reads what earlier steps computed with ``ctx.need(key)``
and leaves its own results for later steps with ``ctx.keep(key, value)``. A step that raises
becomes a section that says why it failed; the other steps still run.

Adding a section (for instance one for another analysis) is one function and one entry in
``STEPS`` (always run) or in ``OPTIONAL_STEPS`` (run when asked for by name: ``--with NAME``).
"""

from __future__ import annotations

import itertools
import platform
import re
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .._files import write_atomically
from .._version import __version__
from ..analysis import Criterion, find_massive_weights, load_prompts, scan
from ..analysis.attention import MASSIVE, analyze_attention
from ..capture import tokenize_prompts
from ..data.corpora import get_corpus, tokenize_corpus
from ..evaluation.measure import Budget, measurer
from ..evaluation.metrics import metric_keys
from ..evaluation.perplexity import build_windows
from ..finetuning.report import metrics_of, plot_comparison
from ..interventions import ATTACKS, attack, run_variants, sweep_attacks
from ..interventions.sweep import default_ks, sweep, sweep_table
from ..models import load_model
from ..models.loading import BUNDLED, LoadedModel
from ..results import read_result, write_result
from .encoder_section import encoder_step
from .findings import findings
from .html import Figure, Section, Table, facts, layer_ranges, render_page
from .mechanism_plots import plot_attention
from .moe_section import is_moe, moe_step
from .plots import plot_bos_trace, plot_sweep, plot_top_magnitudes
from .tables import TABLE1_COLUMNS

class StepError(RuntimeError):
    """A step cannot run (for instance because a step it needs failed)."""


@dataclass(frozen=True)
class Settings:
    """What the report measures. ``Settings.quick()`` is minute-scale; ``Settings.full()`` the papers' sets."""

    mode: str = "full"
    prompts: str = "builtin"  # builtin, a text file or corpus:NAME (see analysis.load_prompts)
    prompt_limit: int | None = None
    relative: bool = False  # ratio-only criterion for massive activations
    min_abs: float | None = None  # the criterion's options (None: the default; see Criterion.from_options)
    min_ratio: float | None = None
    k: int = 5  # massive-weight indices listed
    layer: int | None = None  # massive-weight layer (None: detected)
    attack_k: int = 2  # rows zeroed / retained in the attack table
    ks: tuple[int, ...] | None = None  # sweep; None: 0, 1, 2, 3, 5, 10, 20, 50, ... up to the whole layer
    corpora: tuple[str, ...] = ("wikipedia", "c4")
    max_tokens: int = 2048  # corpus tokens per corpus and variant
    context: int = 512
    tasks: tuple[str, ...] = ()  # zero-shot tasks (lm-eval), measured for every variant
    limit: int | None = None  # zero-shot examples per task
    seed: int = 0
    bos: bool | None = None
    extras: tuple[str, ...] = ()  # names of OPTIONAL_STEPS to run
    macdrop: str | None = None  # a `cardhouse finetune-compare` folder (or its compare.json), for "macdrop"
    load: dict = field(default_factory=dict)  # load_model placement keywords (dtype, device, device_map, ...)
    images: str = "builtin"  # image models: builtin photographs, a folder or a file
    sentences: str = "builtin"  # text encoders: builtin, a text file or corpus:NAME
    pairs: int = 200  # text encoders: MRPC sentence pairs of the rank-agreement measure
    copies: int = 4  # image models: augmented copies per photograph of the retrieval measure

    @classmethod
    def quick(cls, **overrides) -> "Settings":
        return replace(cls(mode="quick", ks=(1, 2, 5), corpora=("wikipedia",), max_tokens=510, context=256,
                           pairs=100, copies=2), **overrides)

    @classmethod
    def full(cls, **overrides) -> "Settings":
        return replace(cls(mode="full"), **overrides)

    @property
    def criterion(self):
        return Criterion.from_options(self.min_abs, self.min_ratio, self.relative)

    def budget(self):
        return Budget(corpora=list(self.corpora), max_tokens=self.max_tokens, context=self.context,
                      tasks=list(self.tasks), limit=self.limit)

    def check(self) -> None:
        """Bad settings fail here, before any model time is spent or any file is written."""
        if not self.corpora:
            raise ValueError("at least one corpus is needed for the attacks")
        if self.context < 2 or self.max_tokens < self.context:
            raise ValueError(f"--max-tokens ({self.max_tokens}) must hold at least one window of "
                             f"--context ({self.context}) tokens")
        from ..validation import check_settings

        check_settings(None, self)  # the ranges that need no model (build_report checks each model's too)
        self.budget()  # the evaluation's own checks: unknown corpora and zero-shot tasks
        self.criterion  # noqa: B018  (--relative with --min-abs is refused here)
        if not 1 <= self.copies <= 5 or self.pairs < 1:
            raise ValueError(f"copies must be 1..5 and pairs at least 1 (got {self.copies}, {self.pairs})")
        unknown = [e for e in self.extras if e not in OPTIONAL_STEPS]
        if unknown:
            raise ValueError(f"unknown extra section {', '.join(unknown)}; available: "
                             f"{', '.join(OPTIONAL_STEPS) or 'none yet'}")
        if "macdrop" in self.extras:
            if self.macdrop is None:
                raise ValueError("the MacDrop section reads a finished comparison: give --macdrop-compare FOLDER "
                                 "(the output of `cardhouse finetune-compare`)")
            compare_json(self.macdrop)


@dataclass
class Context:
    """What a step sees: the model being reported on, the settings, and what earlier steps computed."""

    source: str | LoadedModel
    settings: Settings
    prompts: list[str]
    folder: Path
    prefix: str  # of this model's figure files
    tick: Callable[[str], None] = lambda detail: None  # progress detail of the running step
    done: dict[str, object] = field(default_factory=dict)

    def need(self, key: str):
        if key not in self.done:
            raise StepError(f"it needs the {key!r} step, which failed or did not run")
        return self.done[key]

    def keep(self, key: str, value) -> None:
        self.done[key] = value

    @property
    def lm(self) -> LoadedModel:
        return self.need("model")

    def figure(self, name: str) -> Path:
        return self.folder / f"{self.prefix}{name}.png"


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    run: Callable[[Context], Section]
    applies: Callable[[Context], bool] | None = None  # run only for the models it applies to (None: all)


# ---- the steps ---------------------------------------------------------------------------------


def model_step(ctx: Context) -> Section:
    if isinstance(ctx.source, LoadedModel):
        lm = ctx.source
    else:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the report shows one progress display, its own
        try:
            lm = load_model(ctx.source, bos=ctx.settings.bos, **ctx.settings.load)
        finally:
            hf_logging.enable_progress_bar()
    ctx.keep("model", lm)
    d = lm.describe()
    table = facts("The model", {"name": d["name"], "family": d["family"], "parameters": d["parameters"],
                                "layers": d["layers"], "hidden size": d["d_model"],
                                "FFN size": lm.blocks.intermediate_size(0), "dtype": d["dtype"],
                                "BOS token first": d["bos_token"] or "no", "source": d["source"]})
    return Section(tables=[table], data={"model": d})


def inputs_step(ctx: Context) -> Section:
    lm, s = ctx.lm, ctx.settings
    token_lists = tokenize_prompts(lm, ctx.prompts)
    prompts = facts("Prompts of the scan and the massive-weight search",
                    {"source": s.prompts, "prompts": len(ctx.prompts), "tokens": sum(map(len, token_lists)),
                     "shortest prompt (tokens)": min(map(len, token_lists)),
                     "longest prompt (tokens)": max(map(len, token_lists))})
    rows, data = [], {}
    for name in s.corpora:
        ids = tokenize_corpus(lm.tokenizer, name, s.max_tokens)
        windows = build_windows(ids, context=s.context, bos_id=lm.bos_id)
        predicted = windows.shape[0] * (s.context - 1)
        rows.append([name, get_corpus(name).source, ids.numel(), windows.shape[0], s.context, predicted])
        data[name] = {"tokens": ids.numel(), "windows": windows.shape[0], "predicted_tokens": predicted}
    corpora = Table("Corpora of the perplexity measurements (the same tokens for every variant)",
                    ["corpus", "source", "tokens", "windows", "window length", "predicted tokens"], rows)
    return Section(tables=[prompts, corpora],
                   text=["Each prompt starts with the BOS token when the model has one; each perplexity window "
                         "does too, and all variants of a model are scored on the same windows."],
                   data={"prompts": ctx.prompts, "corpora": data})


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


def weights_step(ctx: Context) -> Section:
    lm, s = ctx.lm, ctx.settings
    mw = find_massive_weights(lm, ctx.prompts, k=s.k, layer=s.layer, criterion=s.criterion)
    ctx.keep("weights", mw)
    sw = mw.super_weight
    summary = facts("The FFN that writes the massive activation", {
        "layer l": mw.layer, "hidden dim": mw.dim, "top-k indices": mw.indices, "intermediate size":
        mw.intermediate_size, "expert": mw.expert, "gated FFN": mw.gated, "weights in the top-k rows": mw.n_weights,
        "super weight (Yu et al.)": f"W_down[{sw['row']}, {sw['column']}]", "super weight value": sw["value"],
        "largest W_down entry of the top-k": f"W_down[{mw.largest_down_entry['row']}, "
                                            f"{mw.largest_down_entry['column']}]",
        "same top-k in every prompt": mw.stable_across_prompts})
    norm_keys = [k for k in mw.rows[0] if k.endswith("_norm")]
    rows = Table("The top-k intermediate indices of the position-0 token in layer l, and their weights",
                 ["index", "activation", *(k.replace("_norm", " norm") for k in norm_keys), "W_down[dim, index]"],
                 [[r["index"], a, *(r[k] for k in norm_keys), r["down_at_dim"]]
                  for r, a in zip(mw.rows, mw.activations)])
    trace = Table("The position-0 token's value in the massive dim, layer by layer",
                  ["layer", "before", "attention adds", "FFN adds", "after"],
                  [[t["layer"], t["resid_pre"], t["attention"], t["ffn"], t["resid_post"]] for t in mw.trace])
    png = plot_bos_trace(mw.trace, mw.dim, mw.layer, ctx.figure("bos_trace"), lm.name)
    return Section(
        text=list(mw.notes), tables=[summary, rows, trace],
        figures=[Figure(png.name, "The position-0 token's value in the massive dim after each layer, with what "
                                  "attention and the FFN add to it; the dotted line marks layer l.")],
        data={"massive_weights": mw.to_dict()})


def attacks_step(ctx: Context) -> Section:
    lm, s, mw = ctx.lm, ctx.settings, ctx.need("weights")
    ks = sorted({*(s.ks if s.ks is not None else default_ks(mw.intermediate_size)), s.attack_k})
    measure = measurer(lm, s.budget(), progress=False)
    count = itertools.count(1)

    def measured(model):
        ctx.tick(f"variant {next(count)}")
        return measure(model)

    ranked = find_massive_weights(lm, layer=mw.layer, k=mw.intermediate_size, criterion=s.criterion)  # all, ranked
    rows = sweep(lm, ranked, measured, ks, seed=s.seed, progress=False)  # a fresh sweep, never a resumed one
    rows += run_variants(lm, [attack(lm, mw, kind, seed=s.seed) for kind, spec in ATTACKS.items() if not spec.takes_k],
                         measured)
    metrics = metric_keys(rows[0])
    base = next(r for r in rows if r["kind"] == "original")
    chosen = [r for r in rows if r["kind"] == "original" or r["k"] in (None, s.attack_k)]
    first = metrics[0]
    table = Table("Attacks on layer l and their random controls (k = number of rows)",
                  ["variant", "what is changed", *metrics, f"{first} / original"],
                  [[r["variant"], r["description"], *(r[m] for m in metrics), r[first] / base[first]] for r in chosen])
    curves = {m: sweep_table(rows, m) for m in metrics}
    kinds = sweep_attacks()
    sweep_rows = Table(f"The sweep: {first} as k grows", ["k", *kinds],
                       [[k, *(dict(curves[first][kind]).get(k) for kind in kinds)]
                        for k in sorted({k for points in curves[first].values() for k, _ in points})])
    png = plot_sweep(curves, ctx.figure("sweep"), f"{lm.name}: top-k zeroing and retaining, layer {mw.layer}")
    return Section(
        text=["Top-k zeroing sets the W_up and W_gate rows of the k largest intermediate indices of layer l to zero; "
              "top-k retaining keeps only those rows. Each has a control that does the same to k random rows, and "
              "every edit is undone bit-identically before the next variant is measured."],
        tables=[table, sweep_rows],
        figures=[Figure(png.name, "Perplexity as more rows are zeroed or retained, for the top-k rows and for "
                                  "random rows, on log scales.")],
        data={"budget": s.budget().to_dict(), "results": rows})


def attention_step(ctx: Context) -> Section:
    """Sun et al. Sec. 4: the tokens that carry massive activations (set C) as attention sinks, and the
    set-C part of each attention output as an implicit bias (``analysis.attention``)."""
    result = analyze_attention(ctx.lm, ctx.prompts, criterion=ctx.settings.criterion, progress=False)
    mean = lambda values: sum(values) / len(values)  # noqa: E731  over heads
    summary = Table("Layers up to l against the layers after it (means over layers)",
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


def compare_json(path: str | Path) -> Path:
    """The ``compare.json`` of a ``cardhouse finetune-compare`` run: the file itself or its folder."""
    path = Path(path)
    path = path / "compare.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no MacDrop comparison at {path} (give a `cardhouse finetune-compare` output "
                                "folder or its compare.json)")
    return path


def macdrop_step(ctx: Context) -> Section:
    """House of Cards Table 4, from a finished ``cardhouse finetune-compare`` run (fine-tuning takes far
    longer than a report, so the report reads its results rather than starting it)."""
    path = compare_json(ctx.settings.macdrop)
    saved = read_result(path)
    if saved["model"]["name"] != ctx.lm.name:
        return Section(text=[f"The comparison in {path} is of {saved['model']['name']}; none was given for this "
                             "model."])
    rows = saved["results"]
    metrics = metrics_of(rows)
    columns = ["run", "method", "MacDrop schedule", "steps"]
    for m in metrics:
        columns += [m, f"{m} attacked", f"{m} attacked / original"]
    cells = []
    for r in rows:
        cells.append([r["run"], r["method"], r["schedule"] or "no MacDrop", r["steps"]])
        for m in metrics:
            cells[-1] += [r[m], r[f"{m}_attacked"], r[f"{m}_attacked"] / r[m] if r[m] else None]
    c, drop = saved["settings"]["config"], saved["settings"]["macdrop"]
    setup = facts("How they were fine-tuned", {
        "data": c["data"], "records used": c["limit"], "max length": c["max_length"], "batch size": c["batch_size"],
        "gradient accumulation": c["grad_accum"], "learning rate": c["lr"], "epochs": c["epochs"],
        "max steps": c["max_steps"], "adapter rank": c["rank"], "MacDrop p0": drop["p0"],
        "MacDrop scope": drop["scope"],
        "rows zeroed by the attack": rows[0]["attacked_rows"]})
    png = plot_comparison(rows, ctx.figure("macdrop"), f"{ctx.lm.name}: original vs top-3 zeroed")
    return Section(
        text=["Each adapter is fine-tuned without and with MacDrop (the massive rows of the base model dropped "
              "with a decaying rate during training); then the top-3 massive rows are zeroed. A model that "
              f"learned not to lean on them loses less. Read from {path}."],
        tables=[Table("Fine-tuned models, original and with the massive rows zeroed", columns, cells), setup],
        figures=[Figure(png.name, "Each fine-tuned model's metrics before and after the top-3 massive rows are "
                                  "zeroed, without and with MacDrop.")],
        data={"compare": saved})


STEPS: list[Step] = [
    Step("model", "Model", model_step),
    Step("inputs", "Prompts and corpora", inputs_step),
    Step("scan", "Magnitudes per layer (Sun et al. Table 1)", scan_step),
    Step("activations", "Massive activations: dims, layers, tokens", activations_step),
    Step("weights", "Massive weights (House of Cards)", weights_step),
    Step("attacks", "Attacks on the massive weights (House of Cards Fig. 4)", attacks_step),
    Step("moe", "Mixture of Experts: router collapse, the carrier's expert, super experts (House of Cards Fig. 5)",
         moe_step, applies=is_moe),
]

# An encoder (vision transformer, sentence encoder) gets its own sections: no corpora, no perplexity.
ENCODER_STEPS: list[Step] = [
    Step("model", "Model", model_step),
    Step("encoder", "Encoder: the carrying token, its weights, interventions, norm map, registers", encoder_step),
]


def is_encoder(source: str | LoadedModel) -> bool:
    if isinstance(source, LoadedModel):
        return source.inputs != "causal"
    return source in BUNDLED and BUNDLED[source].inputs != "causal"


# Sections run only when asked for by name (``Settings.extras``, ``cardhouse report --with NAME``).
OPTIONAL_STEPS: dict[str, Step] = {
    "attention": Step("attention", "Attention sinks and the implicit bias (Sun et al. Sec. 4)", attention_step),
    "macdrop": Step("macdrop", "MacDrop: fine-tuning that protects the massive weights (House of Cards Table 4)",
                    macdrop_step),  # needs Settings.macdrop
}


# ---- the pipeline ------------------------------------------------------------------------------


def prepare_folder(out: str | Path, overwrite: bool = False) -> Path:
    """The output folder: refused if it exists unless ``overwrite``; nothing in it is ever deleted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"the output folder {out} exists; pass --overwrite to replace the report's files "
                              "in it (other files are kept)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create the output folder {out}: {e.strerror}") from e
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", Path(text).name or text).strip("-").lower() or "model"


def _versions() -> dict:
    import matplotlib
    import transformers

    return {"cardhouse": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "matplotlib": matplotlib.__version__,
            "platform": platform.platform()}


def _run_section(settings: Settings, versions: dict) -> Section:
    def shown(value):
        if isinstance(value, tuple):  # k values stay numbers; names become one string
            return list(value) if all(isinstance(v, int) for v in value) else ", ".join(value) or "none"
        if isinstance(value, dict):  # the placement: dtype=bfloat16, device=cuda, ...
            return ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) or "default"
        return value

    return Section(key="run", title="Run: settings, versions, command",
                   tables=[facts("Settings", {k: shown(v) for k, v in asdict(settings).items()}),
                           facts("Versions", versions)])


def _write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def build_report(models: list[str | LoadedModel], out: str | Path, settings: Settings | None = None, *,
                 overwrite: bool = False, progress: bool = True, command: str | None = None,
                 steps: list[Step] | None = None) -> dict:
    """Run every step for every model and write the report folder; returns what results.json holds under
    ``results`` (the file is the result envelope: model descriptions and settings beside it)."""
    from ..models.spec import probe, spec_of
    from ..validation import check_settings

    settings = settings or Settings.quick()
    if not models:
        raise ValueError("no model given")
    settings.check()
    prompts = load_prompts(settings.prompts, limit=settings.prompt_limit)
    default = steps is None
    steps = steps if steps is not None else STEPS + [OPTIONAL_STEPS[name] for name in settings.extras]
    plans = [ENCODER_STEPS if default and is_encoder(m) else steps for m in models]
    for model in models:  # every model's config against the settings, before any weights load
        if not is_encoder(model):  # the settings checked are the LM steps' (context, corpora, k sweep)
            check_settings(spec_of(model) if isinstance(model, LoadedModel) else probe(str(model)), settings)
    folder = prepare_folder(out, overwrite)

    names = [m.name if isinstance(m, LoadedModel) else str(m) for m in models]
    prefixes = [_slug(n) + "_" for n in names]
    if len(set(prefixes)) < len(prefixes):
        prefixes = [f"{i + 1}-{p}" for i, p in enumerate(prefixes)]
    reports, failures = [], []
    with _progress(progress, sum(map(len, plans))) as advance:
        for source, name, prefix, model_steps in zip(models, names, prefixes, plans):
            ctx = Context(source, settings, prompts, folder, prefix)
            sections = []
            for step in model_steps:
                ctx.tick = lambda detail, step=step, name=name: advance(f"{name}: {step.title} ({detail})", 0)
                advance(f"{name}: {step.title}", 0)
                try:
                    if step.applies is not None and "model" in ctx.done and not step.applies(ctx):
                        advance(f"{name}: {step.title}", 1)
                        continue  # e.g. the MoE section of a dense model: no section at all
                    section = step.run(ctx)
                except Exception as e:  # the page says which step failed and why; the others go on
                    section = Section(error=f"{type(e).__name__}: {e}")
                    failures.append({"model": name, "step": step.key, "title": step.title, "error": section.error})
                section.key, section.title = step.key, step.title
                sections.append(section.to_dict())
                advance(f"{name}: {step.title}", 1)
            reports.append({"name": name, "sections": sections})

    results = {
        "title": f"cardhouse report: {' and '.join(names)}",
        "summary": "Massive activations (Sun et al., 2024) and massive weights (Oh et al., 2024, House of Cards): "
                   "where they are, which weights write them, and what happens to the model when those weights "
                   "are attacked, next to random controls.",
        "command": command or f"python -c 'from cardhouse.reports.report import build_report; ...'  "
                              f"# models {names}, settings {asdict(settings)}",
        "findings": findings(reports, settings.attack_k).to_dict(),
        "run": _run_section(settings, _versions()).to_dict(),
        "models": reports, "failures": failures,
    }
    described = [next((s["data"]["model"] for s in r["sections"] if s["key"] == "model" and s["status"] == "ok"),
                      {"name": r["name"]}) for r in reports]
    write_result(folder / "results.json", results, model=described, settings=asdict(settings), command=command)
    _write_text(folder / "report.html", render_page(results, folder))
    return results


class _progress:
    """One progress bar over every (model, step); ``advance(description, steps_done)``."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda description, n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True))
        self.bar.__enter__()
        task = self.bar.add_task("report", total=self.total)
        return lambda description, n: self.bar.update(task, description=description, advance=n)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
