"""Weight attacks restore bit-identical weights (on exit and on error), edit exactly what they say,
check their indices before touching anything; activation setting replaces what it says."""

from __future__ import annotations

import pytest
import torch

from conftest import (D_MODEL, N_EXPERTS, N_LAYERS, SANDWICH_FAMILIES, TEXT_FAMILIES,
                      all_params_digest, build, d_mlp, forward, plant_massive_weight, sample_inputs)
from cardhouse.capture import hook_name, record
from cardhouse.interventions import (check_indices, random_indices, retain_rows, set_activations, touched_tensors,
                                     weights_digest, zero_rows, zero_super_weight)

LAYER = N_LAYERS - 1
PICK = [1, 4, 9]


def _expert(lm):
    return 2 if lm.blocks.is_moe else None


def _snapshot(lm) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in lm.model.named_parameters()}


def _changed(lm, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, p in lm.model.named_parameters() if not torch.equal(p.detach(), before[name])}


def _neuron_rows(lm, layer, expert):
    """Per neuron slice: the [n, ...] block of its rows (a copy), neuron i at index i."""
    n = lm.blocks.intermediate_size(layer)
    return [t.narrow(a, o, n).movedim(a, 0).detach().clone() for t, a, o in lm.blocks.neuron_slices(layer, expert)]


def _touched_names(lm, layer, expert):
    ptrs = {t.untyped_storage().data_ptr() for t in touched_tensors(lm, layer, expert)}
    return {name for name, p in lm.model.named_parameters() if p.untyped_storage().data_ptr() in ptrs}


class Boom(RuntimeError):
    pass


# ---- zero_rows / retain_rows -------------------------------------------------------------------------


@pytest.mark.parametrize("raises", [False, True], ids=["exit", "error"])
def test_zero_rows_edits_the_rows_and_restores_bit_identical(lm, raises):
    expert, inputs = _expert(lm), sample_inputs(lm)
    digest, before, out = all_params_digest(lm), _snapshot(lm), forward(lm, inputs)
    rows_before = _neuron_rows(lm, LAYER, expert)
    with pytest.raises(Boom) if raises else _nothing():
        with zero_rows(lm, LAYER, PICK, expert=expert):
            rows = _neuron_rows(lm, LAYER, expert)
            others = [i for i in range(d_mlp(lm)) if i not in PICK]
            for now, was in zip(rows, rows_before):
                assert torch.all(now[PICK] == 0)
                assert torch.equal(now[others], was[others])
            changed = _changed(lm, before)
            assert changed and changed <= _touched_names(lm, LAYER, expert)
            if not lm.blocks.is_moe or expert in _routed_experts(lm, inputs):
                assert not torch.equal(forward(lm, inputs), out)  # the edit reaches the output
            if raises:
                raise Boom("the body failed")
    assert all_params_digest(lm) == digest
    assert torch.equal(forward(lm, inputs), out)


@pytest.mark.parametrize("raises", [False, True], ids=["exit", "error"])
def test_retain_rows_zeroes_all_other_rows_and_restores(lm, raises):
    expert = _expert(lm)
    digest, before = all_params_digest(lm), _snapshot(lm)
    rows_before = _neuron_rows(lm, LAYER, expert)
    with pytest.raises(Boom) if raises else _nothing():
        with retain_rows(lm, LAYER, PICK, expert=expert):
            others = [i for i in range(d_mlp(lm)) if i not in PICK]
            for now, was in zip(_neuron_rows(lm, LAYER, expert), rows_before):
                assert torch.equal(now[PICK], was[PICK])
                assert torch.all(now[others] == 0)
            assert _changed(lm, before) <= _touched_names(lm, LAYER, expert)
            if raises:
                raise Boom("the body failed")
    assert all_params_digest(lm) == digest


@pytest.mark.parametrize("raises", [False, True], ids=["exit", "error"])
def test_zero_super_weight_zeroes_one_entry_and_restores(lm, raises):
    expert, row, column = _expert(lm), 3, d_mlp(lm) - 2
    digest, before = all_params_digest(lm), _snapshot(lm)
    down_before = lm.blocks.down_weight(LAYER, expert).detach().clone()
    assert down_before[row, column] != 0
    with pytest.raises(Boom) if raises else _nothing():
        with zero_super_weight(lm, LAYER, row, column, expert=expert):
            diff = lm.blocks.down_weight(LAYER, expert) != down_before
            assert diff.sum() == 1 and bool(diff[row, column])
            assert lm.blocks.down_weight(LAYER, expert)[row, column] == 0
            assert len(_changed(lm, before)) == 1
            if raises:
                raise Boom("the body failed")
    assert all_params_digest(lm) == digest


def test_nested_attacks_restore(lm):
    expert = _expert(lm)
    digest = all_params_digest(lm)
    with zero_rows(lm, LAYER, [0, 2], expert=expert), retain_rows(lm, LAYER, [2, 5], expert=expert), \
            zero_super_weight(lm, 0, 0, 1, expert=expert):
        assert all_params_digest(lm) != digest
    assert all_params_digest(lm) == digest


# ---- indices checked before anything is touched ----------------------------------------------------------


def _bad_index_lists(size):
    return {"duplicate": [1, 2, 1], "too large": [0, size], "negative": [-1], "far": [10 * size]}


@pytest.mark.parametrize("attack", [zero_rows, retain_rows])
def test_bad_indices_raise_before_touching(lm, attack):
    expert, size = _expert(lm), d_mlp(lm)
    digest = all_params_digest(lm)
    for what, indices in _bad_index_lists(size).items():
        with pytest.raises(ValueError, match="duplicates" if what == "duplicate" else "out of range") as err:
            with attack(lm, LAYER, indices, expert=expert):
                pytest.fail("the body must not run")
        if what != "duplicate":
            assert f"0..{size - 1}" in str(err.value)
        assert all_params_digest(lm) == digest, what


def test_bad_super_weight_coordinates_raise_before_touching(lm):
    expert, size = _expert(lm), d_mlp(lm)
    digest = all_params_digest(lm)
    for row, column in [(D_MODEL, 0), (-1, 0), (0, size), (0, -1)]:
        with pytest.raises(ValueError, match="out of range"):
            with zero_super_weight(lm, LAYER, row, column, expert=expert):
                pytest.fail("the body must not run")
        assert all_params_digest(lm) == digest


def test_bad_layer_raises_before_touching(lm):
    digest, expert = all_params_digest(lm), _expert(lm)
    for attack, args in [(zero_rows, ([0],)), (retain_rows, ([0],)), (zero_super_weight, (0, 0))]:
        with pytest.raises(IndexError, match="out of range"):
            with attack(lm, N_LAYERS, *args, expert=expert):
                pytest.fail("the body must not run")
    assert all_params_digest(lm) == digest


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_attacks_need_an_expert(tiny, family):
    lm = tiny(family)
    digest = all_params_digest(lm)
    for attack, args in [(zero_rows, ([0],)), (retain_rows, ([0],)), (zero_super_weight, (0, 0))]:
        with pytest.raises(ValueError, match="expert"):
            with attack(lm, 0, *args):
                pytest.fail("the body must not run")
    assert all_params_digest(lm) == digest


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_attack_touches_only_its_expert(tiny, family):
    lm = tiny(family)
    stored = [lm.blocks.mlp_part(LAYER, part).detach().clone() for part in ("up", "down")]
    with zero_rows(lm, LAYER, PICK, expert=1), zero_super_weight(lm, LAYER, 0, 0, expert=1):
        for part, was in zip(("up", "down"), stored):
            now = lm.blocks.mlp_part(LAYER, part)
            assert not torch.equal(now[1], was[1])
            for other in set(range(N_EXPERTS)) - {1}:
                assert torch.equal(now[other], was[other])


def test_check_indices():
    assert check_indices([3, 0, 2], 4) == [3, 0, 2]
    assert check_indices([], 4) == []
    with pytest.raises(ValueError, match="duplicates"):
        check_indices([1, 1], 4)
    with pytest.raises(ValueError, match=r"out of range 0\.\.3: \[4\]"):
        check_indices([0, 4], 4, "row")


def test_weights_digest_sees_one_bit():
    t = torch.randn(10)
    digest = weights_digest([t])
    assert weights_digest([t.clone()]) == digest
    t.view(torch.int32)[3] ^= 1  # flip the lowest mantissa bit
    assert weights_digest([t]) != digest
    assert weights_digest([torch.zeros(2), torch.ones(2)]) != weights_digest([torch.ones(2), torch.zeros(2)])


# ---- random-k control --------------------------------------------------------------------------------


def test_random_indices_are_seeded_distinct_and_exclude():
    a = random_indices(100, 10, exclude=[1, 2, 3], seed=7)
    assert a == random_indices(100, 10, exclude=[1, 2, 3], seed=7)
    assert a != random_indices(100, 10, exclude=[1, 2, 3], seed=8)
    assert len(set(a)) == 10 and a == sorted(a)
    assert all(0 <= i < 100 and i not in (1, 2, 3) for i in a)
    assert random_indices(5, 3, exclude=[0, 1]) == [2, 3, 4]  # the whole pool
    assert random_indices(5, 0) == []
    draws = {i for seed in range(50) for i in random_indices(20, 3, exclude=[0, 19], seed=seed)}
    assert draws == set(range(1, 19))  # every allowed index can come out, no excluded one does


@pytest.mark.parametrize("size,k,exclude", [(10, 11, ()), (10, 9, (0, 1)), (10, -1, ()), (0, 1, ())])
def test_random_indices_k_out_of_range(size, k, exclude):
    with pytest.raises(ValueError, match=f"k={k} is out of range"):
        random_indices(size, k, exclude=exclude)


# ---- activations --------------------------------------------------------------------------------------


def test_set_activations_replaces_above_threshold_and_restores(lm):
    inputs = sample_inputs(lm)
    names = [hook_name(layer, "hook_resid_post") for layer in range(N_LAYERS)]
    digest = all_params_digest(lm)
    with record(lm.model, names) as clean:
        out = forward(lm, inputs)
    layer, dims = 0, [2, 5]
    original = clean[names[layer]][..., dims]
    threshold = float(original.abs().median())
    values = {2: 123.0, 5: -7.5}
    with set_activations(lm, [layer], values, threshold) as counts:
        with record(lm.model, [hook_name(1, "hook_resid_pre")]) as seen:
            changed = forward(lm, inputs)
    got = seen[hook_name(1, "hook_resid_pre")]  # what the next block received
    carriers = original.abs() > threshold
    assert counts["replaced"] == int(carriers.sum()) > 0
    expected = torch.where(carriers, torch.tensor([123.0, -7.5]), original)
    assert torch.equal(got[..., dims], expected)
    untouched = [d for d in range(D_MODEL) if d not in dims]
    assert torch.equal(got[..., untouched], clean[names[layer]][..., untouched])
    assert not torch.equal(changed, out)
    assert all_params_digest(lm) == digest
    assert torch.equal(forward(lm, inputs), out)


def test_set_activations_rejects_a_bad_layer(tiny):
    lm = tiny("llama")
    with pytest.raises(IndexError):
        with set_activations(lm, [0, N_LAYERS], {0: 0.0}, 1.0):
            pytest.fail("the body must not run")


@pytest.mark.parametrize("dim", [-1, D_MODEL])
def test_set_activations_rejects_a_bad_dim(tiny, dim):  # regression: used to fail inside the forward pass
    lm = tiny("llama")
    with pytest.raises(ValueError, match="hidden dim"):
        with set_activations(lm, [0], {dim: 0.0}, 1.0):
            pytest.fail("the body must not run")


# ---- the house of cards, end to end -------------------------------------------------------------------


@pytest.mark.parametrize("family", [f for f in TEXT_FAMILIES if f not in SANDWICH_FAMILIES])
def test_zeroing_the_planted_rows_removes_the_massive_activation(family, tokenizer):
    lm = build(family, tokenizer)
    plant = plant_massive_weight(lm, layer=0, neuron=5, dim=7)
    inputs = sample_inputs(lm)
    name = hook_name(N_LAYERS - 1, "hook_resid_post")

    def bos_dim7():
        with record(lm.model, [name]) as store:
            forward(lm, inputs)
        return store[name][:, 0, 7].abs()

    massive = bos_dim7()
    assert torch.all(massive > 1000)
    experts = range(N_EXPERTS) if lm.blocks.is_moe else [None]
    with _all_experts(zero_rows, lm, [5], experts):
        assert torch.all(bos_dim7() < 50)
    with _all_experts(retain_rows, lm, [5], experts):  # the planted row alone keeps it
        assert torch.all(bos_dim7() > 0.5 * massive)
    with _all_experts(lambda lm, _, idx, expert: zero_super_weight(lm, 0, 7, idx[0], expert=expert), lm, [5], experts):
        assert torch.all(bos_dim7() < 50)
    torch.testing.assert_close(bos_dim7(), massive, rtol=0, atol=0)
    assert plant["down"] == 100.0


# ---- helpers --------------------------------------------------------------------------------------------


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _all_experts:
    """Enter ``attack(lm, 0, indices, expert=e)`` for every expert (or once with expert=None)."""

    def __init__(self, attack, lm, indices, experts):
        from contextlib import ExitStack

        self.stack, self.args = ExitStack(), (attack, lm, indices, experts)

    def __enter__(self):
        attack, lm, indices, experts = self.args
        for expert in experts:
            self.stack.enter_context(attack(lm, 0, indices, expert=expert))
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def _routed_experts(lm, inputs) -> set[int]:
    """Experts of LAYER that some token is routed to (top-k) in ``inputs``."""
    experts = lm.blocks.part(LAYER, "mlp").experts
    seen = set()
    handle = experts.register_forward_pre_hook(lambda mod, args: seen.update(args[1].flatten().tolist()))
    try:
        forward(lm, inputs)
    finally:
        handle.remove()
    return seen
