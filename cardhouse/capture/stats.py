"""Statistics of |activation| computed while streaming, in memory that does not grow with the data.

Per layer: a log-spaced histogram of |a| (median and quantiles to ~0.25% relative
error), the mean over prompts of each prompt's top-k magnitudes (Sun et al. Table 1
ranks) and the largest entries seen with where they sit. ``OutlierCounter`` counts,
per dimension, the tokens with |a| >= a threshold (Dettmers et al.'s outlier features).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LOG10_MIN, LOG10_MAX, BINS = -8.0, 8.0, 6400  # 0.0025 decades per bin


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
        # reduced where the activations are (any device), in float32 whatever the model dtype;
        # the running sums live on the CPU in float64
        pad = ~mask.bool().to(acts.device)
        mag = acts.detach().abs().float().masked_fill_(pad[..., None], 0.0)  # [batch, pos, d]
        # values beyond the histogram's range count in its end bins instead of being dropped
        logs = mag.clamp(10 ** LOG10_MIN, 10 ** LOG10_MAX).log10_()
        # bincount on int32 bin indices is ~5x faster than torch.histc on a CPU (same bins)
        bins = logs.sub_(LOG10_MIN).mul_(BINS / (LOG10_MAX - LOG10_MIN)).to(torch.int32).clamp_(0, BINS - 1)
        counts = torch.bincount(bins.flatten(), minlength=BINS).double()
        counts[0] -= float(pad.sum()) * mag.shape[-1]  # padding fell into the lowest bin
        self.hist[layer] += counts.cpu()
        flat = mag.flatten(1)
        k = min(self.top_k, flat.shape[1])
        values, index = (t.cpu() for t in flat.topk(k, dim=1))
        self.rank_sum[layer, :k] += values.double().sum(0)
        self.prompts[layer] += acts.shape[0]
        self._keep_largest(layer, acts, mask, values, index, token_ids, prompt_index)
        return values, index

    def _keep_largest(self, layer, acts, mask, values, index, token_ids, prompt_index):
        kept = self.entries[layer]
        floor = abs(kept[-1].value) if len(kept) >= self.keep_entries else -1.0
        top = values[:, :self.keep_entries]
        flat_top = top.flatten()
        order = flat_top.topk(min(self.keep_entries, flat_top.numel())).indices
        d, k = acts.shape[-1], top.shape[1]
        new = []
        for i in order.tolist():
            if float(flat_top[i]) <= floor:
                break  # sorted: nothing further can enter the kept list
            row, col = divmod(i, k)
            pos, dim = divmod(int(index[row, col]), d)
            if not mask[row, pos]:
                continue  # a padded position (its |a| was masked to 0) while the kept list is not yet full
            new.append(TopEntry(float(acts[row, pos, dim]), int(prompt_index[row]), pos,
                                int(token_ids[row, pos]), dim))
        if new:
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
        over = (acts.detach().abs() >= self.threshold) & mask.bool().to(acts.device)[..., None]  # [batch, pos, d]
        self.over[layer] += over.sum((0, 1)).cpu()
        self.tokens[layer] += int(mask.sum())

    def outlier_features(self, min_layer_share: float = 0.25, min_token_share: float = 0.06) -> dict:
        """Dimensions with |a| >= threshold on >= min_token_share of tokens in >= min_layer_share of layers."""
        share = self.over.double() / self.tokens.clamp_min(1).double()[:, None]  # [layer, dim]
        layers_over = (share >= min_token_share).double().mean(0)  # [dim]
        dims = (layers_over >= min_layer_share).nonzero().flatten().tolist()
        return {"threshold": self.threshold, "min_layer_share": min_layer_share, "min_token_share": min_token_share,
                "dims": dims, "layer_share": [float(layers_over[d]) for d in dims],
                "mean_token_share": [float(share[:, d].mean()) for d in dims]}
