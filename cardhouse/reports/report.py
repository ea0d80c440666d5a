"""The report pipeline: ``build_report(models, out)`` runs every step for every model under one
progress display, then writes ``report.html``, ``results.json`` and the PNG figures into ``out``.

The pieces: ``settings`` (what is measured), ``context`` (what a step is and sees), ``steps`` (the
list of steps in page order; adding a section is one function and one entry there), the
``*_section`` modules (the steps themselves) and ``html`` (rendering). A step that raises becomes a
section that says why it failed; the other steps still run.
"""

from __future__ import annotations

import platform
import re
from dataclasses import asdict
from pathlib import Path

import torch

from .._files import write_atomically
from .._version import __version__
from ..analysis import load_prompts
from ..models.loading import LoadedModel
from ..models.spec import probe, spec_of
from ..results import write_result
from ..validation import check_settings
from .context import Context, Step, StepError
from .findings import findings
from .html import Section, facts, render_page
from .settings import Settings
from .steps import ENCODER_STEPS, OPTIONAL_STEPS, STEPS, is_encoder

__all__ = ["ENCODER_STEPS", "OPTIONAL_STEPS", "STEPS", "Context", "Settings", "Step", "StepError", "build_report",
           "prepare_folder"]


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


def _run_section(settings: Settings, versions: dict, encoders: bool = True) -> Section:
    def shown(value):
        if isinstance(value, tuple):  # k values stay numbers; names become one string
            return list(value) if all(isinstance(v, int) for v in value) else ", ".join(value) or "none"
        if isinstance(value, dict):  # the placement: dtype=bfloat16, device=cuda, ...
            return ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) or "default"
        return value

    return Section(key="run", title="Run: settings, versions, command",
                   tables=[facts("Settings", {k: shown(v) for k, v in asdict(settings).items()
                                              if encoders or k not in Settings.ENCODER_ONLY}),
                           facts("Versions", versions)])


def _write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def build_report(models: list[str | LoadedModel], out: str | Path, settings: Settings | None = None, *,
                 overwrite: bool = False, progress: bool = True, command: str | None = None,
                 steps: list[Step] | None = None) -> dict:
    """Run every step for every model and write the report folder; returns what results.json holds under
    ``results`` (the file is the result envelope: model descriptions and settings beside it)."""
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
                        advance(f"{name}: {step.title}: does not apply", 1)
                        continue  # e.g. the MoE section of a dense model: no section at all
                    section = step.run(ctx)
                except Exception as e:  # the page says which step failed and why; the others go on
                    section = Section(error=f"{type(e).__name__}: {e}")
                    failures.append({"model": name, "step": step.key, "title": step.title, "error": section.error})
                section.key, section.title = step.key, step.title
                sections.append(section.to_dict())
                advance(f"{name}: {step.title}", 1)
            reports.append({"name": name, "sections": sections})
        advance(f"{' and '.join(names)}: every step done", 0)  # not the last step's title (skipped or not)

    results = {
        "title": f"cardhouse report: {' and '.join(names)}",
        "summary": "Massive activations (Sun et al., 2024) and massive weights (Oh et al., 2024, House of Cards): "
                   "where they are, which weights write them, and what happens to the model when those weights "
                   "are attacked, next to random controls.",
        "command": command or f"python -c 'from cardhouse.reports.report import build_report; ...'  "
                              f"# models {names}, settings {asdict(settings)}",
        "findings": findings(reports, settings.attack_k).to_dict(),
        "run": _run_section(settings, _versions(), encoders=any(plan is ENCODER_STEPS for plan in plans)).to_dict(),
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
