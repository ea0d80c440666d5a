"""How a Mixture-of-Experts router turns its logits into expert weights (the adapter's ``routing``).

transformers 5 routers (``mlp.gate``) return ``(logits, top-k weights, top-k experts)``: cardhouse
records those with hooks and recomputes routing only where it changes it, to route around ablated
experts. A family with another rule (DeepSeek's group-limited top-k) gets its own
entry in ``ROUTINGS`` and names it in its adapter (DeepSeek-V2 and -V3 have theirs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .adapters import Adapter, Blocks, UnsupportedModelError


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def _softmax_topk(router, logits: torch.Tensor, top_k: int, normalise: bool, exclude: Sequence[int]):
    """Mixtral / Qwen-MoE / OLMoE: softmax over every expert, top-k, optionally renormalised; ``exclude``
    get probability 0, so the others share what they had (route around them)."""
    masked = logits.float().clone()
    masked[..., list(exclude)] = float("-inf")
    probs = torch.softmax(masked, dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def _sigmoid_group_topk(router, logits: torch.Tensor, top_k: int, normalise: bool, exclude: Sequence[int]):
    """DeepSeek-V3: sigmoid affinities plus a load-balancing bias choose the experts, within the ``topk_group``
    best of ``n_group`` groups; the weights are the affinities, optionally renormalised, times
    ``routed_scaling_factor``. ``exclude`` can never be chosen (its choice score is -inf)."""
    scores = torch.sigmoid(logits.float())
    choice = scores + router.e_score_correction_bias
    choice[..., list(exclude)] = float("-inf")
    groups = choice.view(-1, router.num_group, router.num_experts // router.num_group)
    group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(router.topk_group, dim=-1).indices, 1)
    keep = keep.bool().unsqueeze(-1).expand_as(groups).reshape(choice.shape)
    experts = choice.masked_fill(~keep, float("-inf")).topk(top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if normalise:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, experts


def _softmax_group_greedy(router, logits: torch.Tensor, top_k: int, normalise: bool, exclude: Sequence[int]):
    """DeepSeek-V2: softmax over every expert (``exclude`` at probability 0, the others renormalised), then
    the greedy top-k, or with ``topk_method="group_limited_greedy"`` the top-k within the ``topk_group``
    groups whose best expert scores highest; weights times ``routed_scaling_factor``."""
    masked = logits.float().clone()
    masked[..., list(exclude)] = float("-inf")
    scores = torch.softmax(masked, dim=-1)
    if router.topk_method == "group_limited_greedy":
        groups = scores.view(-1, router.num_group, router.num_experts // router.num_group)
        best = groups.max(dim=-1).values.topk(router.topk_group, dim=-1).indices
        keep = torch.zeros_like(groups[..., 0]).scatter_(1, best, 1).bool().unsqueeze(-1).expand_as(groups)
        scores = scores.masked_fill(~keep.reshape(scores.shape), 0.0)
    weights, experts = torch.topk(scores, top_k, dim=-1)
    if normalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * router.routed_scaling_factor, experts


@dataclass(frozen=True)
class Routing:
    probabilities: Callable[[torch.Tensor], torch.Tensor]  # logits [..., experts] -> a distribution over experts
    # (router module, logits, top_k, normalise, exclude) -> (weights, experts), as the family's router computes them
    route: Callable[..., tuple[torch.Tensor, torch.Tensor]]


ROUTINGS: dict[str, Routing] = {"softmax-topk": Routing(_softmax, _softmax_topk),
                                "softmax-group-greedy": Routing(_softmax, _softmax_group_greedy),
                                # sigmoid affinities are no distribution: the analyses read the softmax of the same
                                # logits, which singles out one expert exactly when the logits do
                                "sigmoid-group-topk": Routing(_softmax, _sigmoid_group_topk)}


def routing_of(adapter: Adapter) -> Routing:
    """The family's routing rule, or a clear error saying which adapter fields to add."""
    if adapter.mlp_layout != "experts":
        raise ValueError(f"the {adapter.family} model is dense (no Mixture-of-Experts layers): "
                         "expert analyses and attacks need an MoE model")
    if adapter.router is None or adapter.experts is None or adapter.routing not in ROUTINGS:
        raise UnsupportedModelError(
            f"the {adapter.family} adapter does not describe its router: set `router` (mlp -> router module "
            "returning (logits, weights, experts)), `experts` (mlp -> the 3-D expert tensors' module) and "
            f"`routing` (one of {', '.join(ROUTINGS)}) in its entry of cardhouse/models/adapters.py "
            f"(now router={adapter.router!r}, experts={adapter.experts!r}, routing={adapter.routing!r})")
    return ROUTINGS[adapter.routing]


def normalises(blocks: Blocks, layer: int) -> bool:
    """Whether ``layer``'s router renormalises its top-k weights."""
    norm = blocks.adapter.router_norm
    return norm if isinstance(norm, bool) else bool(getattr(blocks.mlp_part(layer, "router"), norm))
