"""reuse_prefix: skipping the unedited layers gives exactly the numbers of a full forward pass."""

from __future__ import annotations

import pytest
import torch

from conftest import N_LAYERS, all_params_digest, forward
from cardhouse.capture.reuse import reuse_prefix
from cardhouse.interventions import zero_rows

LAYER = N_LAYERS - 1  # the tiny models have two layers: reuse skips layer 0


def _inputs(seed: int, batch: int = 2, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 90, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


def test_reused_passes_equal_full_passes_under_an_edit(text_lm):
    lm = text_lm
    a, b = _inputs(0), _inputs(1)
    expert = 0 if lm.blocks.is_moe else None
    with torch.inference_mode():
        full_a, full_b = forward(lm, a), forward(lm, b)
        with zero_rows(lm, LAYER, [1, 2], expert=expert):
            edited_a = forward(lm, a)
        with reuse_prefix(lm, LAYER) as cache:
            assert torch.equal(forward(lm, a), full_a)  # miss: runs in full, records
            assert torch.equal(forward(lm, b), full_b)
            with zero_rows(lm, LAYER, [1, 2], expert=expert):
                reused = forward(lm, a)  # hit: starts at LAYER from the recorded states
            assert torch.equal(forward(lm, a), full_a)
    assert (cache.hits, cache.misses) == (2, 2)
    assert torch.equal(reused, edited_a)
    assert not torch.equal(edited_a, full_a)


def test_a_different_mask_is_a_different_input(tiny):
    lm = tiny("llama")
    a = _inputs(0)
    masked = {**a, "attention_mask": torch.tensor([[0] * 3 + [1] * 9, [1] * 12])}
    with torch.inference_mode(), reuse_prefix(lm, LAYER) as cache:
        forward(lm, a)
        assert torch.equal(forward(lm, masked), forward(lm, masked))
    assert cache.misses == 2


def test_editing_a_skipped_layer_inside_is_an_error(tiny):
    lm = tiny("llama")
    digest = all_params_digest(lm)
    weight = lm.blocks.layers[0].mlp.down_proj.weight
    saved = weight.detach().clone()
    with pytest.raises(RuntimeError, match="changed inside reuse_prefix"):
        with torch.inference_mode(), reuse_prefix(lm, LAYER):
            with zero_rows(lm, 0, [1]):
                forward(lm, _inputs(0))
            with torch.no_grad():  # a permanent edit of a skipped layer
                weight.add_(1.0)
    with torch.no_grad():
        weight.copy_(saved)
    assert all_params_digest(lm) == digest


def test_no_layer_forward_is_shadowed(tiny):  # regression: it was, by an instance attribute (test_skipping.py)
    lm = tiny("llama")
    block = lm.blocks.layers[0]
    with torch.inference_mode(), reuse_prefix(lm, LAYER):
        forward(lm, _inputs(0)), forward(lm, _inputs(0))  # recorded, then reused
        assert "forward" not in vars(block) and lm.blocks.layers[0] is block
    assert "forward" not in vars(block) and lm.blocks.layers[0] is block


def test_the_memory_cap_stores_nothing_beyond_it(tiny):
    lm = tiny("llama")
    a = _inputs(0)
    with torch.inference_mode(), reuse_prefix(lm, LAYER, max_bytes=0) as cache:
        first, second = forward(lm, a), forward(lm, a)
    assert torch.equal(first, second) and cache.hits == 0 and cache.nbytes == 0


def test_a_pass_naming_its_cache_is_keyed_by_the_name_not_the_cached_tensors(tiny, monkeypatch):
    """The lm-eval backend's suffix passes run against a cached prefix and name it (``cache_label``): the
    skipped layers' cached keys and values are not hashed, and the reused pass still equals a full one."""
    from transformers import DynamicCache

    from cardhouse.capture import reuse
    from cardhouse.evaluation.lm_backend import _cache_kwarg

    lm = tiny("llama")
    prefix, suffix = _inputs(0, length=8), _inputs(1, length=4)
    kv = _cache_kwarg(lm.model)  # transformers 5 renamed past_key_values to cache

    def suffix_logits():
        cache = DynamicCache(config=lm.model.config)
        lm.model(**{**prefix, "use_cache": True}, **{kv: cache})
        mask = torch.ones(2, 12, dtype=torch.long)
        with reuse.cache_label(("prefix", tuple(map(tuple, prefix["input_ids"].tolist())))):
            return lm.model(input_ids=suffix["input_ids"], attention_mask=mask, use_cache=True, **{kv: cache}).logits

    with torch.inference_mode():
        full = suffix_logits()
        with zero_rows(lm, LAYER, [1, 2]):
            edited = suffix_logits()
        with reuse_prefix(lm, LAYER) as cache:
            assert torch.equal(suffix_logits(), full)  # records the prefix pass and the suffix pass
            hashed, cached_states = [], reuse._cached_states  # the prefix pass's empty cache has none
            monkeypatch.setattr(reuse, "_cached_states", lambda *a: hashed.extend(cached_states(*a)) or hashed)
            with zero_rows(lm, LAYER, [1, 2]):
                reused = suffix_logits()
    assert (cache.hits, cache.misses) == (2, 2) and not hashed
    assert torch.equal(reused, edited) and not torch.equal(edited, full)
