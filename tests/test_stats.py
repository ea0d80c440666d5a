"""StreamingStats and OutlierCounter against exact computations on the full data."""

from __future__ import annotations

import math

import pytest
import torch

from cardhouse.capture.stats import LayerStats, OutlierCounter, StreamingStats, TopEntry


def log_uniform_batches(n_batches=4, batch=5, pos=40, d=24, seed=0, lengths=True):
    """Random-sign activations with |a| log-uniform over 1e-4..1e4, right-padded (mask 0) rows whose
    padded entries hold huge garbage (which the statistics must never see)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        mag = 10 ** (torch.rand(batch, pos, d, generator=g) * 8 - 4)
        sign = torch.where(torch.rand(batch, pos, d, generator=g) < 0.5, -1.0, 1.0)
        acts = mag * sign
        mask = torch.ones(batch, pos, dtype=torch.long)
        if lengths:
            for row in range(batch):
                n = int(torch.randint(3, pos + 1, (1,), generator=g))
                mask[row, n:] = 0
        acts = torch.where(mask.bool()[..., None], acts, torch.full_like(acts, 1e7))
        token_ids = torch.randint(0, 300, (batch, pos), generator=g)
        prompt_index = torch.arange(b * batch, (b + 1) * batch)
        out.append((acts, mask, token_ids, prompt_index))
    return out


def feed(stats, batches, layer=0):
    for acts, mask, token_ids, prompt_index in batches:
        stats.update(layer, acts, mask, token_ids, prompt_index)


def real_magnitudes(batches) -> torch.Tensor:
    return torch.cat([acts.abs()[mask.bool()].flatten() for acts, mask, _, _ in batches]).double()


def exact_ranks(batches, top_k) -> torch.Tensor:
    """Mean over prompts of each prompt's k-th largest |a| over its real tokens."""
    tops = [acts[row].abs()[mask[row].bool()].flatten().topk(top_k).values.double()
            for acts, mask, _, _ in batches for row in range(acts.shape[0])]
    return torch.stack(tops).mean(0)


def exact_entries(batches, n) -> list[TopEntry]:
    entries = []
    for acts, mask, token_ids, prompt_index in batches:
        for row, pos, dim in mask.bool()[..., None].expand_as(acts).nonzero().tolist():
            entries.append(TopEntry(float(acts[row, pos, dim]), int(prompt_index[row]), pos,
                                    int(token_ids[row, pos]), dim))
    return sorted(entries, key=lambda e: -abs(e.value))[:n]


@pytest.mark.parametrize("seed", [0, 1])
def test_quantiles_match_torch_within_one_percent(seed):
    batches = log_uniform_batches(seed=seed)
    stats = StreamingStats(n_layers=2, d=24, top_k=10)
    feed(stats, batches, layer=1)
    exact = real_magnitudes(batches)
    assert stats.count(1) == exact.numel() and stats.count(0) == 0
    for q in (0.1, 0.5, 0.9, 0.99, 0.999):
        assert stats.quantile(1, q) == pytest.approx(float(torch.quantile(exact, q)), rel=0.01), q
    assert stats.median(1) == pytest.approx(float(exact.median()), rel=0.01)
    result = stats.result(1)
    assert result.quantiles["top 1%"] == pytest.approx(float(torch.quantile(exact, 0.99)), rel=0.01)
    assert result.quantiles["top 10%"] == pytest.approx(float(torch.quantile(exact, 0.90)), rel=0.01)
    assert stats.median(0) != stats.median(0)  # an empty layer has no median (nan)


def test_quantiles_of_data_far_from_one():
    """A tight cluster around 3e-3 and one around 2e3: both ends resolve to 1%."""
    g = torch.Generator().manual_seed(3)
    small = 3e-3 * (1 + 0.2 * torch.rand(2, 30, 16, generator=g))
    large = 2e3 * (1 + 0.2 * torch.rand(2, 30, 16, generator=g))
    acts = torch.cat([small, large])
    mask = torch.ones(4, 30, dtype=torch.long)
    stats = StreamingStats(1, 16, top_k=5)
    stats.update(0, acts, mask, torch.zeros(4, 30, dtype=torch.long), torch.arange(4))
    flat = acts.abs().flatten().double()
    for q in (0.05, 0.25, 0.75, 0.95):
        assert stats.quantile(0, q) == pytest.approx(float(torch.quantile(flat, q)), rel=0.01), q


def test_exact_zeros_count_as_the_smallest_values():
    acts = torch.zeros(1, 10, 4)
    acts[0, :3] = 5.0  # 12 of 40 values are 5, the rest exactly 0
    stats = StreamingStats(1, 4, top_k=3)
    stats.update(0, acts, torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 10, dtype=torch.long), torch.arange(1))
    assert stats.count(0) == 40
    assert stats.median(0) < 1e-7
    assert stats.quantile(0, 0.9) == pytest.approx(5.0, rel=0.01)


def test_top_ranks_and_kept_entries_are_exact():
    batches = log_uniform_batches(n_batches=5, seed=4)
    stats = StreamingStats(n_layers=1, d=24, top_k=12, keep_entries=7)
    feed(stats, batches)
    result = stats.result(0)
    assert isinstance(result, LayerStats) and result.prompts == 25
    torch.testing.assert_close(torch.tensor(result.top_ranks, dtype=torch.float64), exact_ranks(batches, 12),
                               rtol=1e-6, atol=0)
    assert result.top_entries == exact_entries(batches, 7)
    table = result.table1()
    assert table["top-1"] == result.top_ranks[0] and table["top-10"] == result.top_ranks[9]
    assert "top-100" not in table and table["median"] == result.median


def test_update_returns_each_prompts_top_k():
    (acts, mask, token_ids, prompt_index), = log_uniform_batches(n_batches=1, seed=5)
    stats = StreamingStats(1, 24, top_k=6)
    values, flat_index = stats.update(0, acts, mask, token_ids, prompt_index)
    assert values.shape == flat_index.shape == (acts.shape[0], 6)
    for row in range(acts.shape[0]):
        pos, dim = flat_index[row] // 24, flat_index[row] % 24
        assert torch.all(mask[row, pos] == 1)  # never a padded position
        torch.testing.assert_close(values[row], acts[row, pos, dim].abs())
        real = acts[row].abs()[mask[row].bool()].flatten()
        torch.testing.assert_close(values[row], real.topk(6).values)


def test_padding_is_ignored():
    """Padded positions hold 1e7: the statistics equal those of the real tokens alone."""
    batches = log_uniform_batches(n_batches=3, seed=6)
    unpadded = []  # the same prompts, one per batch, cut to their real length
    for acts, mask, token_ids, prompt_index in batches:
        for row in range(acts.shape[0]):
            n = int(mask[row].sum())
            unpadded.append((acts[row:row + 1, :n], mask[row:row + 1, :n], token_ids[row:row + 1, :n],
                             prompt_index[row:row + 1]))
    padded_stats, plain_stats = StreamingStats(1, 24, top_k=10), StreamingStats(1, 24, top_k=10)
    feed(padded_stats, batches)
    feed(plain_stats, unpadded)
    padded, plain = padded_stats.result(0), plain_stats.result(0)
    assert padded.count == plain.count == real_magnitudes(batches).numel()
    assert torch.equal(padded_stats.hist, plain_stats.hist)
    assert padded.median == plain.median and padded.quantiles == plain.quantiles
    torch.testing.assert_close(torch.tensor(padded.top_ranks), torch.tensor(plain.top_ranks), rtol=1e-9, atol=0)
    assert padded.top_entries == plain.top_entries
    assert max(abs(e.value) for e in padded.top_entries) <= 1e4
    assert padded.top_ranks[0] <= 1e4


def test_padding_never_enters_the_kept_entries_when_few_values_are_real():  # regression
    """Few real values (d=2, prompts of 1 and 2 tokens) and room for 16 entries: only the 6 real ones."""
    acts = torch.tensor([[[1.0, -2.0], [0.0, 0.0], [0.0, 0.0]], [[3.0, 4.0], [-5.0, 6.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    stats = StreamingStats(1, 2, top_k=6, keep_entries=16)
    stats.update(0, acts, mask, torch.tensor([[7, 0, 0], [8, 9, 0]]), torch.tensor([0, 1]))
    entries = stats.result(0).top_entries
    assert all(mask[e.prompt, e.position] == 1 for e in entries), entries
    assert [e.value for e in entries] == [6.0, -5.0, 4.0, 3.0, -2.0, 1.0]
    assert stats.count(0) == 6


def test_memory_does_not_grow_with_updates():
    stats = StreamingStats(n_layers=3, d=24, top_k=10, keep_entries=5)
    size = stats.nbytes()
    assert size > 0
    for i, batch in enumerate(log_uniform_batches(n_batches=12, seed=7)):
        stats.update(i % 3, *batch)
        assert stats.nbytes() == size
        assert all(len(kept) <= 5 for kept in stats.entries)
    assert sum(stats.prompts) == 12 * 5


def test_layers_are_independent():
    a, b = log_uniform_batches(n_batches=2, seed=8), log_uniform_batches(n_batches=2, seed=9)
    both, only_a = StreamingStats(2, 24, top_k=5), StreamingStats(2, 24, top_k=5)
    feed(both, a, layer=0)
    feed(both, b, layer=1)
    feed(only_a, a, layer=0)
    assert both.result(0) == only_a.result(0)
    assert both.count(1) == real_magnitudes(b).numel()


# ---- OutlierCounter ------------------------------------------------------------------------------------


def test_outlier_counter_counts_real_tokens_only():
    counter = OutlierCounter(n_layers=2, d=4, threshold=6.0)
    acts = torch.tensor([[[7.0, 0.0, -6.0, 1.0], [0.5, 0.0, 8.0, 5.99], [99.0, 99.0, 99.0, 99.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third position is padding
    counter.update(0, acts, mask)
    counter.update(0, -acts, mask)
    assert counter.over[0].tolist() == [2, 0, 4, 0]  # |a| >= 6, both signs, ties count
    assert counter.tokens.tolist() == [4, 0]
    assert counter.over[1].tolist() == [0, 0, 0, 0]


def test_outlier_features_apply_both_shares():
    counter = OutlierCounter(n_layers=4, d=3, threshold=6.0)
    for layer in range(4):
        acts = torch.zeros(1, 10, 3)
        acts[0, :5, 0] = 10.0  # dim 0: half of the tokens in every layer
        if layer == 0:
            acts[0, :5, 1] = 10.0  # dim 1: half of the tokens in one layer of four
        acts[0, :0, 2] = 10.0  # dim 2: never
        counter.update(layer, acts, torch.ones(1, 10, dtype=torch.long))
    found = counter.outlier_features(min_layer_share=0.5, min_token_share=0.3)
    assert found["dims"] == [0] and found["layer_share"] == [1.0] and found["mean_token_share"] == [0.5]
    assert counter.outlier_features(min_layer_share=0.25, min_token_share=0.3)["dims"] == [0, 1]
    assert counter.outlier_features(min_layer_share=0.25, min_token_share=0.6)["dims"] == []
    assert found["threshold"] == 6.0


def test_values_beyond_the_histogram_range_are_counted():  # regression: histc dropped them
    acts = torch.tensor([[[1e9, 1e-12, 1.0]]])
    stats = StreamingStats(1, 3, top_k=3, keep_entries=3)
    stats.update(0, acts, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    assert stats.count(0) == 3
    assert stats.quantile(0, 1.0) > 1e7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_statistics_equal_those_of_the_same_values_in_float32(dtype):
    """float16/bfloat16 take a shortcut (a count per 16-bit magnitude mapped through a bin table): its
    histogram, ranks, returned top-k (ties included: 16-bit values tie often) and kept entries must be
    exactly those of the float32 path on the same values."""
    batches = [(acts.clamp(-6e4, 6e4).to(dtype), mask, ids, index)
               for acts, mask, ids, index in log_uniform_batches(seed=2)]
    narrow, wide = StreamingStats(1, 24, top_k=30), StreamingStats(1, 24, top_k=30)
    for acts, mask, ids, index in batches:
        got = narrow.update(0, acts, mask, ids, index)
        want = wide.update(0, acts.float(), mask, ids, index)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(narrow.hist, wide.hist) and torch.equal(narrow.rank_sum, wide.rank_sum)
    assert narrow.entries == wide.entries and narrow.count(0) == real_magnitudes(batches).numel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [6.0, 6.01, 0.0])
def test_outlier_counter_equals_abs_compare_in_every_dtype(dtype, threshold):
    """The counter gathers the real tokens' rows before comparing: the same counts as the comparison
    masked afterwards, also for values just below/at/above the threshold, inf, -inf and NaN (not over)."""
    g = torch.Generator().manual_seed(4)
    acts = (torch.randn(3, 10, 8, generator=g) * 4).to(dtype)
    special = torch.tensor([6.0, -6.0, 6.01, -6.01, 5.99, math.inf, -math.inf, math.nan], dtype=dtype)
    acts[0, :, :] = special
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[2, 6:] = 0
    counter = OutlierCounter(1, 8, threshold=threshold)
    counter.update(0, acts, mask)
    want = ((acts.abs() >= threshold) & mask.bool()[..., None]).sum((0, 1))  # torch compares in the acts' dtype
    assert torch.equal(counter.over[0], want) and int(counter.tokens[0]) == 26
