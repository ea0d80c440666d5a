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
