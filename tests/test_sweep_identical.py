"""A k-sweep measures each distinct set of weights once: at k = 0 zeroing edits nothing and retaining keeps
nothing (top-k or random alike), at k = the whole layer the other way round; those variants get the
numbers of the bit-identical one measured before them, and the rows equal a sweep measuring every variant."""

from __future__ import annotations

import pytest
from conftest import TEXT_FAMILIES, build

from cardhouse.analysis import find_massive_weights
from cardhouse.interventions import run_variants
from cardhouse.interventions.sweep import sweep, sweep_variants
from cardhouse.interventions.variants import sweep_attacks


class Counter:
    """Counts its calls; the number depends on every weight (a stale or shared row would show)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, lm) -> dict:
        self.calls += 1
        return {"weights": float(sum(p.detach().double().abs().sum() for p in lm.model.parameters()))}


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_variants_with_identical_weights_are_measured_once(family):
    lm = build(family)
    mw = find_massive_weights(lm, layer=0, k=lm.blocks.intermediate_size(0))
    size = mw.intermediate_size  # the carrier expert's width: Qwen2-MoE's shared expert is wider than the routed
    mw = find_massive_weights(lm, layer=0, k=size)
    ks = [0, 1, size]
    shared, every = Counter(), Counter()
    rows = sweep(lm, mw, shared, ks=ks, progress=False)
    reference = run_variants(lm, sweep_variants(lm, mw, ks), every)
    assert rows == reference  # the same rows, in the same order
    assert every.calls == 1 + 4 * len(ks)  # the original, then 4 attacks at each k
    # unedited (original, zeroing at 0, retaining all), all rows zeroed (retaining at 0, zeroing all), and
    # the distinct k = 1 variants
    assert shared.calls == 2 + len({r["weights"] for r in rows if r["k"] == 1})
    by_name = {r["variant"]: r["weights"] for r in rows}
    assert by_name["topk-zero k=0"] == by_name["random-zero k=0"] == by_name["original"]
    assert by_name["topk-retain k=0"] == by_name["random-retain k=0"] != by_name["original"]
    if size in ks:
        assert by_name["random-retain k=%d" % size] == by_name["original"]
        assert by_name["random-zero k=%d" % size] == by_name["topk-retain k=0"]


def test_hooks_are_always_measured():
    from contextlib import nullcontext

    from cardhouse.interventions import Variant, original

    lm = build("llama")
    hooked = Variant("my-hook", "attaches hooks, edits no weight", nullcontext, layer=0, edits_block=False)
    counter = Counter()
    run_variants(lm, [original(), hooked, hooked], counter, same_weights_once=True)
    assert counter.calls == 3


def test_the_original_is_k_0_only_of_the_curves_whose_k_0_edits_nothing():
    # regression: the report's quick sweep (ks 1, 2, 5) drew retaining k = 0 rows at the original perplexity,
    # but keeping no row zeroes the whole layer
    from cardhouse.interventions.sweep import sweep_table

    rows = [{"kind": "original", "k": None, "m": 10.0}] + [{"kind": kind, "k": 1, "m": 20.0 + i}
                                                             for i, kind in enumerate(sweep_attacks())]
    curves = sweep_table(rows, "m")
    assert curves["topk-zero"][0] == curves["random-zero"][0] == (0, 10.0)
    assert [k for k, _ in curves["topk-retain"]] == [k for k, _ in curves["random-retain"]] == [1]
    measured = sweep_table(rows + [{"kind": "topk-retain", "k": 0, "m": 99.0}], "m")
    assert measured["topk-retain"][0] == (0, 99.0)  # a measured k = 0 is kept
