"""Statistics of |activation| computed while streaming, in memory that does not grow with the data.

Per layer: a log-spaced histogram of |a| (median and quantiles to ~0.25% relative
error), the mean over prompts of each prompt's top-k magnitudes (Sun et al. Table 1
ranks) and the largest entries seen with where they sit. ``OutlierCounter`` counts,
per dimension, the tokens with |a| >= a threshold (Dettmers et al.'s outlier features).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

LOG10_MIN, LOG10_MAX, BINS = -8.0, 8.0, 6400  # 0.0025 decades per bin


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as the bits of its float with the sign cleared, in the signed integer type of the same width.

    Non-negative floats order like their bit patterns, so comparisons and topk on these integers
    give what they give on |x| (NaN last of all, above inf, as topk ranks it), at the cost of one
    integer pass instead of abs and a cast (float16/bfloat16 arithmetic is slow on most CPUs)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.detach().view(ints) & torch.iinfo(ints).max


def _bins(mag: torch.Tensor) -> torch.Tensor:
    """The histogram bin of each float32 |a|; values beyond the range count in the end bins."""
    logs = mag.clamp(10 ** LOG10_MIN, 10 ** LOG10_MAX).log10_()
    return logs.sub_(LOG10_MIN).mul_(BINS / (LOG10_MAX - LOG10_MIN)).to(torch.int32).clamp_(0, BINS - 1)


@functools.cache  # one small table per (dtype, device); never changed once built
def _bins_of_16bit(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Bin of each of the 2^15 magnitudes of a 16-bit float (index: its bits without the sign)."""
    codes = torch.arange(1 << 15, dtype=torch.int16).view(dtype).float()
    return _bins(codes).long().to(device)


@dataclass
class TopEntry:
    value: float  # signed activation
    prompt: int
    position: int
    token_id: int
    dim: int


@dataclass
class LayerStats:
    count: int
    prompts: int
    median: float
    quantiles: dict[str, float]  # "top 1%" -> magnitude at the 99th percentile, ...
    top_ranks: list[float]  # mean over prompts of the k-th largest |a| in a prompt, k = 1..
    top_entries: list[TopEntry]

    def table1(self) -> dict[str, float]:
        ranks = {f"top-{k}": self.top_ranks[k - 1] for k in (1, 2, 3, 4, 5, 10, 100) if k <= len(self.top_ranks)}
        return {**ranks, **self.quantiles, "median": self.median}


@dataclass
class StreamingStats:
    """Accumulate the statistics of one hook point over many batches."""

    n_layers: int
    d: int
    top_k: int = 100
    keep_entries: int = 32
    hist: torch.Tensor = field(init=False)
    rank_sum: torch.Tensor = field(init=False)
    prompts: list[int] = field(init=False)
    entries: list[list[TopEntry]] = field(init=False)

    def __post_init__(self):
        self.hist = torch.zeros(self.n_layers, BINS, dtype=torch.float64)
        self.rank_sum = torch.zeros(self.n_layers, self.top_k, dtype=torch.float64)
        self.prompts = [0] * self.n_layers
        self.entries = [[] for _ in range(self.n_layers)]

    def update(self, layer: int, acts: torch.Tensor, mask: torch.Tensor, token_ids: torch.Tensor,
               prompt_index: torch.Tensor) -> torch.Tensor:
        """Add one batch ``acts [batch, pos, d]`` (``mask [batch, pos]`` marks real tokens).

        Returns each prompt's top-k flat indices into ``pos * d`` and their |a|, for callers
        that look closer at the largest values: ``(values [batch, k], flat_index [batch, k])``.
        """
        # reduced where the activations are (any device); the running sums live on the CPU in float64.
        # |a| is read as the float's bits with the sign cleared: one cheap integer pass, no cast, and
        # integers that order exactly like |a| (so topk picks the same entries, ties included)
        pad = ~mask.bool().to(acts.device)
        bits = magnitude_bits(acts).contiguous()  # [batch, pos, d]
        pad_rows = pad.flatten().nonzero().flatten()
        bits.view(-1, acts.shape[-1]).index_fill_(0, pad_rows, 0)  # padding reads as |a| = 0 (whole rows: fast)
        n_pad = len(pad_rows) * acts.shape[-1]  # ... and is taken out of the lowest bin below
        if bits.element_size() == 2:
            # float16/bfloat16 hold only 2^15 magnitudes: count each, then add the counts into the
            # histogram's bins through a table built with the same float32 formula (identical bins)
            counts16 = torch.bincount(bits.flatten(), minlength=1 << 15)
            counts16[0] -= n_pad
            lut = _bins_of_16bit(acts.dtype, acts.device)
            counts = torch.zeros(BINS, dtype=torch.long, device=acts.device).scatter_add_(0, lut, counts16).double()
        else:
            # bincount on int32 bin indices is ~5x faster than torch.histc on a CPU (same bins)
            counts = torch.bincount(_bins(bits.view(acts.dtype).float()).flatten(), minlength=BINS).double()
            counts[0] -= n_pad
        self.hist[layer] += counts.cpu()
        flat = bits.flatten(1)
        k = min(self.top_k, flat.shape[1])
        top, index = (t.cpu() for t in flat.topk(k, dim=1))
        values = top.view(acts.dtype).float()  # the |a| themselves, exact in float32
        self.rank_sum[layer, :k] += values.double().sum(0)
        self.prompts[layer] += acts.shape[0]
        self._keep_largest(layer, acts, mask, values, index, token_ids, prompt_index)
        return values, index

    def _keep_largest(self, layer, acts, mask, values, index, token_ids, prompt_index):
        kept = self.entries[layer]
        floor = abs(kept[-1].value) if len(kept) >= self.keep_entries else -1.0
        if float(values[:, 0].max()) <= floor:
            return  # the usual case once the list is full: no prompt of this batch beats the smallest kept
        top = values[:, :self.keep_entries]
        flat_top = top.flatten()
        order = flat_top.topk(min(self.keep_entries, flat_top.numel())).indices
        order = order[~(flat_top[order] <= floor)]  # sorted: what is not above the floor cannot enter the list
        d, k = acts.shape[-1], top.shape[1]
        rows = order // k
        pos, dim = index[rows, order % k].div(d, rounding_mode="floor"), index[rows, order % k] % d
        real = mask[rows, pos].bool()  # not a padded position (its |a| was masked to 0)
        rows, pos, dim = rows[real], pos[real], dim[real]
        if not len(rows):
            return
        device = acts.device
        signed = acts[rows.to(device), pos.to(device), dim.to(device)].tolist()  # one gather, one transfer
        new = [TopEntry(*entry) for entry in zip(signed, prompt_index[rows].tolist(), pos.tolist(),
                                                 token_ids[rows, pos].tolist(), dim.tolist())]
        self.entries[layer] = sorted(kept + new, key=lambda e: -abs(e.value))[:self.keep_entries]

    def quantile(self, layer: int, q: float) -> float:
        counts = self.hist[layer]
        total = counts.sum()
        if total == 0:
            return float("nan")
        cdf = counts.cumsum(0)
        b = int(torch.searchsorted(cdf, torch.tensor(q * float(total), dtype=torch.float64)))
        b = min(b, BINS - 1)
        width = (LOG10_MAX - LOG10_MIN) / BINS
        return 10 ** (LOG10_MIN + (b + 0.5) * width)

    def median(self, layer: int) -> float:
        return self.quantile(layer, 0.5)

    def count(self, layer: int) -> int:
        return int(self.hist[layer].sum())

    def result(self, layer: int) -> LayerStats:
        prompts = max(self.prompts[layer], 1)
        return LayerStats(
            count=self.count(layer),
            prompts=self.prompts[layer],
            median=self.median(layer),
            quantiles={"top 1%": self.quantile(layer, 0.99), "top 10%": self.quantile(layer, 0.90)},
            top_ranks=(self.rank_sum[layer] / prompts).tolist(),
            top_entries=list(self.entries[layer]),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hist, self.rank_sum))


@dataclass
class OutlierCounter:
    """Per layer and dimension, how many tokens have |a| >= threshold (and how many tokens there were)."""

    n_layers: int
    d: int
    threshold: float = 6.0
    over: torch.Tensor = field(init=False)  # [layer, dim]
    tokens: torch.Tensor = field(init=False)  # [layer]

    def __post_init__(self):
        self.over = torch.zeros(self.n_layers, self.d, dtype=torch.long)
        self.tokens = torch.zeros(self.n_layers, dtype=torch.long)

    def update(self, layer: int, acts: torch.Tensor, mask: torch.Tensor) -> None:
        # counted on the bits of |a| (magnitude_bits) by a subtraction and a sign shift, ~4x faster on a CPU
        # than comparing floats into bools; the threshold is rounded to the activations' dtype, as a
        # comparison in that dtype rounds it
        bits = magnitude_bits(acts).contiguous().view(-1, acts.shape[-1])  # [batch * pos, d]
        pad_rows = (~mask.bool().to(acts.device)).flatten().nonzero().flatten()
        bits.index_fill_(0, pad_rows, -1)  # below any threshold
        low, inf = (int(magnitude_bits(torch.tensor(max(v, 0.0), dtype=acts.dtype))) for v in (self.threshold, math.inf))
        below = (bits - low) >> (8 * bits.element_size() - 1)  # -1 where |a| < threshold, else 0 (no overflow)
        over = bits.shape[0] + below.sum(0)
        if int(bits.max()) > inf:  # NaN (bits above inf's) is not over, as in float
            over -= (bits > inf).sum(0)
        self.over[layer] += over.cpu()
        self.tokens[layer] += int(mask.sum())

    def outlier_features(self, min_layer_share: float = 0.25, min_token_share: float = 0.06) -> dict:
        """Dimensions with |a| >= threshold on >= min_token_share of tokens in >= min_layer_share of layers."""
        share = self.over.double() / self.tokens.clamp_min(1).double()[:, None]  # [layer, dim]
        layers_over = (share >= min_token_share).double().mean(0)  # [dim]
        dims = (layers_over >= min_layer_share).nonzero().flatten().tolist()
        return {"threshold": self.threshold, "min_layer_share": min_layer_share, "min_token_share": min_token_share,
                "dims": dims, "layer_share": [float(layers_over[d]) for d in dims],
                "mean_token_share": [float(share[:, d].mean()) for d in dims]}
