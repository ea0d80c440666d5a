"""Skipping decoder blocks (models/skipping.py) for prefix reuse and layer streaming: no method of a
block or of a cache is replaced, and every family's tiny model gives the numbers of a full forward pass
(float32, within 1e-5), also with a key/value cache."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import (ALL_FAMILIES, TEXT_FAMILIES, VISION_FAMILIES, build,
                      sample_inputs)

from cardhouse.capture.reuse import reuse_prefix
from cardhouse.interventions import zero_rows
from cardhouse.models import load_model
from cardhouse.models.skipping import PassThrough, skip_blocks
from cardhouse.models.streaming import streamer_of

N_LAYERS = 3  # reuse starts at layer 2: two skipped blocks owe the cache their keys and values
LAYER = 2


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a - b).abs() <= 1e-5 * (1 + b.abs())).all())


def ids(seed: int, length: int = 10, batch: int = 2) -> torch.Tensor:
    return torch.randint(4, 90, (batch, length), generator=torch.Generator().manual_seed(seed))


def replaced_methods(modules, caches=()) -> list[str]:
    """Instance attributes that shadow a method: ``forward`` on a module, ``update`` on a cache or its layers."""
    found = [f"{type(m).__name__}.forward" for m in modules if "forward" in vars(m)]
    for cache in caches:
        found += [f"{type(c).__name__}.update" for c in [cache, *cache.layers] if "update" in vars(c)]
    return found


def cache_kwarg(model) -> str:  # transformers 5 renamed past_key_values to cache
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def edit(lm, layer: int = LAYER):
    return zero_rows(lm, layer, [1, 2, 3], expert=0 if lm.blocks.is_moe else None)


def test_pass_through_stands_in_and_the_blocks_come_back_also_on_error(tiny):
    lm = tiny("llama")
    layers = lm.blocks.layers
    originals = list(layers)
    with pytest.raises(RuntimeError, match="inside"):
        with skip_blocks(layers, [0]):
            assert isinstance(layers[0], PassThrough) and layers[1] is originals[1]
            assert not list(layers[0].parameters())  # a stand-in owns none of the block's weights
            raise RuntimeError("inside")
    assert list(layers) == originals


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_a_pass_through_answers_for_its_block(family, tiny):
    """Older transformers read ``decoder_layer.attention_type`` in the model's layer loop; hooks attached
    by name while blocks are skipped (attention hook points) must find the block's real parts."""
    lm = tiny(family)
    for layer, block in enumerate(lm.blocks.layers):
        public = {k: v for k, v in vars(block).items() if not k.startswith("_") and k != "training"}
        attn = lm.blocks.part(layer, "attn")
        with skip_blocks(lm.blocks.layers, [layer]):
            stand_in = lm.blocks.layers[layer]
            assert all(getattr(stand_in, k) is v for k, v in public.items())
            assert lm.blocks.part(layer, "attn") is attn
            assert not any(p is q for p in lm.model.parameters() for q in block.parameters())
        with pytest.raises(AttributeError):
            stand_in.no_such_attribute


def test_reuse_replaces_no_method_during_or_after(tiny):
    """Regression: reuse_prefix used to shadow ``block.forward`` and ``DynamicCache.update`` with instance
    attributes."""
    from transformers import DynamicCache

    lm = build("llama", n_layers=N_LAYERS)
    modules = list(lm.model.modules())
    seen = []
    kwarg = cache_kwarg(lm.model)

    def check(module, args, kwargs):
        caches = [v for v in kwargs.values() if isinstance(v, DynamicCache)]
        seen.append(replaced_methods(modules + list(lm.model.modules()), caches))

    handle = lm.blocks.layers[LAYER].register_forward_pre_hook(check, with_kwargs=True)
    with torch.inference_mode(), reuse_prefix(lm, LAYER) as prefix:
        for _ in range(2):  # a recorded pass, then a reused one
            lm.model(input_ids=ids(0), use_cache=True, **{kwarg: DynamicCache(config=lm.model.config)})
            lm.model(input_ids=ids(0), use_cache=False)
        assert not replaced_methods(lm.model.modules())
    handle.remove()
    assert (prefix.hits, prefix.misses) == (2, 2) and seen == [[]] * 4
    assert not replaced_methods(modules) and not any(isinstance(m, PassThrough) for m in lm.model.modules())


def test_streaming_replaces_no_method_during_or_after(tmp_path):
    lm = build("llama", n_layers=N_LAYERS)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    streamed = load_model(str(tmp_path), bos=True, stream=True)
    streamer = streamer_of(streamed.model)
    modules = list(streamed.model.modules())
    seen = []
    hooks = [block.register_forward_pre_hook(lambda m, a: seen.append(replaced_methods(modules))) for block in
             streamed.blocks.layers]
    batch = {"input_ids": ids(0)}
    streamer.run_head(batch, streamer.run([batch], progress=False)[0])
    for h in hooks:
        h.remove()
    assert seen == [[]] * N_LAYERS and not replaced_methods(streamed.model.modules())
    assert list(streamed.blocks.layers) == [m for m in modules if m in set(streamed.blocks.layers)]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_reused_passes_equal_full_passes_in_every_family(family):
    """Without a cache: the recorded pass and the reused pass under an edit of layer 2 give the full
    forward's numbers (image models have no token ids: they run in full, never reused)."""
    lm = build(family, n_layers=N_LAYERS)
    layer = len(lm.blocks) - 1  # the tiny BERT has two layers whatever n_layers says
    inputs = sample_inputs(lm)
    body = lm.model.base_model
    with torch.inference_mode():
        full = body(**inputs).last_hidden_state
        with edit(lm, layer):
            edited = body(**inputs).last_hidden_state
        with reuse_prefix(lm, layer) as prefix:
            recorded = body(**inputs).last_hidden_state
            with edit(lm, layer):
                reused = body(**inputs).last_hidden_state
    assert close(recorded, full) and close(reused, edited) and not close(edited, full)
    reusable = family not in VISION_FAMILIES
    assert (prefix.hits, prefix.misses) == ((1, 1) if reusable else (0, 2))


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_reused_passes_with_a_kv_cache_equal_full_passes(family):
    """A prefix into a cache, then a suffix against it (how the lm-eval backend runs): the reused
    passes write what the skipped layers would have into the cache, so the suffix's logits and the
    whole cache equal a full run's, under an edit of layer 2."""
    from transformers import DynamicCache

    lm = build(family, n_layers=N_LAYERS)
    kwarg = cache_kwarg(lm.model)
    prefix_ids, suffix_ids = ids(1, 7), ids(2, 4)

    def run():
        cache = DynamicCache(config=lm.model.config)
        lm.model(input_ids=prefix_ids, use_cache=True, **{kwarg: cache})
        mask = torch.ones(2, 11, dtype=torch.long)
        logits = lm.model(input_ids=suffix_ids, attention_mask=mask, use_cache=True, **{kwarg: cache}).logits
        return logits, [t for layer in cache.layers for t in (layer.keys, layer.values)]

    with torch.inference_mode():
        with edit(lm):
            expected, expected_cache = run()
        with reuse_prefix(lm, LAYER) as prefix:
            run()
            with edit(lm):
                logits, cached = run()
    assert (prefix.hits, prefix.misses) == (2, 2)
    assert close(logits, expected) and all(close(a, b) for a, b in zip(cached, expected_cache))


def test_a_sliding_window_that_dropped_keys_runs_in_full():
    """A cache layer that slid past its window cannot say what the pass appended: that input is not
    stored (it runs in full every time) and the numbers stay those of a full pass."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from conftest import text_config
    from cardhouse.models import from_pretrained_objects

    torch.manual_seed(0)
    config = text_config("mistral", num_hidden_layers=N_LAYERS, sliding_window=4)
    lm = from_pretrained_objects(AutoModelForCausalLM.from_config(config).eval(), None, name="tiny-sliding",
                                 bos=False)
    kwarg = cache_kwarg(lm.model)

    def run(length):
        cache = DynamicCache(config=lm.model.config)
        return lm.model(input_ids=ids(3, length), use_cache=True, **{kwarg: cache}).logits

    with torch.inference_mode():
        full = run(8)
        with reuse_prefix(lm, LAYER) as prefix:
            assert close(run(8), full) and close(run(8), full)
            run(3), run(3)  # within the window: stored and reused
    assert prefix.hits == 1 and prefix.misses == 3


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_streamed_logits_equal_the_full_forward(family, tmp_path):
    lm = build(family, n_layers=N_LAYERS)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    streamed = load_model(str(tmp_path), bos=True, stream=True)
    streamer = streamer_of(streamed.model)
    batches = [{"input_ids": ids(4)}, {"input_ids": ids(5, 6)}]
    with torch.inference_mode():
        expected = [lm.model(**b, use_cache=False).logits for b in batches]
        states = streamer.run(batches, progress=False)
        got = [streamer.run_head(b, s) for b, s in zip(batches, states)]
        middle = streamer.run(batches, stop=LAYER, progress=False)  # and from block 2 on, from given states
        resumed = streamer.run(batches, start=LAYER, states=middle, progress=False)
    assert all(close(g, e) for g, e in zip(got, expected))
    assert all(torch.equal(r, s) for r, s in zip(resumed, states))
    assert not any(isinstance(m, PassThrough) for m in streamed.model.modules())
