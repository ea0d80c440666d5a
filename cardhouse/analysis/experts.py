"""The carrier's experts in one Mixture-of-Experts layer: where the router sends the carrier token's FFN
input, and what each chosen expert (and the shared one) writes into a hidden dimension.

The massive-weight search reads this to find the expert that holds the massive weights (House of
Cards Table 7); the MoE analysis (``analysis.moe``) runs that search. Both import this module.
"""

from __future__ import annotations

import torch

from ..models.adapters import SHARED
from ..models.loading import LoadedModel
from ..models.routing import routing_of


def carrier_experts(lm: LoadedModel, layer: int, x: torch.Tensor, dim: int, k: int) -> list[dict]:
    """The experts that the carrier's FFN input ``x`` ``[d]`` is sent to in ``layer`` (the router's own
    forward), and the shared expert where the family has one: for each, its routing weight, what it
    adds to hidden dimension ``dim`` and its top-k intermediate indices (House of Cards Table 7)."""
    blocks = lm.blocks
    routing_of(blocks.adapter)
    layout = blocks.ffn(layer)
    mlp = blocks.part(layer, "mlp")
    with torch.inference_mode():
        down = blocks.mlp_part(layer, "down")
        x = x.to(device=down.device, dtype=down.dtype)
        _, weights, chosen = blocks.mlp_part(layer, "router")(x[None])
        rows = [(int(e), float(w)) for e, w in zip(chosen[0], weights[0])]
        if layout.shared_expert:
            gate = getattr(mlp, layout.shared_expert_gate) if layout.shared_expert_gate else None
            rows.append((SHARED, float(torch.sigmoid(gate(x)).squeeze()) if gate is not None else 1.0))
        out = []
        for expert, weight in rows:
            inter = blocks.intermediate(layer, x, expert).float()
            contribution = weight * float(blocks.down_weight(layer, expert)[dim].float() @ inter)
            top = inter.abs().topk(min(k, inter.numel())).indices.tolist()
            out.append({"expert": expert, "weight": weight, "contribution": contribution, "indices": top,
                        "activations": [float(inter[i]) for i in top]})
    return out
