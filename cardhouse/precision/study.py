"""The quantization study: the budget's metrics (perplexity on the same tokens, zero-shot accuracy on the same
examples) under each RTN scheme, with and without each protection and its random control (``run_variants``:
the weights are checked to be restored)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

from ..evaluation.measure import Budget, measurer
from ..interventions.variants import Variant, original, run_variants
from ..models.loading import LoadedModel
from .quantize import WEIGHT_PROTECTIONS, Scheme, Targets, check_scheme, quantized, quantized_weights

WEIGHT_STUDY = ("none", "massive-rows", "random-rows", "super-weight", "random-weight")
ACT_STUDY = ("none", "bos-kv", "random-kv", "massive-dims", "random-dims")


def parse_weight_spec(spec: str) -> tuple[int, int | None]:
    """``"4"`` -> 4 bits per channel; ``"4g64"`` -> 4 bits in groups of 64."""
    bits, _, group = spec.strip().lower().lstrip("w").partition("g")
    try:
        return int(bits), int(group) if group else None
    except ValueError:
        raise ValueError(f"weight scheme {spec!r}: write BITS or BITSgGROUP, e.g. 8, 4, 4g64") from None


def parse_act_spec(spec: str) -> tuple[int, str]:
    """``"8:tensor"`` or ``"8:token"``."""
    bits, _, gran = spec.strip().lower().lstrip("a").partition(":")
    try:
        return int(bits), gran or "token"
    except ValueError:
        raise ValueError(f"activation scheme {spec!r}: write BITS:tensor or BITS:token, e.g. 8:tensor") from None


def study_schemes(weights: Sequence[str] = ("8", "4", "4g64"), acts: Sequence[str] = ("8:tensor", "8:token"),
                  protect: bool = True) -> list[Scheme]:
    """Each weight scheme with every weight protection and its control, each activation scheme with every
    activation protection and its control (``protect=False``: the bare schemes)."""
    schemes = []
    for spec in weights:
        bits, group = parse_weight_spec(spec)
        schemes += [Scheme(weight_bits=bits, group=group, protect=p) for p in (WEIGHT_STUDY if protect else ["none"])]
    for spec in acts:
        bits, gran = parse_act_spec(spec)
        schemes += [Scheme(act_bits=bits, act_granularity=gran, protect=p) for p in (ACT_STUDY if protect else ["none"])]
    return schemes


FOLDABLE_PROTECTIONS = ("none",) + WEIGHT_PROTECTIONS


def foldable_scheme(spec: str, protect: str = "none") -> Scheme:
    """A weight scheme (``quantize --weights``' spec: 8, 4, 4g64) with an optional weight protection, for an
    export: fake-quantized weights are weights. Activation schemes are refused: they act at run time."""
    text = spec.strip().lower()
    if ":" in text or text.startswith("a"):
        raise ValueError(f"--quantize {spec}: quantizing activations acts on every forward pass (its scale comes from "
                         "the input), so it has no form as weights and cannot be exported; export a weight scheme "
                         "(8, 4, 4g64)")
    if protect not in FOLDABLE_PROTECTIONS:
        raise ValueError(f"--protect {protect}: an export keeps weights in full precision "
                         f"({', '.join(FOLDABLE_PROTECTIONS)}); the activation protections need quantized "
                         "activations, which cannot be exported")
    bits, group = parse_weight_spec(spec)
    return Scheme(weight_bits=bits, group=group, protect=protect)


def quantize_variant(lm: LoadedModel, scheme: Scheme, targets: Targets | None = None) -> Variant:
    """The block weights replaced by their fake-quantized values (``quantized_weights``: the study's quantizer and
    protections), as a ``Variant`` an export folds in; ``targets`` is needed by a protection."""
    if scheme.act_bits:
        raise ValueError(f"{scheme.name} quantizes activations: not a weight edit")
    if scheme.protect != "none" and targets is None:
        raise ValueError(f"protection {scheme.protect!r} needs the targets (find_targets)")
    kept = {"massive-rows": f"; rows {targets.rows} of layer {targets.layer}'s W_up/W_gate kept in full precision",
            "super-weight": f"; the super weight W_down{list(targets.super_weight)} of layer {targets.layer} kept",
            "random-rows": f"; {len(targets.rows)} random rows of layer {targets.layer} kept (a control)",
            "random-weight": f"; one random W_down entry of layer {targets.layer} kept (a control)",
            }.get(scheme.protect, "") if targets is not None else ""
    return Variant(f"quantize {scheme.name}", f"every linear weight of the blocks fake-quantized (symmetric "
                   f"round-to-nearest, {scheme.name}){kept}", lambda: quantized_weights(lm, scheme, targets))


@dataclass
class StudyResult:
    rows: list[dict]
    targets: dict

    def table(self, key: str) -> dict[str, dict[str, float]]:
        """base scheme -> protection -> the row's ``key`` (a metric key: ``ppl_wikipedia``, ``acc_mean``)."""
        out: dict[str, dict[str, float]] = {}
        for row in self.rows:
            if row["variant"] == "original":
                continue
            out.setdefault(row["base"], {})[row["protect"]] = row[key]
        return out


def check_budget(schemes: Sequence[Scheme], budget: Budget) -> None:
    """Zero-shot of quantized activations needs whole sequences: the cardhouse backend runs each continuation
    against a cached prefix, where a per-tensor scale and the BOS position would be the continuation's."""
    if budget.tasks and budget.backend == "cardhouse" and any(s.act_bits for s in schemes):
        raise ValueError("zero-shot with quantized activations needs --backend hflm (whole sequences): the cardhouse "
                         "backend scores continuations from a cached prefix, so a per-tensor scale and the BOS "
                         "keys/values would be the continuation's")


def quantization_study(lm: LoadedModel, schemes: Sequence[Scheme], budget: Budget, targets: Targets,
                       on_result: Callable[[dict], None] | None = None, progress: bool = False) -> StudyResult:
    check_budget(schemes, budget)
    for scheme in schemes:
        check_scheme(lm, scheme)
    infos: dict[str, dict] = {}

    @contextmanager
    def apply(scheme: Scheme):
        with quantized(lm, scheme, targets) as info:
            infos[scheme.name] = info  # what it protected (entries, channels), for the row
            yield

    def variant(scheme: Scheme) -> Variant:
        return Variant(scheme.name, str(scheme.to_dict()), lambda: apply(scheme))

    def annotate(row: dict) -> None:
        scheme = next((s for s in schemes if s.name == row["variant"]), None)
        if scheme is not None:
            base = Scheme(scheme.weight_bits, scheme.group, scheme.act_bits, scheme.act_granularity, "none")
            row.update(base=base.name, protect=scheme.protect, info=infos.get(scheme.name, {}))
        if on_result:
            on_result(row)

    rows = run_variants(lm, [original()] + [variant(s) for s in schemes], measurer(lm, budget, progress=progress),
                        on_result=annotate, reuse=False)
    return StudyResult(rows, targets.to_dict())
