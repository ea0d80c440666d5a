"""Simulated (fake) quantization with round-to-nearest, and what protecting the massive parts buys.

Symmetric RTN: ``q = clamp(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1) * s`` with ``s = max|x| / (2^(b-1) - 1)``
over each group:

- weights: per output channel (a row of ``nn.Linear``, a column of GPT-2's ``Conv1D``) or per group of
  ``group`` consecutive input entries of a channel; every linear layer of the blocks (3-D expert tensors
  too), not the embeddings or the output head;
- activations: the input of every linear layer of the blocks and the keys and values (the outputs of
  ``k_proj`` and ``v_proj``, before RoPE: a stand-in for a quantized KV cache), per tensor (one scale
  per sequence, so the batch does not matter) or per token.

A protected entry keeps its full-precision value and takes no part in its group's scale (Yu et al.'s
"hold out the super weight"): the massive-weight rows, the super weight, the keys and values of the
BOS (carrier) token (IntactKV), the massive channels of the activations. Each protection has a random
control of the same size.
"""

from __future__ import annotations

import random
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch import nn

from ..analysis import Criterion, find_massive_weights
from ..capture.batches import batches
from ..models.loading import LoadedModel
from ..models.spec import ModelSpec
from .rescale import edit_in_place

ACT_GRANULARITIES = ("tensor", "token")
PROTECTIONS = ("none", "massive-rows", "random-rows", "super-weight", "random-weight", "bos-kv", "random-kv",
               "massive-dims", "random-dims")
WEIGHT_PROTECTIONS = ("massive-rows", "random-rows", "super-weight", "random-weight")
ACT_PROTECTIONS = ("bos-kv", "random-kv", "massive-dims", "random-dims")
# an input channel of a linear layer is massive when its largest |a| over the calibration tokens is above 20x the
# median channel's: ratio only, as a linear layer's inputs mostly come out of a norm (no absolute floor fits them all)
CHANNEL_CRITERION = Criterion.relative(20.0)


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bit width must be an integer in 2..8, got {bits!r}")
    return bits


def _qmax(bits: int) -> int:
    return 2 ** (check_bits(bits) - 1) - 1


def fake_quantize(x: torch.Tensor, bits: int, *, group: int | None = None, keep: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """RTN along the last axis: one scale per row (``group`` None) or per ``group`` consecutive entries.
    ``keep`` (bool, like ``x``): entries left as they are and left out of their group's scale."""
    qmax = _qmax(bits)
    width = x.shape[-1]
    group = group or width
    if width % group:
        raise ValueError(f"group size {group} does not divide the width {width}")
    xg = x.reshape(*x.shape[:-1], width // group, group)
    kept = keep.reshape(xg.shape) if keep is not None else None
    mag = xg.abs() if kept is None else xg.abs().masked_fill(kept, 0)
    scale = mag.amax(-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (xg / scale).round().clamp(-qmax, qmax) * scale
    if kept is not None:
        q = torch.where(kept, xg, q)
    return q.reshape(x.shape)


def quantize_weight(w: torch.Tensor, bits: int, *, in_axis: int = -1, group: int | None = None,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per output channel (or per group along the input axis ``in_axis``) fake quantization of a weight."""
    moved = w.movedim(in_axis, -1)
    k = keep.movedim(in_axis, -1) if keep is not None else None
    return fake_quantize(moved, bits, group=group, keep=k).movedim(-1, in_axis)


def quantize_activation(x: torch.Tensor, bits: int, granularity: str, *, keep_positions: torch.Tensor | None = None,
                        keep_channels: torch.Tensor | None = None) -> torch.Tensor:
    """``x [batch, pos, d]``: one scale per sequence ("tensor") or per token; kept positions/channels
    (bool ``[pos]`` / ``[d]``) stay exact and take no part in the scale."""
    if granularity not in ACT_GRANULARITIES:
        raise ValueError(f"unknown activation granularity {granularity!r}; known: {', '.join(ACT_GRANULARITIES)}")
    keep = None
    if keep_positions is not None or keep_channels is not None:
        keep = torch.zeros(x.shape[-2:], dtype=torch.bool, device=x.device)
        if keep_positions is not None:
            keep |= keep_positions[: x.shape[-2], None]
        if keep_channels is not None:
            keep |= keep_channels[None, :]
        keep = keep.expand_as(x)
    if granularity == "token":
        return fake_quantize(x, bits, keep=keep)
    flat = x.reshape(x.shape[0], -1)  # one row per sequence
    return fake_quantize(flat, bits, keep=keep.reshape(flat.shape) if keep is not None else None).reshape(x.shape)


# ---- which tensors -------------------------------------------------------------------------------------------------


@dataclass
class Linear:
    name: str
    module: nn.Module | None  # None for a 3-D expert tensor (no module boundary: no activation hook)
    weight: torch.Tensor
    in_axis: int


def linear_layers(lm: LoadedModel | ModelSpec) -> list[Linear]:
    """Every linear map inside the blocks: ``nn.Linear`` (in: last axis), GPT-2 ``Conv1D`` (in: first axis),
    and 3-D expert tensors ``[expert, out, in]``."""
    found = []
    for name, module in lm.blocks.layers.named_modules():
        if isinstance(module, nn.Linear):
            found.append(Linear(name, module, module.weight, -1))
        elif type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight [in, out]
            found.append(Linear(name, module, module.weight, 0))
        else:
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() == 3:
                    found.append(Linear(f"{name}.{pname}", None, p, -1))
    return found


def _owner(linears: list[Linear], view: torch.Tensor) -> Linear:
    ptr = view.untyped_storage().data_ptr()
    for lin in linears:
        if lin.weight.untyped_storage().data_ptr() == ptr:
            return lin
    raise ValueError("the tensor to protect is not one of the quantized weights")


def _mask_of(mask: torch.Tensor, param: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """The view of ``mask`` (shaped like ``param``) that ``view`` is of ``param``."""
    return mask.as_strided(view.size(), view.stride(), view.storage_offset() - param.storage_offset())


@dataclass(frozen=True)
class Scheme:
    weight_bits: int | None = None
    group: int | None = None  # None: per channel
    act_bits: int | None = None
    act_granularity: str = "token"
    protect: str = "none"

    def __post_init__(self):
        if self.weight_bits is None and self.act_bits is None:
            raise ValueError("a scheme quantizes weights, activations or both")
        for bits in (self.weight_bits, self.act_bits):
            if bits is not None:
                check_bits(bits)
        if self.group is not None and (self.weight_bits is None or self.group < 1):
            raise ValueError(f"group size {self.group} needs weight bits and must be >= 1")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"unknown activation granularity {self.act_granularity!r}; known: "
                             f"{', '.join(ACT_GRANULARITIES)}")
        if self.protect not in PROTECTIONS:
            raise ValueError(f"unknown protection {self.protect!r}; known: {', '.join(PROTECTIONS)}")
        if self.protect in WEIGHT_PROTECTIONS and self.weight_bits is None:
            raise ValueError(f"{self.protect} protects weights: the scheme quantizes none")
        if self.protect in ACT_PROTECTIONS and self.act_bits is None:
            raise ValueError(f"{self.protect} protects activations: the scheme quantizes none")

    @property
    def name(self) -> str:
        parts = []
        if self.weight_bits:
            parts.append(f"W{self.weight_bits} " + (f"g{self.group}" if self.group else "per-channel"))
        if self.act_bits:
            parts.append(f"A{self.act_bits} per-{self.act_granularity}")
        return " ".join(parts) + ("" if self.protect == "none" else f" +{self.protect}")

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


def check_scheme(lm: LoadedModel | ModelSpec, scheme: Scheme) -> None:
    """A group size that does not divide the input width of every quantized linear map; on a loaded model or on
    a ``ModelSpec`` (its meta model has the shapes), so the command line refuses it before any weight loads."""
    if scheme.group:
        for lin in linear_layers(lm):
            width = lin.weight.shape[lin.in_axis]
            if width % scheme.group:
                raise ValueError(f"group size {scheme.group} does not divide the input width {width} of {lin.name}")


@dataclass
class Targets:
    """What the protections protect, found once per model (``find_targets``)."""

    layer: int  # the massive-weight layer
    rows: list[int]  # its massive-weight rows (W_up/W_gate)
    super_weight: tuple[int, int]  # (row, column) of its W_down
    massive_channels: dict[str, list[int]]  # linear module name -> massive input channels
    bos_position: int = 0
    seed: int = 0
    channel_criterion: dict | None = None  # what made a channel massive (``Criterion.to_dict``); None: none searched

    def to_dict(self) -> dict:
        return asdict(self)


def channel_maxima(lm: LoadedModel, token_lists, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per linear module of the blocks, the running max |a| of each input channel over ``token_lists``."""
    maxima: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name):
        def hook(module, args):
            x = args[0].detach().abs().flatten(0, -2).amax(0).float()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return hook

    for lin in linear_layers(lm):
        if lin.module is not None:
            handles.append(lin.module.register_forward_pre_hook(keep(lin.name)))
    try:
        with torch.inference_mode():
            for batch in batches(token_lists, batch_size):
                lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return maxima


def find_targets(lm: LoadedModel, token_lists=None, *, k: int = 2, seed: int = 0,
                 criterion: Criterion = Criterion(), channel_criterion: Criterion = CHANNEL_CRITERION) -> Targets:
    """The massive-weight rows and super weight (``find_massive_weights`` by ``criterion``) and the massive input
    channels of every linear layer over ``token_lists`` (a channel's max |a| against the median channel's, by
    ``channel_criterion``; None: no channels, the weight protections need none)."""
    mw = find_massive_weights(lm, k=k, criterion=criterion)
    maxima = channel_maxima(lm, token_lists) if token_lists is not None else {}
    channels = {}
    for name, m in maxima.items():
        hits = (m > channel_criterion.threshold(m.median().item())).nonzero().flatten().tolist()
        if hits:
            channels[name] = hits
    sw = mw.super_weight
    return Targets(mw.layer, list(mw.indices[:k]), (sw["row"], sw["column"]), channels, seed=seed,
                   channel_criterion=channel_criterion.to_dict() if token_lists is not None else None)


def _random_like(pool_size: int, chosen: list[int], seed: int) -> list[int]:
    pool = sorted(set(range(pool_size)) - set(chosen))
    return sorted(random.Random(seed).sample(pool, len(chosen)))


def weight_keep_masks(lm: LoadedModel, scheme: Scheme, targets: Targets, linears: list[Linear]
                      ) -> dict[int, torch.Tensor]:
    """id(weight) -> bool mask of the entries ``scheme.protect`` keeps in full precision."""
    if scheme.protect not in WEIGHT_PROTECTIONS:
        return {}
    blocks = lm.blocks
    if blocks.is_moe:
        raise ValueError("weight protections address a dense FFN's rows; this is a Mixture-of-Experts model")
    masks: dict[int, torch.Tensor] = {}

    def mark(view: torch.Tensor, index: tuple) -> None:
        lin = _owner(linears, view)
        mask = masks.setdefault(id(lin.weight), torch.zeros_like(lin.weight, dtype=torch.bool))
        _mask_of(mask, lin.weight, view)[index] = True

    layer = targets.layer
    if scheme.protect in ("massive-rows", "random-rows"):
        n = blocks.intermediate_size(layer)
        rows = targets.rows if scheme.protect == "massive-rows" else _random_like(n, targets.rows, targets.seed)
        for tensor, axis, offset in blocks.neuron_slices(layer):
            if tensor.dim() == 2:  # the weights (biases are not quantized)
                for i in rows:
                    mark(tensor.select(axis, offset + i), (slice(None),))
    else:
        down = blocks.down_weight(layer)  # [d_model, d_intermediate] view
        row, col = targets.super_weight
        if scheme.protect == "random-weight":  # one other entry of the same row of W_down
            col = _random_like(down.shape[1], [col], targets.seed)[0]
        mark(down, (row, col))
    return masks


@contextmanager
def quantized_weights(lm: LoadedModel, scheme: Scheme, targets: Targets | None = None) -> Iterator[int]:
    """Replace every block weight by its fake-quantized value (protected entries kept); restored bit-identically
    on exit. Yields the number of entries kept in full precision."""
    linears = linear_layers(lm)
    masks = weight_keep_masks(lm, scheme, targets, linears) if targets is not None else {}

    def quantize(lin):
        return lambda w: w.copy_(quantize_weight(w, scheme.weight_bits, in_axis=lin.in_axis, group=scheme.group,
                                                 keep=masks.get(id(w))))

    with edit_in_place([(lin.weight, quantize(lin)) for lin in linears]):
        yield int(sum(int(m.sum()) for m in masks.values()))


@contextmanager
def quantized_activations(lm: LoadedModel, scheme: Scheme, targets: Targets | None = None) -> Iterator[dict]:
    """Fake-quantize the input of every linear module of the blocks and the keys/values (outputs of k_proj
    and v_proj where the adapter names them), protections applied; hooks removed on exit."""
    blocks, bits, gran = lm.blocks, scheme.act_bits, scheme.act_granularity
    linears = [lin for lin in linear_layers(lm) if lin.module is not None]
    kv = set()
    if blocks.adapter.k_proj and blocks.adapter.v_proj:
        kv = {id(blocks.attn_part(layer, name)) for layer in range(len(blocks)) for name in ("k_proj", "v_proj")}
    info = {"inputs": len(linears), "kv_modules": len(kv), "protected_channels": 0}
    channels: dict[str, torch.Tensor] = {}
    if scheme.protect in ("massive-dims", "random-dims") and targets is not None:
        for lin in linears:
            chosen = targets.massive_channels.get(lin.name, [])
            if not chosen:
                continue
            width = lin.weight.shape[lin.in_axis]
            if scheme.protect == "random-dims":
                chosen = _random_like(width, chosen, targets.seed)
            mask = torch.zeros(width, dtype=torch.bool)
            mask[chosen] = True
            channels[lin.name] = mask
            info["protected_channels"] += len(chosen)
    kv_position = None
    if scheme.protect in ("bos-kv", "random-kv") and targets is not None:
        kv_position = targets.bos_position if scheme.protect == "bos-kv" else None
        info["kv_position"] = kv_position if kv_position is not None else f"random (seed {targets.seed})"

    def positions(n: int) -> torch.Tensor | None:
        if scheme.protect not in ("bos-kv", "random-kv"):
            return None
        mask = torch.zeros(n, dtype=torch.bool)
        if kv_position is None and n < 2:  # a one-token input has no position besides BOS to pick
            return mask
        pos = kv_position if kv_position is not None else random.Random(targets.seed).randrange(1, n)
        mask[pos] = True
        return mask

    def on_input(name):
        def hook(module, args):
            return (quantize_activation(args[0], bits, gran, keep_channels=channels.get(name)), *args[1:])
        return hook

    def on_kv(module, args, output):
        return quantize_activation(output, bits, gran, keep_positions=positions(output.shape[-2]))

    with ExitStack() as stack:
        for lin in linears:
            handle = lin.module.register_forward_pre_hook(on_input(lin.name))
            stack.callback(handle.remove)
            if id(lin.module) in kv:
                handle = lin.module.register_forward_hook(on_kv)
                stack.callback(handle.remove)
        yield info


@contextmanager
def quantized(lm: LoadedModel, scheme: Scheme, targets: Targets | None = None) -> Iterator[dict]:
    """Weights and/or activations fake-quantized per ``scheme``; everything restored on exit."""
    if scheme.protect != "none" and targets is None:
        raise ValueError(f"protection {scheme.protect!r} needs the targets (find_targets)")
    with ExitStack() as stack:
        info = {"scheme": scheme.name}
        if scheme.weight_bits:
            info["weights_kept"] = stack.enter_context(quantized_weights(lm, scheme, targets))
        if scheme.act_bits:
            info.update(stack.enter_context(quantized_activations(lm, scheme, targets)))
        yield info
