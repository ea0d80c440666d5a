"""Massive weights (Oh et al., 2024, "House of Cards"): the FFN rows that create the BOS token's
massive activation.

The BOS token's massive activation is written into the residual stream by the FFN of one
early layer l. In that layer's intermediate state act(W_gate x) * (W_up x) a handful of
indices are huge for the BOS token; the rows of W_up and W_gate at the top-k of them are
the massive weights, and the matching W_down columns carry them into the massive dimension.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..capture import hook_name, run_batches, tokenize_prompts
from ..models.loading import LoadedModel
from .criterion import Criterion
from .prompts import load_prompts

_TRACE_POINTS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "mlp.hook_in")


@dataclass
class MassiveWeights:
    layer: int  # the layer whose FFN creates the massive activation
    dim: int  # the hidden dimension it lands in
    k: int
    indices: list[int]  # top-k intermediate indices of the BOS token in that layer
    activations: list[float]  # the intermediate state at those indices
    expert: int | str | None  # the expert holding them (Mixture of Experts; "shared" for the shared expert)
    gated: bool
    stable_across_prompts: bool  # same top-k at position 0 in every prompt (by construction: see note)
    rows: list[dict]  # per index: gate/up row norms, W_down column norm and its entry at `dim`
    super_weight: dict  # the largest |W_down[dim, i]| over the top-k indices (Yu et al.)
    trace: list[dict]  # per layer at position 0: |h| in `dim` and the attention and FFN contributions
    intermediate_size: int
    massive: bool = True  # whether position 0 carries a massive activation at all (by the criterion)
    notes: list[str] = field(default_factory=list)
    # MoE: the carrier's experts in `layer`, largest contribution first (analysis.moe.carrier_experts)
    experts: list[dict] = field(default_factory=list)

    @property
    def n_weights(self) -> int:
        """2 * k * d numbers for a gated FFN (the W_up and W_gate rows), k * d otherwise."""
        return (2 if self.gated else 1) * self.k * self.rows[0]["d_model"] if self.rows else 0

    def to_dict(self) -> dict:
        return {**asdict(self), "n_weights": self.n_weights}


def _position0(lm: LoadedModel, prompts: list[str], n_layers: int, batch_size: int, median_layer: int
               ) -> tuple[dict[str, torch.Tensor], float]:
    """Hidden states at position 0 for every prompt (name -> [prompt, width]), and the median
    |a| over every token of ``median_layer``'s residual stream (the scale "massive" is measured against)."""
    token_lists = tokenize_prompts(lm, prompts)
    rows: dict[str, list[torch.Tensor]] = {}
    order: list[int] = []
    magnitudes: list[torch.Tensor] = []
    median_name = hook_name(median_layer, "hook_resid_post")

    def hooks_for(batch):
        order.extend(batch.prompt_index.tolist())

        def keep(name, acts):
            rows.setdefault(name, []).append(acts[:, 0].float().clone())
            if name == median_name:
                magnitudes.append(acts[batch.attention_mask.bool()].abs().float().flatten())

        return {n: keep for n in names}

    names = [hook_name(l, p) for l in range(n_layers) for p in _TRACE_POINTS]
    names += [hook_name(l, "mlp.hook_post") for l in range(n_layers) if not lm.blocks.is_moe_layer(l)]
    run_batches(lm, token_lists, hooks_for, batch_size=batch_size, progress=False)
    inverse = torch.argsort(torch.tensor(order))
    return {name: torch.cat(parts)[inverse] for name, parts in rows.items()}, float(torch.cat(magnitudes).median())


def find_massive_weights(lm: LoadedModel, prompts: list[str] | str = "builtin", *, k: int = 5,
                         layer: int | None = None, n_prompts: int = 8, batch_size: int = 8,
                         criterion: Criterion = Criterion()) -> MassiveWeights:
    """Locate layer l, the massive dimension and the BOS token's top-k intermediate indices.

    ``layer`` overrides the detected layer. Uses the first ``n_prompts`` prompts: position 0
    sees only itself under causal attention, so more prompts cannot change it.
    """
    blocks = lm.blocks
    n_layers = len(blocks)
    if isinstance(prompts, str):
        prompts = load_prompts(prompts)
    notes = []
    if lm.bos_id is None:
        notes.append("no BOS token is put first: position 0 holds each prompt's first token")
    middle = n_layers // 2
    states, median = _position0(lm, prompts[:n_prompts], n_layers, batch_size, middle)

    def at(l, point):  # [prompt, width]
        return states[hook_name(l, point)]

    dim = int(at(middle, "hook_resid_post")[0].abs().argmax())
    trace = []
    for l in range(n_layers):
        pre, mid, post = at(l, "hook_resid_pre")[0], at(l, "hook_resid_mid")[0], at(l, "hook_resid_post")[0]
        trace.append({"layer": l, "resid_pre": float(pre[dim]), "resid_post": float(post[dim]),
                      "attention": float(mid[dim] - pre[dim]), "ffn": float(post[dim] - mid[dim]),
                      "max_abs_resid_post": float(post.abs().max()), "top_dim_resid_post": int(post.abs().argmax())})
    middle_state = at(middle, "hook_resid_post")[0]
    peak = float(middle_state[dim].abs())
    massive = criterion.is_massive(peak, median)  # the first token's residual vector in the middle layer
    if not massive:
        notes.append(f"no massive activation on the first token (layer {middle}: |a| = {peak:.3g} in dim {dim}, "
                     f"{peak / max(median, 1e-30):.3g} x the median): the rows found are the largest, not massive "
                     "weights; give the layer and indices yourself if you know them")
    sign = 1.0 if middle_state[dim] >= 0 else -1.0
    if layer is None:
        layer = max(range(n_layers), key=lambda l: sign * trace[l]["ffn"])
        if abs(trace[layer]["attention"]) > abs(trace[layer]["ffn"]):
            notes.append(f"in layer {layer} attention contributes more than the FFN to dimension {dim}")
    blocks.check_layer(layer)

    expert, experts = None, []
    mlp_in = at(layer, "mlp.hook_in")
    if blocks.is_moe_layer(layer):
        from .moe import carrier_experts

        # of the carrier's routed experts (and the shared one), the one that writes the massive dimension most
        experts = sorted(carrier_experts(lm, layer, mlp_in[0], dim, k), key=lambda e: -sign * e["contribution"])
        expert = experts[0]["expert"]
        like = blocks.down_weight(layer, expert)  # the stored states are float32 copies: back to the model's dtype
        with torch.inference_mode():
            intermediate = torch.stack([blocks.intermediate(layer, x.to(like.device, like.dtype), expert).cpu()
                                        for x in mlp_in])
        notes.append(f"Mixture of Experts: the BOS token is routed to experts {[e['expert'] for e in experts]}; "
                     f"expert {expert} writes the most into dimension {dim} and holds the massive weights")
    else:
        intermediate = at(layer, "mlp.hook_post")
    if not blocks.is_gated:
        notes.append("no gated MLP: the massive-weight rows are the rows of fc_in (one matrix, not two)")
    intermediate = intermediate.float()
    size = intermediate.shape[-1]
    if not 1 <= k <= size:
        raise ValueError(f"k={k} is out of range: layer {layer} has {size} intermediate indices")
    top = intermediate.abs().topk(k, dim=-1).indices  # [prompt, k]
    stable = all(set(t.tolist()) == set(top[0].tolist()) for t in top)
    indices = top[0].tolist()
    with torch.no_grad():
        rows = _describe_rows(lm, layer, expert, indices, dim)
    best = max(rows, key=lambda r: abs(r["down_at_dim"]))
    return MassiveWeights(
        layer=layer, dim=dim, k=k, indices=indices, activations=[float(intermediate[0, i]) for i in indices],
        expert=expert, gated=blocks.is_gated, stable_across_prompts=stable, rows=rows,
        super_weight={"layer": layer, "row": dim, "column": best["index"], "value": best["down_at_dim"],
                      "matrix": "W_down"},
        trace=trace, intermediate_size=size, massive=massive, notes=notes, experts=experts)


def _describe_rows(lm: LoadedModel, layer: int, expert: int | None, indices: list[int], dim: int) -> list[dict]:
    blocks = lm.blocks
    down = blocks.down_weight(layer, expert)  # [d_model, d_intermediate]
    slices = blocks.neuron_slices(layer, expert)
    weight_slices = [(t, axis, off) for t, axis, off in slices if t.dim() == 2]
    names = ["W_gate", "W_up"] if blocks.is_gated else ["W_in"]
    rows = []
    for i in indices:
        row = {"index": i, "d_model": down.shape[0]}
        for name, (tensor, axis, offset) in zip(names, weight_slices):
            row[f"{name}_norm"] = float(tensor.select(axis, offset + i).norm())
        row["W_down_column_norm"] = float(down[:, i].norm())
        row["down_at_dim"] = float(down[dim, i])
        rows.append(row)
    return rows
