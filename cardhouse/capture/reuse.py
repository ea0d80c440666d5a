"""Reuse what an edit does not change: the residual stream entering the first edited layer.

A weight attack on layer l (or an activation intervention from layer l on) leaves the
embeddings and layers 0..l-1 untouched, so their output for a given input is the same for
every variant of a sweep. Inside ``reuse_prefix(lm, l)`` the first forward pass on an input
records the hidden states entering layer l; every later pass on the same input skips layers
0..l-1 (they pass their input through) and starts layer l from the recorded states.

Inputs are recognised by their token ids and attention mask, so any caller works
(our perplexity, lm-eval's batches). Stored states are capped by ``max_bytes``; past the cap
new inputs simply run in full. Hooks on layers before l do not fire on reused inputs (those
blocks do not run), so capture outside this context. The embeddings and the skipped layers are hashed
on entry and exit: editing them inside the context is an error, not a silent wrong number.

Skipping is ``models.skipping.skip_blocks`` (the skipped blocks' entries of the decoder list are a
pass-through for that one forward pass) and starting layer l from the recorded states is a forward
pre-hook on it (``models.skipping.with_hidden``): no method of the model or of a cache is replaced.

With a key/value cache (``transformers`` ``DynamicCache``, passed in or made by the model) the
skipped layers also owe the cache their keys and values. A recorded pass reads, through the cache's
public layers (``cache.layers[j].keys/values``) when layer l starts, what each skipped layer
appended in this pass; a reused pass writes the same through ``cache.update``, so the cache ends as
after a full pass. Where that cannot be read back exactly (a sliding window dropped keys, another
cache layer type) the input is not stored and runs in full. Such a pass depends on what the cache
held before, so the key also covers the skipped layers' cached keys and values: the lm-eval
backend's suffix passes, run against a cached prefix, are recognised across the variants of a sweep
like any other input. A caller that knows what its cache holds names it (``cache_label``: the lm-eval
backend gives the tokens of each row's prefix) and the cached tensors are not hashed.

A streamed model (``load_model(..., stream=True)``) has no weights in memory to skip: its
``Streamer.share_prefix`` keeps the states entering the layer for each set of windows instead.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import Hashable, Iterator

import torch

from ..models.digest import weights_digest
from ..models.loading import LoadedModel
from ..models.skipping import skip_blocks, with_hidden
from ..models.streaming import streamer_of


def _find_cache(args: tuple, kwargs: dict):
    from transformers import Cache

    return next((v for v in [*kwargs.values(), *args] if isinstance(v, Cache)), None)


def _replayable(cache) -> bool:
    from transformers import DynamicCache

    return cache is None or isinstance(cache, DynamicCache)  # its layers only append (or slide)


def _appending_layer(cache_layer) -> bool:
    """A cache layer whose ``update`` appends its keys and values (a sliding one crops afterwards)."""
    from transformers import cache_utils

    kinds = [getattr(cache_utils, name, None) for name in ("DynamicLayer", "DynamicSlidingWindowLayer")]
    return type(cache_layer) in kinds


def _cached_states(cache, layer: int) -> list[torch.Tensor]:
    states = []
    for cache_layer in cache.layers[:layer]:
        if getattr(cache_layer, "is_initialized", False) and cache_layer.keys is not None:
            states += [cache_layer.keys, cache_layer.values]
    return states


def _lengths(cache, layer: int) -> list[int]:
    """How many positions each of the first ``layer`` cache layers holds (0 where it holds none)."""
    layers = list(cache.layers[:layer]) if cache is not None else []
    lengths = [cl.keys.shape[-2] if getattr(cl, "is_initialized", False) and cl.keys is not None else 0
               for cl in layers]
    return lengths + [0] * (layer - len(lengths))


_CACHE_LABEL: ContextVar[Hashable | None] = ContextVar("cardhouse_cache_label", default=None)


@contextmanager
def cache_label(label: Hashable) -> Iterator[None]:
    """Name what the key/value cache given to the forward passes in this context holds: ``label`` (its
    ``repr``) must determine the inputs the cache's keys and values were computed from by this model,
    e.g. the tokens of each row's prefix and the padded width. ``reuse_prefix`` then keys such a pass by
    the label instead of hashing the skipped layers' cached tensors (the lm-eval backend's suffix passes:
    ~10% of a sweep's time went to that hashing). What the skipped layers cached depends on nothing
    else while their weights are unchanged, which ``reuse_prefix`` checks."""
    token = _CACHE_LABEL.set(label)
    try:
        yield
    finally:
        _CACHE_LABEL.reset(token)


def _input_key(args: tuple, kwargs: dict, layer: int, uses_cache: bool) -> bytes | None:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache = _find_cache(args, kwargs)
    if not isinstance(input_ids, torch.Tensor) or not _replayable(cache):
        return None  # inputs_embeds, other entry points and other caches run in full
    h = hashlib.blake2b(digest_size=16)
    h.update(b"cache" if uses_cache else b"no cache")
    tensors = [input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids")]
    if cache is not None:  # a sliding layer's position counts the keys it dropped
        h.update(str([cache_layer.get_seq_length() for cache_layer in cache.layers[:layer]]).encode())
        label = _CACHE_LABEL.get()
        if label is not None:
            h.update(b"label" + repr(label).encode())
        else:
            tensors += _cached_states(cache, layer)
    for t in tensors:
        if isinstance(t, torch.Tensor):
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())  # the buffer, no bytes copy
    return h.digest()


def _written(cache, layer: int, before: list[int], length: int) -> list | None:
    """[(keys, values)] each of the first ``layer`` cache layers appended in this pass of ``length``
    positions, read from the cache; None where a layer holds other than ``before + length`` positions
    (a sliding window dropped some, or another kind of layer): such a pass cannot be replayed."""
    cache_layers = list(cache.layers[:layer])
    if len(cache_layers) < layer or not all(_appending_layer(cl) for cl in cache_layers):
        return None
    if _lengths(cache, layer) != [n + length for n in before]:
        return None
    return [(cl.keys[..., n:, :].detach().clone(), cl.values[..., n:, :].detach().clone())
            for cl, n in zip(cache_layers, before)]


class PrefixCache:
    """Hidden states entering one layer, by input; ``hits`` and ``misses`` count the forward passes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        # input -> (hidden states entering the layer, [(keys, values)] the skipped layers appended to the cache)
        self.states: dict[bytes, tuple[torch.Tensor, list]] = {}
        self.nbytes = 0
        self.hits = self.misses = 0
        self.key: bytes | None = None  # the input of the forward pass in progress
        self.length = 0  # its positions
        self.before: list[int] = []  # the positions each skipped layer's cache held before it
        self.tuple_output = False  # older transformers layers return (hidden_states, ...)

    def reusable(self) -> bool:
        return self.key is not None and self.key in self.states

    def store(self, hidden: torch.Tensor, writes: list) -> None:
        size = sum(t.numel() * t.element_size() for t in [hidden] + [t for kv in writes for t in kv])
        if self.key is not None and self.nbytes + size <= self.max_bytes:
            self.states[self.key] = (hidden.detach().clone(), writes)
            self.nbytes += size


def _prefix_tensors(lm: LoadedModel, layer: int) -> list[torch.Tensor]:
    tensors = [p for block in lm.blocks.layers[:layer] for p in block.parameters()]
    return tensors + list(lm.model.get_input_embeddings().parameters())


@contextmanager
def reuse_prefix(lm: LoadedModel, layer: int, *, max_bytes: int = 2 * 2**30) -> Iterator[PrefixCache]:
    """Skip layers ``0..layer-1`` on inputs already seen in this context (see the module docstring)."""
    lm.blocks.check_layer(layer)
    streamer = streamer_of(lm.model)
    if streamer is not None:
        with streamer.share_prefix(layer) as shared:
            yield shared
        return
    cache = PrefixCache(max_bytes)
    if layer == 0:  # nothing before the first layer is worth keeping
        yield cache
        return
    prefix = _prefix_tensors(lm, layer)
    before = weights_digest(prefix)
    layers = lm.blocks.layers
    skipping = ExitStack()  # the pass-through of layers 0..layer-1, for one reused forward pass

    def on_model(module, args, kwargs):
        use_cache = kwargs.get("use_cache")
        kv = _find_cache(args, kwargs)
        uses_cache = kv is not None or bool(
            use_cache if use_cache is not None else getattr(module.config, "use_cache", False))
        cache.key = _input_key(args, kwargs, layer, uses_cache)
        if cache.key is not None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            cache.length, cache.before = input_ids.shape[-1], _lengths(kv, layer)
        if cache.reusable():
            cache.hits += 1
            skipping.enter_context(skip_blocks(layers, range(layer), tuple_output=cache.tuple_output))
        else:
            cache.misses += 1

    def after_model(module, args, kwargs, output):
        skipping.close()  # also when the pass failed (always_call)

    def on_first_kept_layer(module, args, kwargs):
        kv = _find_cache(args, kwargs)
        if cache.reusable():
            hidden, writes = cache.states[cache.key]
            for j, (keys, values) in enumerate(writes) if kv is not None else ():
                kv.update(keys, values, j)  # what the skipped layers would have appended
            return with_hidden(args, kwargs, hidden)
        if cache.key is None:
            return None
        writes = _written(kv, layer, cache.before, cache.length) if kv is not None else []
        if writes is not None:
            cache.store(args[0] if args else kwargs["hidden_states"], writes)
        return None

    def observe_output(module, args, output):
        cache.tuple_output = isinstance(output, tuple)

    with ExitStack() as stack:
        stack.callback(skipping.close)
        base = lm.model.base_model
        for handle in (base.register_forward_pre_hook(on_model, with_kwargs=True),
                       base.register_forward_hook(after_model, with_kwargs=True, always_call=True),
                       # first, so that every other hook on layer `layer` sees the recorded states
                       layers[layer].register_forward_pre_hook(on_first_kept_layer, with_kwargs=True, prepend=True),
                       layers[0].register_forward_hook(observe_output)):
            stack.callback(handle.remove)
        yield cache
    if weights_digest(prefix) != before:
        raise RuntimeError(f"the embeddings or layers 0..{layer - 1} changed inside reuse_prefix({layer}): "
                           "results computed from reused states would be wrong")
