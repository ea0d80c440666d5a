"""Headroom: how close each activation comes to the largest number of a low-precision format.

Two measurements, because comparing numbers is not the same as running the model:

- ``headroom``: at every named hook point of every layer, the largest |activation| over a
  calibration set (streamed: one running maximum per hook, in float32), against the largest finite
  value of float16 (65,504), bfloat16 (~3.4e38) and FP8 E4M3 (448), as a margin in powers of two
  (log2(format max / max |a|); negative: it does not fit).
- ``first_nonfinite``: the model really run in a low-precision dtype (a cast copy; the loaded model
  is not touched), with a forward hook on every module: the first module, in execution order, whose
  output holds an inf or a NaN. A child module finishes before its parent, so that is the innermost
  module where the overflow starts.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..capture import POINTS, hook_name, run_batches
from ..capture.batches import batches
from ..models.loading import LoadedModel

# largest finite value of each format (torch.finfo)
FORMATS: dict[str, float] = {
    "float16": float(torch.finfo(torch.float16).max),  # 65,504
    "bfloat16": float(torch.finfo(torch.bfloat16).max),  # ~3.39e38: same exponent range as float32
    "fp8_e4m3": float(torch.finfo(torch.float8_e4m3fn).max),  # 448
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # the formats a CPU can run a model in


def margin_bits(max_abs: float, limit: float) -> float:
    """log2(limit / max_abs): how many doublings are left before ``max_abs`` passes ``limit``."""
    if max_abs <= 0:
        return math.inf
    if not math.isfinite(max_abs):
        return -math.inf
    return math.log2(limit / max_abs)


@dataclass
class PointMax:
    layer: int
    point: str
    max_abs: float
    prompt: int  # where the maximum sits
    position: int
    token_id: int

    def margins(self) -> dict[str, float]:
        return {fmt: margin_bits(self.max_abs, limit) for fmt, limit in FORMATS.items()}


@dataclass
class Headroom:
    tokens: int
    points: list[PointMax]

    def worst(self) -> PointMax:
        return max(self.points, key=lambda p: p.max_abs)

    def overflows(self, fmt: str = "float16") -> list[PointMax]:
        """The points whose largest |a| does not fit ``fmt`` (in execution order)."""
        return [p for p in self.points if p.max_abs > FORMATS[fmt]]

    def max_at(self, points: Sequence[str]) -> float:
        return max((p.max_abs for p in self.points if p.point in points), default=0.0)

    def to_dict(self) -> dict:
        worst = self.worst()
        return {"tokens": self.tokens, "formats": FORMATS,
                "worst": {**asdict(worst), "margins": worst.margins()},
                "overflow": {fmt: [f"blocks.{p.layer}.{p.point}" for p in self.overflows(fmt)] for fmt in FORMATS},
                "points": [{**asdict(p), "margins": p.margins()} for p in self.points]}


def default_points(lm: LoadedModel) -> list[str]:
    # an MoE layer's intermediate state lives in 3-D expert tensors: no module boundary exposes it
    return [p for p in POINTS if not (lm.blocks.is_moe and p == "mlp.hook_post")]


def headroom(lm: LoadedModel, token_lists: Sequence[Sequence[int]], *, points: Sequence[str] | None = None,
             batch_size: int = 8, progress: bool = True) -> Headroom:
    """The largest |activation| at every hook point and layer over ``token_lists`` (in the model's dtype,
    reduced in float32). One running maximum per hook: memory does not grow with the calibration set."""
    points = list(points or default_points(lm))
    n_layers = len(lm.blocks)
    order = [(layer, point) for layer in range(n_layers) for point in points]
    best = {key: (-1.0, 0, 0, 0) for key in order}  # (max |a|, prompt, position, token)

    def hooks_for(batch):
        # the hooks close over their own batch: a streamed model runs every batch through a block before the next
        padding = ~batch.attention_mask.bool()

        def observe(name, acts):
            layer, point = name.split(".", 2)[1:]
            # per-token max |a| from amax and amin: no |a| copy of the whole tensor (on a CPU two reductions are
            # ~10x faster than torch.aminmax along a dim, which made the scan cost 1.23x a plain pass)
            high, low = acts.amax(-1), acts.amin(-1)
            per_token = torch.maximum(high.float(), low.float().neg()).masked_fill_(padding, 0.0)
            flat = int(per_token.argmax())
            value = float(per_token.flatten()[flat])
            if not value <= best[(int(layer), point)][0]:  # also takes inf and NaN
                row, pos = divmod(flat, per_token.shape[1])
                best[(int(layer), point)] = (value, int(batch.prompt_index[row]), pos, int(batch.input_ids[row, pos]))

        return {hook_name(layer, point): observe for layer, point in order}

    run_batches(lm, token_lists, hooks_for, batch_size=batch_size, progress=progress, desc="headroom")
    return Headroom(sum(map(len, token_lists)), [PointMax(layer, point, *best[(layer, point)]) for layer, point in order])


# ---- really running it in low precision ---------------------------------------------------------------------------


@dataclass
class LowPrecisionRun:
    dtype: str
    finite: bool  # no inf/NaN anywhere in any module's output
    first_module: str | None  # the first module (execution order) whose output holds inf/NaN
    first_module_type: str | None
    first_layer: int | None  # the block that module belongs to (None: outside the blocks)
    first_kind: str | None  # "inf" or "nan"
    first_batch: int | None
    input_max_abs: float | None  # the largest finite |a| entering that module
    modules_nonfinite: int  # how many module outputs held inf/NaN in that batch
    logits_nonfinite: bool
    unsupported: str | None = None  # an op this device cannot run in this dtype (the error, verbatim)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` in ``dtype``; the original keeps its weights and dtype.

    The parameters are cast on the way (deepcopy's memo maps each one to its cast copy), so no second
    full-precision copy is ever made; tied parameters stay tied.
    """
    memo = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo).to(dtype)


def _layer_of(name: str, layers_path: str) -> int | None:
    prefix = layers_path + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return getattr(x, "logits", None) if hasattr(x, "logits") else getattr(x, "last_hidden_state", None)


def first_nonfinite(lm: LoadedModel, token_lists: Sequence[Sequence[int]], *, dtype: str = "float16",
                    batch_size: int = 8, model: nn.Module | None = None) -> LowPrecisionRun:
    """Run the model in ``dtype`` (a cast copy of ``lm.model``, or ``model`` if given) over ``token_lists``
    and find the first module whose output holds inf or NaN; stops after the first batch that has one."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    low = model if model is not None else cast_copy(lm.model, DTYPES[dtype])
    layers_path = lm.blocks.adapter.layers
    found: list[tuple[str, nn.Module, str, float | None]] = []

    def check(name):
        def on_output(module, args, output):
            out = _first_tensor(output)
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or torch.isfinite(out).all():
                return
            kind = "nan" if torch.isnan(out).any() else "inf"
            inputs = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            finite_in = [a[torch.isfinite(a)] for a in inputs]
            biggest = max((float(a.abs().max()) for a in finite_in if a.numel()), default=None)
            found.append((name, module, kind, biggest))
        return on_output

    handles = [m.register_forward_hook(check(n)) for n, m in low.named_modules() if n]
    logits_bad, unsupported, first_batch = False, None, None
    try:
        with torch.inference_mode():
            for index, batch in enumerate(batches(token_lists, batch_size)):
                try:
                    out = low(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                except (RuntimeError, NotImplementedError) as e:  # e.g. "... not implemented for 'Half'"
                    unsupported = str(e).splitlines()[0]
                    break
                logits = _first_tensor(out)
                logits_bad = bool(logits is not None and not torch.isfinite(logits).all())
                if found or logits_bad:
                    first_batch = index
                    break
    finally:
        for handle in handles:
            handle.remove()
    first = found[0] if found else None
    notes = []
    if unsupported:
        notes.append(f"the model could not run in {dtype} on {next(low.parameters()).device}: {unsupported}")
    return LowPrecisionRun(
        dtype=dtype, finite=not found and not logits_bad and unsupported is None,
        first_module=first[0] if first else None, first_module_type=type(first[1]).__name__ if first else None,
        first_layer=_layer_of(first[0], layers_path) if first else None, first_kind=first[2] if first else None,
        first_batch=first_batch, input_max_abs=first[3] if first else None, modules_nonfinite=len(found),
        logits_nonfinite=logits_bad, unsupported=unsupported, notes=notes)
