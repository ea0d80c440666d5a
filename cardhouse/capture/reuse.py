"""Reuse what an edit does not change: the residual stream entering the first edited layer.

A weight attack on layer l (or an activation intervention from layer l on) leaves the
embeddings and layers 0..l-1 untouched, so their output for a given input is the same for
every variant of a sweep. Inside ``reuse_prefix(lm, l)`` the first forward pass on an input
records the hidden states entering layer l; every later pass on the same input skips layers
0..l-1 (they pass their input through) and starts layer l from the recorded states.

Inputs are recognised by their token ids and attention mask, so any caller works
(our perplexity, lm-eval's batches). Stored states are capped by ``max_bytes``; past the cap
new inputs simply run in full. Hooks on layers before l see pass-through values on reused
inputs, so capture outside this context. The embeddings and the skipped layers are hashed
on entry and exit: editing them inside the context is an error, not a silent wrong number.

With a key/value cache (``transformers`` ``DynamicCache``, passed in or made by the model) the
skipped layers also owe the cache their keys and values: a recorded pass keeps what those layers
wrote into it, and a reused pass writes the same back, so the cache ends as after a full pass.
Such a pass depends on what the cache held before, so the key also covers the skipped layers'
cached keys and values: the lm-eval backend's suffix passes, run against a cached prefix, are
recognised across the variants of a sweep like any other input.

A streamed model (``load_model(..., stream=True)``) has no weights in memory to skip: its
``Streamer.share_prefix`` keeps the states entering the layer for each set of windows instead.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch

from ..models.digest import weights_digest
from ..models.loading import LoadedModel


def _find_cache(args: tuple, kwargs: dict):
    from transformers import Cache

    return next((v for v in [*kwargs.values(), *args] if isinstance(v, Cache)), None)


def _replayable(cache) -> bool:
    from transformers import DynamicCache

    return cache is None or isinstance(cache, DynamicCache)  # its update() only appends (or slides)


def _cached_states(cache, layer: int) -> list[torch.Tensor]:
    states = []
    for cache_layer in cache.layers[:layer]:
        if getattr(cache_layer, "is_initialized", False) and cache_layer.keys is not None:
            states += [cache_layer.keys, cache_layer.values]
    return states


def _input_key(args: tuple, kwargs: dict, layer: int, uses_cache: bool) -> bytes | None:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache = _find_cache(args, kwargs)
    if not isinstance(input_ids, torch.Tensor) or not _replayable(cache):
        return None  # inputs_embeds, other entry points and other caches run in full
    h = hashlib.blake2b(digest_size=16)
    h.update(b"cache" if uses_cache else b"no cache")
    tensors = [input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids")]
    for t in tensors + (_cached_states(cache, layer) if cache is not None else []):
        if isinstance(t, torch.Tensor):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


class PrefixCache:
    """Hidden states entering one layer, by input; ``hits`` and ``misses`` count the forward passes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        # input -> (hidden states entering the layer, [(layer, keys, values)] the skipped layers cached)
        self.states: dict[bytes, tuple[torch.Tensor, list]] = {}
        self.nbytes = 0
        self.hits = self.misses = 0
        self.key: bytes | None = None  # the input of the forward pass in progress
        self.updates: list = []  # cache writes of the skipped layers in the pass in progress
        self.tuple_output = False  # older transformers layers return (hidden_states, ...)

    def reusable(self) -> bool:
        return self.key is not None and self.key in self.states

    def store(self, hidden: torch.Tensor, updates: list) -> None:
        size = sum(t.numel() * t.element_size() for t in [hidden] + [t for _, k, v in updates for t in (k, v)])
        if self.key is not None and self.nbytes + size <= self.max_bytes:
            self.states[self.key] = (hidden.detach().clone(), updates)
            self.nbytes += size


def _prefix_tensors(lm: LoadedModel, layer: int) -> list[torch.Tensor]:
    tensors = [p for block in lm.blocks.layers[:layer] for p in block.parameters()]
    return tensors + list(lm.model.get_input_embeddings().parameters())


@contextmanager
def reuse_prefix(lm: LoadedModel, layer: int, *, max_bytes: int = 2 * 2**30) -> Iterator[PrefixCache]:
    """Skip layers ``0..layer-1`` on inputs already seen in this context (see the module docstring)."""
    from ..models.streaming import streamer_of

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

    def on_model(module, args, kwargs):
        use_cache = kwargs.get("use_cache")
        uses_cache = _find_cache(args, kwargs) is not None or bool(
            use_cache if use_cache is not None else getattr(module.config, "use_cache", False))
        cache.key = _input_key(args, kwargs, layer, uses_cache)
        cache.updates = []
        if cache.reusable():
            cache.hits += 1
        else:
            cache.misses += 1

    def on_first_layer(module, args, kwargs):
        kv = _find_cache(args, kwargs)
        if kv is None or cache.reusable() or cache.key is None:
            return
        update, updates = kv.update, cache.updates

        def recording(key_states, value_states, layer_idx, *rest, **options):
            if layer_idx < layer:
                updates.append((layer_idx, key_states.detach(), value_states.detach()))
            return update(key_states, value_states, layer_idx, *rest, **options)

        kv.update = recording  # an instance attribute shadows the method until layer `layer` starts

    def on_first_kept_layer(module, args, kwargs):
        kv = _find_cache(args, kwargs)
        if cache.reusable():
            hidden, updates = cache.states[cache.key]
            for layer_idx, keys, values in updates if kv is not None else ():
                kv.update(keys, values, layer_idx)  # what the skipped layers would have written
            return ((hidden,) + args[1:], kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        if kv is not None and "update" in vars(kv):
            del kv.update
        cache.store(args[0] if args else kwargs["hidden_states"], cache.updates)

    def observe_output(module, args, output):
        cache.tuple_output = isinstance(output, tuple)

    def pass_through(inner):
        def forward(*args, **kwargs):
            if not cache.reusable():
                return inner(*args, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) if cache.tuple_output else hidden
        return forward

    with ExitStack() as stack:
        for handle in (lm.model.base_model.register_forward_pre_hook(on_model, with_kwargs=True),
                       layers[0].register_forward_pre_hook(on_first_layer, with_kwargs=True),
                       layers[layer].register_forward_pre_hook(on_first_kept_layer, with_kwargs=True),
                       layers[0].register_forward_hook(observe_output)):
            stack.callback(handle.remove)
        for block in layers[:layer]:
            block.forward = pass_through(block.forward)  # an instance attribute shadows the class method
            stack.callback(delattr, block, "forward")
        yield cache
    if weights_digest(prefix) != before:
        raise RuntimeError(f"the embeddings or layers 0..{layer - 1} changed inside reuse_prefix({layer}): "
                           "results computed from reused states would be wrong")
