"""Attention sinks and concentration on set C (Sun et al., 2024, Sec. 4.2), reduced layer by layer.

Per head: the share of each ordinary query's probability that lands on set C (concentration),
and each key's sink score, the mean probability it receives from the queries that can see it,
per token group (set C and the roles of ``.tokens``). Only sums outlive a layer.
"""

from __future__ import annotations

import torch

from ..capture.batches import PromptBatch
from .tokens import ROLES

MASSIVE = "massive"  # the token group "set C", beside the roles of .tokens
GROUPS = (MASSIVE, *ROLES)


def token_groups(batch: PromptBatch, positions: list[list[int]],
                 role_lists: list[list[str]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Set C (``in_c``) and every group's members in a batch: ``[batch, pos]`` bool each."""
    width = batch.input_ids.shape[1]
    rows = batch.prompt_index.tolist()
    in_c = torch.zeros(len(rows), width, dtype=torch.bool)
    groups = {g: torch.zeros(len(rows), width, dtype=torch.bool) for g in GROUPS}
    for r, i in enumerate(rows):
        in_c[r, positions[i]] = True
        for pos, role in enumerate(role_lists[i]):
            groups[role][r, pos] = True
    groups[MASSIVE] = in_c
    return in_c, groups


def visible_keys(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Which keys each real query can see, ``[batch, query, key]`` bool, from ``attn.hook_scores``: the
    model's own mask (causal, padding, sliding window) added the dtype's minimum where a key is hidden."""
    n = valid.shape[1]
    return (scores[:, 0, :, :n] > torch.finfo(scores.dtype).min / 2) & valid[:, :, None]


class SinkSums:
    """Per-layer sums of concentration and sink scores."""

    def __init__(self, n_layers: int, n_heads: int):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.to_c, self.queries = zeros(n_layers, n_heads), zeros(n_layers)
        self.sink = {g: zeros(n_layers, n_heads) for g in GROUPS}
        self.sink_above = {g: zeros(n_layers, n_heads) for g in GROUPS}
        self.keys = {g: zeros(n_layers) for g in GROUPS}

    def add(self, layer: int, probs, visible, valid, in_c, groups, threshold: float):
        queries = valid & ~in_c  # [batch, query]: the ordinary tokens' view of C
        qf = queries.to(probs.dtype)
        # share of each ordinary query's probability that lands on set C, summed per head
        self.to_c[layer] += torch.einsum("bhqk,bk,bq->h", probs, in_c.to(probs.dtype), qf).double()
        self.queries[layer] += float(qf.sum())
        # sink score: mean probability a key receives from the queries that can see it
        received = torch.einsum("bhqk,bq->bhk", probs, valid.to(probs.dtype))  # masked entries are 0
        score = received / visible.sum(1).clamp(min=1)[:, None, :]  # [batch, head, key]
        for g, member in groups.items():  # member [batch, key]
            m = member[:, None, :]
            self.sink[g][layer] += (score * m).sum((0, 2)).double()
            self.sink_above[g][layer] += ((score > threshold) & m).sum((0, 2)).double()
            self.keys[g][layer] += float(member.sum())

    def layer(self, layer: int, threshold: float) -> dict:
        heads = lambda t: [round(float(x), 6) for x in t]  # noqa: E731
        sink = {g: heads(self.sink[g][layer] / self.keys[g][layer]) for g in GROUPS if self.keys[g][layer] > 0}
        return {
            "concentration": heads(self.to_c[layer] / self.queries[layer].clamp(min=1)),
            "sink": sink,
            "sink_heads": {g: sum(x > threshold for x in v) / len(v) for g, v in sink.items()},
            "sink_rate": {g: heads(self.sink_above[g][layer] / self.keys[g][layer])
                          for g in GROUPS if self.keys[g][layer] > 0},
        }
