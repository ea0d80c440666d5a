"""The one validation layer: every option of every command is checked here, against the model's
config, before any weight loads and before any file is written.

- ``RULES`` is the table of options: each names its flag and its allowed range, where a bound
  may come from the model (layers, FFN size, heads, maximum positions: ``ModelSpec``, read from
  ``config.json`` or the GGUF header) or from another option (``--max-tokens`` >= one window of
  ``--context``). ``check_options(spec, **values)`` applies it; a bad value raises ``OptionError``,
  whose message names the flag, the allowed range and the value given.
- ``check_output_file`` / ``check_output_folder`` refuse an output path that cannot be written
  (a folder given as a file, a file given as a folder, a read-only place) without creating anything.
- ``validate(model, ...)`` does all of it for a command and returns ``Checked``, whose ``load()``
  is the only way the command line gets the weights; ``build_report`` calls ``check_settings``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .analysis import load_prompts
from .models import load_model
from .models.spec import ModelSpec, probe

Bound = int | float | Callable[["ModelSpec | None", dict], "int | float | None"] | None


class OptionError(ValueError):
    """A bad option value: the message names the flag, the allowed range and the value."""

    def __init__(self, flag: str, allowed: str, value, why: str = ""):
        self.flag, self.allowed, self.value = flag, allowed, value
        super().__init__(f"{flag} must be {allowed}, got {value!r}{f' ({why})' if why else ''}")


@dataclass(frozen=True)
class Rule:
    flag: str
    low: Bound = None
    high: Bound = None  # inclusive
    kind: type = int  # int, float, or list (comma-separated integers)
    low_open: bool = False  # > low instead of >= low
    also: tuple = ()  # values allowed outside the range (e.g. -1 for "no limit")
    unique: bool = False  # list: duplicates are an error (else they are dropped)
    why: Callable[["ModelSpec", dict], str] | None = None  # where a model-given bound comes from

    @property
    def needs_model(self) -> bool:
        return any(getattr(bound, "needs_model", False) for bound in (self.low, self.high))


def _model(fn):
    """A bound that needs the model's spec (skipped when no model is known yet)."""
    def bound(spec, values):
        return None if spec is None else fn(spec, values)

    bound.needs_model = True
    return bound


_layers = _model(lambda spec, v: spec.layers - 1)
_ffn = _model(lambda spec, v: spec.d_mlp(v.get("layer")))
_ffn_last = _model(lambda spec, v: spec.d_mlp(v.get("layer")) - 1)
_positions = _model(lambda spec, v: spec.max_positions)


def _ffn_why(spec, v):
    layer = v.get("layer")
    return f"{spec.source} has {spec.d_mlp(layer)} FFN neurons in layer {layer if layer is not None else 0}"


_LAYERS_WHY = lambda spec, v: f"{spec.source} has {spec.layers} layers"  # noqa: E731
_POS_WHY = lambda spec, v: f"{spec.source} takes at most {spec.max_positions} positions"  # noqa: E731

# Checked in this order: the layer before the sizes that depend on it, --context before --max-tokens.
RULES: dict[str, Rule] = {
    "layer": Rule("--layer", 0, _layers, why=_LAYERS_WHY),
    "k": Rule("--k", 1, _ffn, why=_ffn_why),
    "attack_k": Rule("--attack-k", 1, _ffn, why=_ffn_why),
    "ks": Rule("--ks", 0, _ffn, kind=list, why=_ffn_why),
    "indices": Rule("--indices", 0, _ffn_last, kind=list, unique=True, why=_ffn_why),
    "rows": Rule("--rows", 0, _ffn_last, kind=list, unique=True, why=_ffn_why),
    "map_layer": Rule("--map-layer", 0, _layers, why=_LAYERS_WHY),
    "head": Rule("--head", 0, _model(lambda spec, v: spec.heads - 1),
                 why=lambda spec, v: f"{spec.source} has {spec.heads} attention heads"),
    "map_head": Rule("--map-head", 0, _model(lambda spec, v: spec.heads - 1),
                     why=lambda spec, v: f"{spec.source} has {spec.heads} attention heads"),
    "top": Rule("--top", 1, _model(lambda spec, v: spec.d_model),
                why=lambda spec, v: f"{spec.source} has hidden size {spec.d_model}"),
    "context": Rule("--context", 2, _positions, why=_POS_WHY),
    "max_length": Rule("--max-length", 2, _positions, why=_POS_WHY),
    # one window holds BOS + (context - 1) corpus tokens
    "max_tokens": Rule("--max-tokens", lambda spec, v: v["context"] - 1 if v.get("context") else 1,
                       why=lambda spec, v: f"to fill one perplexity window of --context {v.get('context')}"),
    "finetune_max_tokens": Rule("--max-tokens", lambda spec, v: v["context"] - 1 if v.get("context") else 1,
                                also=(0,), why=lambda spec, v: f"0: no perplexity; else enough to fill one window of --context "
                                                            f"{v.get('context')}"),
    "limit": Rule("--limit", 1),
    "prompt_limit": Rule("--limit", 1),
    "records": Rule("--records", 2, why=lambda spec, v: "one record to train on and one to validate"),
    "task_limit": Rule("--task-limit", 1),
    "n_items": Rule("--n", 1),
    "max_new_tokens": Rule("--max-new-tokens", 1),
    "batch_size": Rule("--batch-size", 1),
    "n_prompts": Rule("--n-prompts", 1),
    "prompt_index": Rule("--prompt-index", 0, lambda spec, v: v.get("n_texts", 0) - 1 if "n_texts" in v else None,
                         why=lambda spec, v: f"there are {v.get('n_texts')} prompts"),
    "min_abs": Rule("--min-abs", 0.0, kind=float),
    "min_ratio": Rule("--min-ratio", 0.0, kind=float, low_open=True),
    "threshold": Rule("--threshold", 0.0, 1.0, kind=float, low_open=True),
    "grad_accum": Rule("--grad-accum", 1),
    "rank": Rule("--rank", 1),
    "lora_alpha": Rule("--lora-alpha", 1),
    "lr": Rule("--lr", 0.0, kind=float, low_open=True),
    "epochs": Rule("--epochs", 0.0, kind=float, low_open=True),
    "max_steps": Rule("--max-steps", 1, also=(-1,), why=lambda spec, v: "-1: train for --epochs"),
    "save_steps": Rule("--save-steps", 1),
    "p0": Rule("--p0", 0.0, 1.0, kind=float),
    "alpha": Rule("--alpha", 0.0, kind=float),
    # cardhouse super-weight
    "ratio": Rule("--ratio", 1.0, kind=float, low_open=True),
    "contributions": Rule("--top", 1, _ffn, why=_ffn_why),
    "candidates": Rule("--candidates", 1),
    "controls": Rule("--controls", 0),
    "pairs": Rule("--pairs", 2, also=(0,), why=lambda spec, v: "0: no pairs; else the candidates paired"),
    "max_pairs": Rule("--max-pairs", 1),
    # cardhouse precision / export --rescale: the power of two, the margin in doublings
    "power": Rule("--power", 0, 64),
    "margin": Rule("--margin", 0.0, 16.0, kind=float),
    "copies": Rule("--copies", 1, 5),  # cardhouse encoder: augmented copies per photograph (encoders.images)
    "mrpc_pairs": Rule("--mrpc-pairs", 1),
    # Mixture of Experts (cardhouse moe, the MoE attacks)
    "collapse": Rule("--collapse", 0.0, 1.0, kind=float, low_open=True),
    "percentile": Rule("--percentile", 0.0, 100.0, kind=float),
    "fraction": Rule("--fraction", 0.0, 1.0, kind=float),
    # cardhouse emergence (a model trained from scratch: no spec)
    "steps": Rule("--steps", 1),
    "every": Rule("--every", 1),
    "n_layer": Rule("--n-layer", 1),
    "n_head": Rule("--n-head", 1),
    "n_embd": Rule("--n-embd", 1),
    "block_size": Rule("--block-size", 2),
    "warmup": Rule("--warmup", 0),
    "threads": Rule("--threads", 1),
    "stop_at": Rule("--stop-at", 0),
    "tokens": Rule("--tokens", 1),  # cardhouse memory
}

_DESCRIBE = {int: "an integer", float: "a number", list: "comma-separated integers"}


def _bound(bound: Bound, spec, values):
    return bound(spec, values) if callable(bound) else bound


def _allowed(rule: Rule, low, high) -> str:
    if rule.kind is list:
        inner = _allowed(Rule(rule.flag, kind=int), low, high)
        return f"comma-separated integers, each {inner.removeprefix('an integer ')}"
    what = _DESCRIBE[rule.kind]
    if low is not None and high is not None:
        text = f"{what} in {low}..{high}" if not rule.low_open else f"{what} in ({low}, {high}]"
    elif low is not None:
        text = f"{what} > {low}" if rule.low_open else f"{what} >= {low}"
    elif high is not None:
        text = f"{what} <= {high}"
    else:
        text = what
    return text + "".join(f" or {a}" for a in rule.also)


def _check_one(rule: Rule, value, spec, values):
    low, high = _bound(rule.low, spec, values), _bound(rule.high, spec, values)
    allowed = _allowed(rule, low, high)
    why = rule.why(spec, values) if rule.why and (spec is not None or not rule.needs_model) else ""

    def in_range(x) -> bool:
        if x in rule.also:
            return True
        above = x > low if rule.low_open else x >= low
        return (low is None or above) and (high is None or x <= high)

    if rule.kind is list:
        items = value
        if isinstance(value, str):
            try:
                items = [int(x) for x in value.split(",") if x.strip()]
            except ValueError:
                raise OptionError(rule.flag, allowed, value) from None
            if not items:
                raise OptionError(rule.flag, allowed, value, "no value given")
        items = [int(x) for x in items]
        bad = [x for x in items if not in_range(x)]
        if bad:
            raise OptionError(rule.flag, allowed, ",".join(map(str, items)),
                              f"out of range: {', '.join(map(str, bad))}" + (f"; {why}" if why else ""))
        if len(set(items)) != len(items):
            if rule.unique:
                dups = sorted({x for x in items if items.count(x) > 1})
                raise OptionError(rule.flag, allowed + " without repeats", ",".join(map(str, items)),
                                  f"repeated: {dups}")
            items = list(dict.fromkeys(items))  # --ks 2,2 measures k=2 once
        return items
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (rule.kind is int and isinstance(value, float)):
        raise OptionError(rule.flag, allowed, value)
    if value != value or not in_range(value):  # value != value: NaN
        raise OptionError(rule.flag, allowed, value, why)
    return value


def check_options(spec: ModelSpec | None = None, **values) -> dict:
    """Check each given option (``None`` = not given) against ``RULES`` and, when ``spec`` is known, the
    model's sizes; returns the values with lists parsed and de-duplicated. Names outside ``RULES`` (such as
    ``n_texts``, the number of prompts) are context for other bounds and are returned as they are."""
    unknown = [n for n in values if n not in RULES and n != "n_texts"]
    if unknown:
        raise TypeError(f"no validation rule for {unknown}; add one to cardhouse.validation.RULES")
    checked = dict(values)
    for name, rule in RULES.items():
        if values.get(name) is not None:
            checked[name] = _check_one(rule, values[name], spec, checked)
    return checked


# ---- output paths -------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(path: Path | None, flag: str = "--out") -> None:
    """``path`` is, or can be created as, a writable folder (nothing is created here)."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(flag, "a folder", str(path), "it is a file")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise OptionError(flag, "a folder", str(path), f"{base} is a file")
    if not _can_create_in(base):
        raise OptionError(flag, "a writable folder", str(path), f"nothing can be created in {base}")


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder``: tried with a temporary file, removed at once (permission
    bits say too little: root may write anywhere by them, but not in /proc or on a read-only mount)."""
    import tempfile

    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_output_file(path: Path | None, flag: str = "--json") -> None:
    """``path`` can be written as a file: not a folder, in a folder that is (or can be made) writable."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise OptionError(flag, "a file path", str(path), f"it is a folder; give a file name such as "
                                                          f"{path / 'results.json'}")
    check_output_folder(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise OptionError(flag, "a writable file", str(path), "it is read-only")


# ---- a command's whole check --------------------------------------------------------------------


@dataclass
class Checked:
    """What ``validate`` accepted: the model's spec, the options (normalized) and the prompts."""

    spec: ModelSpec | None
    options: dict = field(default_factory=dict)
    prompts: list[str] | None = None
    own: object = None  # what the command's own checks (``validate(also=...)``) returned

    def load(self, bos: bool | None = None, **kwargs):
        """The weights, loaded only now that every check has passed."""
        if self.spec is None:
            raise ValueError("no model was validated")
        return load_model(self.spec.source, bos=bos, **kwargs)


def load_texts(prompts: str, limit: int | None = None) -> list[str]:
    return load_prompts(prompts, limit=limit)


def validate(model: str | None, *, prompts: str | None = None, prompt_limit: int | None = None,
             files: dict[str, Path | None] | None = None, folders: dict[str, Path | None] | None = None,
             also: Callable[[], object] | None = None, **options) -> Checked:
    """Everything a command can check before the weights load, cheapest first: the options' own ranges,
    the output paths, the prompts, the model's config and the options against its sizes, then the
    command's own checks (``also``, e.g. building its config objects; what it returns is ``Checked.own``)."""
    # the ranges that need no model first; a range the model bounds is checked (and reported whole) below
    check_options(None, prompt_limit=prompt_limit,
                  **{n: v for n, v in options.items() if model is None or n not in RULES or not RULES[n].needs_model})
    for flag, path in (folders or {}).items():
        check_output_folder(path, flag)
    for flag, path in (files or {}).items():
        check_output_file(path, flag)
    texts = None
    if prompts is not None:
        texts = load_texts(prompts, prompt_limit)
        options = {**options, "n_texts": len(texts)}
    spec = probe(model) if model is not None else None
    checked = check_options(spec, **options)
    return Checked(spec, checked, texts, also() if also is not None else None)


def check_settings(spec: ModelSpec | None, settings) -> None:
    """A report's settings against one model (``build_report`` runs this for every model before any loads);
    without a model, only the ranges that need none (a range the model bounds is then reported whole)."""
    values = dict(layer=settings.layer, k=settings.k, attack_k=settings.attack_k,
                  ks=list(settings.ks) if settings.ks is not None else None, context=settings.context,
                  max_tokens=settings.max_tokens, task_limit=settings.limit, prompt_limit=settings.prompt_limit)
    check_options(spec, **{n: v for n, v in values.items() if spec is not None or not RULES[n].needs_model})
