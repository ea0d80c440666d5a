"""A function-preserving rescale of the residual stream by a power of two.

Every norm that reads the residual stream (RMSNorm, LayerNorm) gives the same output for x and
x / 2^p, so the model computes the same function when everything that *writes* into the stream is
divided by 2^p: the embeddings, and the weights and biases of the modules whose output is added to it
(o_proj and down_proj; Gemma-2/3's post-attention and post-FFN norms, which compute
x_hat * (1 + weight): there (1 + weight) is divided). The adapter table names these per family
(``Adapter.embeddings``, ``writers``, ``writer_norms``, ``readers``, ``norm_offset``). When the
output head shares the embedding matrix, the final norm's scale (and bias) is multiplied by 2^p so
that the logits are unchanged.

A power of two is exact in floating point for every weight that is simply multiplied; Gemma's
(1 + weight) rewrite rounds once. The norms' eps (x / sqrt(mean(x^2) + eps)) is the one place where
the function changes: the rescaled stream meets eps 4^p times sooner. ``verify_rescale`` measures
the difference on real logits.

``rescaled(lm, power)`` is a context manager that restores bit-identical weights on exit (through
``edit_in_place``, the discipline of ``overwrite_slices``), so the same code serves a measurement and an export.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..capture.batches import batches
from ..models.adapters import get
from ..models.loading import LoadedModel
from .headroom import FORMATS, Headroom

# the hook points whose values are divided by 2^p: the stream, and the branch outputs where their own projections
# write into it (with sandwich norms they write into the post-norms and keep their scale)
STREAM_POINTS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
BRANCH_POINTS = ("hook_attn_out", "mlp.hook_out")


def scaled_points(lm: LoadedModel) -> tuple[str, ...]:
    return STREAM_POINTS + (BRANCH_POINTS if lm.blocks.adapter.writers else ())


class RescaleError(ValueError):
    """The rescale would change the function of this model (the message says why)."""


@dataclass
class RescalePlan:
    power: int  # the residual stream is divided by 2**power
    tensors: list[str]  # what is multiplied by 2**-power
    norms: list[str]  # norm scales rewritten as (offset + w) * 2**-power - offset
    compensated: list[str]  # the final norm's scale and bias, multiplied back (tied output head)
    norm_offset: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve(root: nn.Module, path: str, what: str) -> list[tuple[str, torch.Tensor]]:
    """A path to a tensor, or to a module whose weight and bias (where present) are meant."""
    try:
        target = get(root, path)
    except AttributeError:
        raise RescaleError(f"the adapter names {what} {path!r}, which this model does not have") from None
    if isinstance(target, torch.Tensor):
        return [(path, target)]
    return [(f"{path}.{n}", t) for n in ("weight", "bias") if isinstance(t := getattr(target, n, None), torch.Tensor)]


def _tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return head is not None and embed is not None and head.weight is embed.weight


def _check_scale_invariant(norm: nn.Module, name: str, power: int, d: int, dtype: torch.dtype) -> None:
    """The input's scale must not matter to a norm that reads the stream: checked on a random input."""
    g = torch.Generator().manual_seed(0)
    # |x| ~ 16 after the division: large enough that eps plays no part (its effect is measured elsewhere)
    x = (torch.randn(2, 3, d, generator=g) * 2.0 ** (power + 4)).to(dtype)
    with torch.inference_mode():
        a, b = norm(x), norm(x * 2.0 ** -power)
    if not torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3):
        raise RescaleError(
            f"{name} ({type(norm).__name__}) reads the residual stream but its output depends on the scale of its "
            f"input (largest change {float((a - b).abs().max()):.3g} for x / 2^{power}): dividing the stream would "
            "change the function, so the rescale is refused")


def check_rescalable(adapter) -> None:
    """What the adapter table alone shows (so the command line refuses before any weight loads): the family's
    residual stream must be read through norms only, and the table must name everything that writes into it."""
    if adapter.post_norm:
        raise RescaleError(f"{adapter.family} normalizes after the residual addition (post-norm): attention and FFN "
                           "read the stream directly, not through a norm whose output ignores its input's scale, so "
                           "dividing the stream would change the function; the rescale is refused")
    if adapter.embeddings is None or adapter.writers is None or adapter.readers is None:
        raise RescaleError(f"the adapter table does not say what writes into the {adapter.family} residual stream "
                           "(Adapter.embeddings, writers, readers in cardhouse/models/adapters.py): refusing a "
                           "rescale that could change the function")


def plan_rescale(lm: LoadedModel, power: int) -> RescalePlan:
    """What ``rescaled(lm, power)`` would change, after checking it preserves the function (raises
    ``RescaleError`` with the reason otherwise)."""
    return _plan(lm, power)[0]


def _plan(lm: LoadedModel, power: int):
    if not isinstance(power, int) or power < 0:
        raise ValueError(f"power must be a non-negative integer (the stream is divided by 2^power), got {power!r}")
    model, blocks = lm.model, lm.blocks
    adapter = blocks.adapter
    check_rescalable(adapter)
    tensors = [t for path in adapter.embeddings for t in _resolve(model, path, "the embedding")]
    norms = []
    width = (model.config.hidden_size, next(model.parameters()).dtype)
    for layer, block in enumerate(blocks.layers):
        for path in adapter.readers:
            _check_scale_invariant(get(block, path), f"layer {layer} {path}", power, *width)
        writers = blocks.ffn(layer).writers  # a mixed MoE model's dense layers have their own FFN layout
        tensors += [(f"{adapter.layers}.{layer}.{n}", t) for path in writers
                    for n, t in _resolve(block, path, "the residual writer")]
        for path in adapter.writer_norms:
            norm = get(block, path)
            _check_scale_invariant(norm, f"layer {layer} {path}", power, *width)  # its input: the branch output
            norms += [(f"{adapter.layers}.{layer}.{n}", t, n.endswith("weight"))
                      for n, t in _resolve(block, path, "the residual-writing norm")]
    compensated = []
    notes = []
    if _tied(model):
        final = _resolve(model, adapter.final_norm, "the final norm")
        if not any(n.endswith("weight") for n, _ in final):
            raise RescaleError(f"the output head shares the embedding matrix and the final norm "
                               f"{adapter.final_norm} has no scale to compensate with: the logits would shrink")
        compensated = final
        notes.append("the output head shares the embedding matrix: the final norm's scale (and bias) is "
                     f"multiplied by 2^{power} so that the logits are unchanged")
    return RescalePlan(power, [n for n, _ in tensors], [n for n, _, _ in norms], [n for n, _ in compensated],
                       adapter.norm_offset, notes), tensors, norms, compensated


def _scale_all(factor: float):
    return lambda t: t.mul_(factor)  # a power of two: exact, and in place (no copy of a 170M-entry embedding)


def _scale_norm(factor: float, offset: float):
    return lambda w: w.copy_((w.double() + offset) * factor - offset)


@contextmanager
def edit_in_place(edits: list[tuple[torch.Tensor, object]]) -> Iterator[None]:
    """Apply ``fn(tensor)`` (in place) to each tensor, restoring the original bits on exit, also on error.

    ``overwrite_slices``' discipline (save exactly what is overwritten, write it back in ``finally``)
    without its temporary second copy of each new value: the tensors here are whole embeddings.
    """
    saved = []
    try:
        with torch.no_grad():
            for tensor, fn in edits:
                saved.append((tensor, tensor.clone()))
                fn(tensor)
        yield
    finally:
        with torch.no_grad():
            for tensor, original in reversed(saved):
                tensor.copy_(original)


@contextmanager
def rescaled(lm: LoadedModel, power: int) -> Iterator[RescalePlan]:
    """Divide the residual stream by 2^power, preserving the function; weights restored bit-identically on exit."""
    plan, tensors, norms, compensated = _plan(lm, power)
    down, up = 2.0 ** -power, 2.0 ** power
    edits, seen = [], set()
    offset = plan.norm_offset

    def add(t, fn):
        if id(t) not in seen and power:  # tied tensors are edited once
            seen.add(id(t))
            edits.append((t, fn))

    for _, t in tensors:
        add(t, _scale_all(down))
    for _, t, is_weight in norms:
        add(t, _scale_norm(down, offset) if is_weight else _scale_all(down))
    for name, t in compensated:
        add(t, _scale_norm(up, offset) if name.endswith("weight") else _scale_all(up))
    with edit_in_place(edits):
        yield plan


def choose_power(room: Headroom, points: tuple[str, ...] = STREAM_POINTS, *, fmt: str = "float16",
                 margin: float = 2.0) -> tuple[int, list[str]]:
    """The smallest power p such that the max |a| / 2^p of every point the rescale divides (``points``:
    ``scaled_points(lm)``) keeps ``margin`` doublings below the format's largest value; and the points
    it does not divide that still do not fit."""
    limit = FORMATS[fmt] * 2.0 ** -margin
    biggest = room.max_at(points)
    power = max(0, math.ceil(math.log2(biggest / limit))) if biggest > 0 else 0
    unfixed = [f"blocks.{p.layer}.{p.point} ({p.max_abs:,.0f})" for p in room.points
               if p.point not in points and p.max_abs > limit]
    return power, unfixed


def _logits(model: nn.Module, token_lists, batch_size: int) -> list[torch.Tensor]:
    out = []
    with torch.inference_mode():
        for batch in batches(token_lists, batch_size):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            out.append(logits[batch.attention_mask.bool()].float())  # real tokens only
    return out


def logits_change(lm: LoadedModel, power: int, token_lists, *, batch_size: int = 8) -> dict:
    """Largest |logit difference| between the model and its rescaled self (both in the loaded dtype) on the
    real tokens of ``token_lists``: what the norms' eps changes (plus float rounding)."""
    before = _logits(lm.model, token_lists, batch_size)
    with rescaled(lm, power):
        after = _logits(lm.model, token_lists, batch_size)
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after))
    scale = max(float(a.abs().max()) for a in before)
    same_top1 = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(before, after))
    tokens = sum(a.shape[0] for a in before)
    return {"power": power, "max_abs_logit_diff": diff, "max_abs_logit": scale, "relative": diff / scale,
            "same_top1": same_top1 / tokens, "tokens": tokens}
