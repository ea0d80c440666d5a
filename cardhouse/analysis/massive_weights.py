"""Massive weights (Oh et al., 2024, "House of Cards"): the FFN rows that create the BOS token's
massive activation.

The BOS token's massive activation is written into the residual stream by the FFN of one
early layer l. In that layer's intermediate state act(W_gate x) * (W_up x) a handful of
indices are huge for the BOS token; the rows of W_up and W_gate at the top-k of them are
the massive weights, and the matching W_down columns carry them into the massive dimension.
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

from ..capture import hook_name, run_batches, tokenize_prompts
from ..models.loading import LoadedModel
from ..models.streaming import streamer_of
from .criterion import Criterion
from .experts import carrier_experts
from .massive_activations import ActivationOverflow
from .prompts import load_prompts
from .tokens import roles

CARRIER_SHARE = 0.5  # position 0 stays the carrier while its |a| is at least this share of the largest
_TRACE_POINTS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "mlp.hook_in", "mlp.hook_out")
NOT_MASSIVE = "no massive activation on the first token"  # how the note that says so begins


@dataclass
class MassiveWeights:
    layer: int  # the layer whose FFN creates the massive activation
    dim: int  # the hidden dimension it lands in
    k: int
    indices: list[int]  # top-k intermediate indices of the BOS token in that layer
    activations: list[float]  # the intermediate state at those indices
    expert: int | str | None  # the expert holding them (Mixture of Experts; "shared" for the shared expert)
    gated: bool
    stable_across_prompts: bool  # same top-k at the carrier token in every prompt
    rows: list[dict]  # per index: gate/up row norms, W_down column norm and its entry at `dim`
    super_weight: dict  # Yu et al.'s on the carrier token: W_down[largest |FFN output|, largest |input|] of layer l
    largest_down_entry: dict  # the largest |W_down[dim, i]| over the top-k indices (not the super weight)
    trace: list[dict]  # per layer at the carrier token: |h| in `dim` and the attention and FFN contributions
    intermediate_size: int
    massive: bool = True  # whether the carrier token holds a massive activation at all (by the criterion)
    notes: list[str] = field(default_factory=list)
    # MoE: the carrier's experts in `layer`, largest contribution first (analysis.experts.carrier_experts)
    experts: list[dict] = field(default_factory=list)
    # the token whose state is searched: per prompt its position, its text in the first prompt,
    # and how many prompts give it each role (bos, first token, first delimiter, other)
    carrier: dict = field(default_factory=dict)

    @property
    def n_weights(self) -> int:
        """2 * k * d numbers for a gated FFN (the W_up and W_gate rows), k * d otherwise."""
        return (2 if self.gated else 1) * self.k * self.rows[0]["d_model"] if self.rows else 0

    @property
    def not_massive(self) -> str | None:
        """Why the rows found are not massive weights (the carrier holds no massive activation), or None."""
        return None if self.massive else next((n for n in self.notes if n.startswith(NOT_MASSIVE)), NOT_MASSIVE)

    def to_dict(self) -> dict:
        return {**asdict(self), "n_weights": self.n_weights}


def _locate_carriers(lm: LoadedModel, token_lists: list[list[int]], layer: int, batch_size: int
                     ) -> tuple[list[int], list[float], list[float], float]:
    """Per prompt, the position whose residual state in ``layer`` holds the largest |a|, that |a| and
    the largest |a| at position 0; and the median |a| over every token of the layer (the scale
    "massive" is measured against)."""
    name = hook_name(layer, "hook_resid_post")
    found: dict[int, tuple[int, float, float]] = {}
    magnitudes: list[torch.Tensor] = []

    def hooks_for(batch):
        def keep(_, acts):
            real = batch.attention_mask.bool().to(acts.device)
            peak = acts.abs().float().amax(-1).masked_fill(~real, -1.0)  # [prompt, pos]
            best, where = peak.max(1)
            for row, index in enumerate(batch.prompt_index.tolist()):
                found[index] = (int(where[row]), float(best[row]), float(peak[row, 0]))
            magnitudes.append(acts[real].abs().float().flatten().cpu())

        return {name: keep}

    run_batches(lm, token_lists, hooks_for, batch_size=batch_size, progress=False)
    rows = [found[i] for i in range(len(token_lists))]
    return ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
            float(torch.cat(magnitudes).median()))


def _states_at(lm: LoadedModel, token_lists: list[list[int]], positions: list[int], n_layers: int,
               batch_size: int) -> dict[str, torch.Tensor]:
    """Every hook point's state at one position of each prompt: name -> [prompt, width] (float32)."""
    rows: dict[str, list[torch.Tensor]] = {}
    order: list[int] = []

    def hooks_for(batch):
        index = batch.prompt_index.tolist()
        order.extend(index)
        where = torch.tensor([positions[i] for i in index])

        def keep(name, acts):
            rows.setdefault(name, []).append(acts[torch.arange(len(index), device=acts.device), where.to(acts.device)].float())

        return {n: keep for n in names}

    names = [hook_name(l, p) for l in range(n_layers) for p in _TRACE_POINTS]
    names += [hook_name(l, "mlp.hook_post") for l in range(n_layers) if not lm.blocks.is_moe_layer(l)]
    run_batches(lm, token_lists, hooks_for, batch_size=batch_size, progress=False)
    inverse = torch.argsort(torch.tensor(order))
    return {name: torch.cat(parts)[inverse] for name, parts in rows.items()}


def find_massive_weights(lm: LoadedModel, prompts: list[str] | str = "builtin", *, k: int = 5,
                         layer: int | None = None, n_prompts: int = 8, batch_size: int = 8,
                         criterion: Criterion = Criterion()) -> MassiveWeights:
    """Locate layer l, the massive dimension and the carrier token's top-k intermediate indices.

    The carrier is, per prompt, position 0 (BOS, or the first token) when it holds a massive |a| in
    the middle layer of at least half the prompt's largest, else the token with the largest one
    (the first delimiter or first word of models trained without BOS, e.g. Qwen2.5).
    ``layer`` overrides the detected layer. Uses the first ``n_prompts`` prompts.
    """
    blocks = lm.blocks
    n_layers = len(blocks)
    if isinstance(prompts, str):
        prompts = load_prompts(prompts)
    notes = []
    if lm.bos_id is None:
        notes.append("no BOS token is put first: position 0 holds each prompt's first token")
    middle = n_layers // 2
    token_lists = tokenize_prompts(lm, prompts[:n_prompts])
    where, peaks, first, median = _locate_carriers(lm, token_lists, middle, batch_size)

    def is_massive(value: float) -> bool:
        return criterion.is_massive(value, median)

    # per prompt: position 0 when it is massive and at least half the largest (BOS, as in most models,
    # also when a delimiter carries one as large); else the token with the largest massive activation
    # (models trained without BOS); else position 0, where nothing is massive
    positions = [0 if is_massive(v0) and v0 >= CARRIER_SHARE * v or not is_massive(v) else p
                 for p, v, v0 in zip(where, peaks, first)]
    carrier_roles = [roles(lm.tokenizer, ids, lm.bos_id)[p] for ids, p in zip(token_lists, positions)]
    carrier = {"positions": positions, "token": lm.tokenizer.decode([token_lists[0][positions[0]]]),
               "roles": dict(Counter(carrier_roles))}
    if positions[0] != 0:
        notes.append(f"the massive activation sits on {carrier['token']!r} (position {positions[0]} of the first "
                     f"prompt; roles {carrier['roles']}), not on position 0: the search follows that token")
    states = _states_at(lm, token_lists, positions, n_layers, batch_size)
    broken = [l for l in range(n_layers) if not torch.isfinite(states[hook_name(l, "hook_resid_post")]).all()]
    if broken:
        dtype = lm.describe()["dtype"]
        raise ActivationOverflow(f"the activations overflow {dtype} from layer {broken[0]} on: the carrier token's "
                                 "residual state is not finite; run with --dtype bfloat16 or float32")

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
    massive = is_massive(peak)
    if not massive:
        notes.append(f"{NOT_MASSIVE} (layer {middle}: |a| = {peak:.3g} in dim {dim}, "
                     f"{peak / max(median, 1e-30):.3g} x the median): the rows found are the largest, not massive "
                     "weights; give the layer and indices yourself if you know them")
    sign = 1.0 if middle_state[dim] >= 0 else -1.0
    if layer is None:
        layer = max(range(n_layers), key=lambda l: sign * trace[l]["ffn"])
        if abs(trace[layer]["attention"]) > abs(trace[layer]["ffn"]):
            notes.append(f"in layer {layer} attention contributes more than the FFN to dimension {dim}")
    blocks.check_layer(layer)

    streamer = streamer_of(lm.model)  # a streamed model reads the block whose experts and rows are described
    expert, experts = None, []
    mlp_in = at(layer, "mlp.hook_in")
    if blocks.is_moe_layer(layer):
        with streamer.block(layer) if streamer is not None else nullcontext():
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
    # Yu et al.: the row of the down projection's output spike, the column of its input spike (carrier token)
    sw_row, sw_column = int(at(layer, "mlp.hook_out")[0].abs().argmax()), indices[0]
    with torch.no_grad(), (streamer.block(layer) if streamer is not None else nullcontext()):
        rows = describe_rows(lm, layer, expert, indices, dim)
        sw_value = float(blocks.down_weight(layer, expert)[sw_row, sw_column].detach())
    best = max(rows, key=lambda r: abs(r["down_at_dim"]))
    return MassiveWeights(
        layer=layer, dim=dim, k=k, indices=indices, activations=[float(intermediate[0, i]) for i in indices],
        expert=expert, gated=blocks.is_gated, stable_across_prompts=stable, rows=rows,
        super_weight={"layer": layer, "row": sw_row, "column": sw_column, "value": sw_value, "matrix": "W_down"},
        largest_down_entry={"layer": layer, "row": dim, "column": best["index"], "value": best["down_at_dim"],
                            "matrix": "W_down"},
        trace=trace, intermediate_size=size, massive=massive, notes=notes, carrier=carrier, experts=experts)


def describe_rows(lm: LoadedModel, layer: int, expert: int | None, indices: list[int], dim: int) -> list[dict]:
    """The massive-weight rows ``indices`` of ``layer``'s FFN (``expert``'s on an MoE layer): the norm of each
    row of the input matrices, of the matching W_down column, and W_down's entry in the massive dimension ``dim``
    (shared with the encoder analysis, whose carrier is found differently)."""
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
