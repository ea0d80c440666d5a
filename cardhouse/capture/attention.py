"""Attention hook points: each layer's queries, keys, values, logits and probabilities, TransformerLens style.

``blocks.{l}.attn.hook_q``        queries, after any q norm and rotary embedding  [batch, head, pos, d_head]
``blocks.{l}.attn.hook_k``        keys, after any k norm and rotary embedding     [batch, kv_head, pos, d_head]
``blocks.{l}.attn.hook_v``        values                                          [batch, kv_head, pos, d_head_v]
``blocks.{l}.attn.hook_scores``   pre-softmax logits: scaled, soft-capped, masked [batch, head, query, key]
``blocks.{l}.attn.hook_pattern``  post-softmax probabilities (rows sum to 1)      [batch, head, query, key]

Keys and values are reported as the model hands them to attention: grouped-query models give
``kv_head`` = key/value heads, not repeated (query head h reads kv head h // (heads / kv_heads),
``Blocks.heads``); multi-head latent attention (DeepSeek) gives its decompressed per-head keys and
values (``kv_head`` = heads, ``d_head_v`` may differ from ``d_head``). Masked logits hold the mask's
large negative value (``torch.finfo(dtype).min`` added), as in the model's own eager attention. A
hook function may return a tensor to replace the one it got: a new q, k or v is attended with,
new scores are softmaxed, a new pattern weights the values.

How, and why this route. transformers (5.x) sends every attention of the adapted families through
one function looked up by name in its public ``AttentionInterface`` (``ALL_ATTENTION_FUNCTIONS``),
called with the q, k and v the module computed (after its projections, fused or not, its q/k
norms and its rotary embeddings), the model's own mask (causal, padding, sliding window) and its
``scaling`` and ``softcap``. cardhouse registers one such function, ``"cardhouse"``: eager
attention computed from those arguments, with the hook points between its steps, and masks
built for it as for eager (``AttentionMaskInterface``). ``attention_hooks`` switches the model
to it (``set_attn_implementation``) for its duration and restores the model's own after, also
on error. So no module forward is replaced and nothing global is patched, and every detail the
model computes before attention or passes to it comes from the model itself; the adapter table
holds the one remaining difference, whether the softmax runs in float32 (``Adapter.softmax_fp32``).
The routes not taken: reading the softmax input through a ``TorchFunctionMode`` (the old code)
relies on one softmax call per module; forward hooks on the q/k/v projections see states before
q/k norms and rotary and miss fused projections; recomputing scores from hooked q/k outside the
attention call lacks the mask, which only the interface receives. Cost: while hooked, the model
runs eager attention (one layer's [batch, head, query, key] probabilities at a time), as the
analyses always did. ``tests/test_attention_hooks.py`` checks the pattern and output against the
model's own eager attention (``output_attentions=True``) for every family in the adapter table.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..models.adapters import Blocks, UnsupportedModelError

HookFn = Callable[[str, torch.Tensor], torch.Tensor | None]

IMPLEMENTATION = "cardhouse"  # the name of the hooked attention in transformers' AttentionInterface
EAGER = "eager"  # what the hook points compute: the only kind of attention that materializes probabilities
POINTS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_scores", "attn.hook_pattern")

# attention module (any module inside a layer's `attn` part that calls the interface) ->
# (softmax in float32, [(point, name, fn)]); filled only inside `attention_hooks`, which removes
# what it added, also on error
_ACTIVE: dict[nn.Module, tuple[bool, list[tuple[str, str, HookFn]]]] = {}


def _fire(fns, point: str, tensor: torch.Tensor) -> torch.Tensor:
    for at, name, fn in fns:
        if at == point:
            new = fn(name, tensor)
            tensor = tensor if new is None else new
    return tensor


def _repeat_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[batch, kv_head, pos, d] -> [batch, head, pos, d]: query head h reads kv head h // group."""
    group = n_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def hooked_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with hook points; the operations and their order are the models' own eager ones."""
    if kwargs.get("s_aux") is not None:  # learned sink logits (gpt-oss): a family not in the adapter table
        raise UnsupportedModelError("attention with learned sinks (s_aux) is not supported by the attention hook points")
    fp32, fns = _ACTIVE.get(module, (True, []))
    query, key, value = (_fire(fns, p, x) for p, x in (("attn.hook_q", query), ("attn.hook_k", key),
                                                        ("attn.hook_v", value)))
    n_heads = query.shape[1]
    key, value = _repeat_heads(key, n_heads), _repeat_heads(value, n_heads)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap is not None:  # Gemma-2: tanh soft-capping of the logits, before the mask
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    scores = _fire(fns, "attn.hook_scores", scores)
    # upcast where the family's eager attention does (adapter table): bit-identical probabilities
    pattern = (torch.softmax(scores, -1, dtype=torch.float32) if fp32 else torch.softmax(scores, -1)).to(query.dtype)
    del scores  # as eager attention does: one [batch, head, query, key] tensor alive while the values are read
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    pattern = _fire(fns, "attn.hook_pattern", pattern)
    return torch.matmul(pattern, value).transpose(1, 2).contiguous(), pattern


def _register() -> None:
    """Register ``hooked_attention`` with transformers on first use, not at import: importing
    ``transformers.modeling_utils`` costs seconds, and ``import cardhouse.cli`` should not pay them."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, hooked_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # additive float masks, as eager attention gets


@contextmanager
def hooked_implementation(model: nn.Module) -> Iterator[str]:
    """Run ``model``'s attention through ``hooked_attention`` for the block; its own implementation
    is restored after, also on error. Yields the implementation it replaced."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before == IMPLEMENTATION:  # nested: the outer context restores
        yield before
        return
    if not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(f"attention hook points need a transformers model whose attention goes through "
                                    f"its AttentionInterface; {type(model).__name__} is not one")
    _register()
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        if model.config._attn_implementation != IMPLEMENTATION:  # transformers only warns for legacy models
            raise UnsupportedModelError(f"{type(model).__name__} cannot switch its attention implementation, so "
                                        "cardhouse cannot hook its attention (attn.hook_*)")
        yield before
    finally:
        model.set_attn_implementation(before)


@contextmanager
def attention_hooks(model: nn.Module, fns: Iterable[tuple[int, str, str, HookFn]]) -> Iterator[None]:
    """Attach ``(layer, point, name, fn)`` at the attention hook points for the block; always removed after.

    Every layer's attention runs through ``hooked_attention`` meanwhile, hooked or not."""
    blocks = Blocks.of(model)
    created, added = [], []
    try:
        for layer in range(len(blocks)):
            for module in blocks.part(layer, "attn").modules():  # the one that calls the interface is among them
                if module not in _ACTIVE:
                    _ACTIVE[module] = (blocks.adapter.softmax_fp32, [])
                    created.append(module)
        for layer, point, name, fn in fns:
            for module in blocks.part(layer, "attn").modules():
                _ACTIVE[module][1].append((point, name, fn))
                added.append((module, (point, name, fn)))
        with hooked_implementation(model):
            yield
    finally:
        for module, item in added:
            _ACTIVE[module][1].remove(item)
        for module in created:
            del _ACTIVE[module]


def check_implementation(implementation: str) -> None:
    """Analyses that read probabilities take an ``implementation`` (the CLI's ``--attn-implementation``):
    only eager attention has them, and it is what the hook points compute, whatever the model runs."""
    if implementation == EAGER:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {implementation!r} returns no attention probabilities; use "
                         f"{EAGER!r} (the default), which the attention hook points compute")
    raise ValueError(f"cannot switch to attention implementation {implementation!r}: transformers' "
                     f"AttentionInterface has no such implementation")


def switch_note(model: nn.Module) -> list[str]:
    """What an analysis reading the attention hook points should report about the switch (nothing if the
    model runs eager attention anyway)."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if before in (EAGER, IMPLEMENTATION):
        return []
    return [f"attention read at the attn.hook_* points, which compute {EAGER!r} attention (the only kind that "
            f"returns probabilities) instead of the model's {before!r} for this analysis; restored after"]
