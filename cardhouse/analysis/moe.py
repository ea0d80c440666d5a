"""Mixture of Experts: where the carrier token is routed, which expert holds the massive weights,
and the super experts.

House of Cards (Fig. 5, Table 7): in Mixtral the router sends the BOS token to one expert with
probability near 1 in the layer whose FFN writes the massive activation, and the massive weights
are rows of that expert. Su et al. (2025, "Unveiling Super Experts in Mixture-of-Experts LLMs")
find a few experts whose down-projection outputs are extreme; pruning them breaks the model.

The router's logits and the experts' inputs (tokens, chosen experts, weights) are read at the MoE hook
points (``capture.moe``), attached per batch like any named hook. Only the per-expert down-projection outputs are recomputed, for the
tokens routed to each expert: 3-D expert tensors have no module boundary per expert. Every
statistic is a running sum or maximum, so the calibration set can be as long as one likes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..capture import hook_name, parse_hook_name, run_batches, tokenize_prompts
from ..models.adapters import SHARED
from ..models.loading import LoadedModel
from ..models.offload import shapes_only
from ..models.routing import routing_of
from .criterion import Criterion
from .massive_weights import find_massive_weights
from .prompts import load_prompts

CARRIER = 0  # the carrier token's position: BOS, or the first token without one
PERCENTILE, FRACTION = 99.5, 0.1  # Su et al.'s super-expert rule (both options)
COLLAPSE = 0.9  # the carrier's routing has collapsed where its top-1 probability reaches this


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


@dataclass
class _Sums:
    """Running sums of one token group's routing in one layer."""

    probs: torch.Tensor
    chosen: torch.Tensor  # how often each expert is among the top-k
    entropy: float = 0.0
    top1: float = 0.0
    tokens: int = 0

    @classmethod
    def empty(cls, n_experts: int) -> "_Sums":
        return cls(torch.zeros(n_experts, dtype=torch.float64), torch.zeros(n_experts, dtype=torch.float64))

    def add(self, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        probs = probs.double()  # float64 sums whatever the model's dtype; kept on the CPU
        self.probs += probs.sum(0).cpu()
        n, chosen = self.chosen.numel(), chosen.flatten()
        self.chosen += torch.bincount(chosen[chosen < n].cpu(), minlength=n).double()  # past-the-end: padding
        self.entropy += float(_entropy(probs).sum())
        self.top1 += float(probs.max(-1).values.double().sum())
        self.tokens += probs.shape[0]

    def summary(self) -> dict:
        n = max(self.tokens, 1)
        probs = self.probs / n
        return {"probs": probs.tolist(), "chosen": (self.chosen / n).tolist(), "entropy": self.entropy / n,
                "top1": self.top1 / n, "top1_expert": int(probs.argmax()), "tokens": self.tokens}


@dataclass
class _Max:
    """Running maximum of |down-projection output| of one expert, and where it happened."""

    value: float = 0.0
    where: dict = field(default_factory=dict)
    tokens: int = 0  # tokens routed to it

    def add(self, out: torch.Tensor, rows: torch.Tensor, batch, width: int) -> None:
        self.tokens += out.shape[0]
        flat = out.abs().float()
        value = float(flat.max()) if flat.numel() else 0.0
        if value > self.value:
            row, dim = divmod(int(flat.argmax()), flat.shape[-1])
            token = int(rows[row])
            b, position = divmod(token, width)
            self.value = value
            self.where = {"prompt": int(batch.prompt_index[b]), "position": position, "dim": dim,
                          "token_id": int(batch.input_ids[b, position])}


@dataclass
class MoEAnalysis:
    model: dict
    moe_layers: list[int]
    n_experts: int
    top_k: int
    shared_expert: bool
    prompts: int
    router: list[dict]  # per MoE layer: the carrier's and the ordinary tokens' routing
    collapse: float
    collapse_layer: int | None  # the first layer where the carrier's top-1 probability >= collapse
    collapsed_layers: list[int]
    super_experts: dict  # per-expert maxima, the thresholds and the flagged experts
    massive_weights: dict | None = None  # find_massive_weights' result, with the carrier's experts
    notes: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[tuple[int, int]]:
        return [(e["layer"], e["expert"]) for e in self.super_experts["flagged"]]

    def to_dict(self) -> dict:
        return asdict(self)


def super_expert_rule(maxima: dict[tuple[int, int], float], *, percentile: float = PERCENTILE,
                      fraction: float = FRACTION) -> tuple[list[tuple[int, int]], float]:
    """The experts whose max |output| is above the ``percentile`` of all experts' maxima and above
    ``fraction`` of the largest maximum in their layer (Su et al.'s rule); and that percentile."""
    if not 0 <= percentile <= 100 or not 0 <= fraction <= 1:
        raise ValueError(f"percentile must be in 0..100 and fraction in 0..1, got {percentile} and {fraction}")
    values = torch.tensor(list(maxima.values()), dtype=torch.float64)
    cut = float(torch.quantile(values, percentile / 100))
    layer_max: dict[int, float] = {}
    for (layer, _), v in maxima.items():
        layer_max[layer] = max(layer_max.get(layer, 0.0), v)
    flagged = [key for key, v in maxima.items() if v > cut and v > fraction * layer_max[key[0]]]
    return sorted(flagged, key=lambda key: -maxima[key]), cut


def analyze_moe(lm: LoadedModel, prompts: list[str] | str = "builtin", *, k: int = 5, layer: int | None = None,
                collapse: float = COLLAPSE, percentile: float = PERCENTILE, fraction: float = FRACTION,
                batch_size: int = 8, progress: bool = True, massive_weights: bool = True,
                criterion: Criterion = Criterion()) -> MoEAnalysis:
    """Router picture, the carrier's experts in the massive-weight layer, and the super experts.

    ``prompts`` is the calibration set (the carrier is position ``CARRIER`` of each prompt; every other
    real token is an ordinary token). ``layer`` overrides the detected massive-weight layer.
    """
    blocks = lm.blocks
    routing = routing_of(blocks.adapter)
    if not 0 < collapse <= 1:
        raise ValueError(f"collapse must be in (0, 1], got {collapse}")
    super_expert_rule({(0, 0): 1.0}, percentile=percentile, fraction=fraction)  # check the options before model time
    if isinstance(prompts, str):
        prompts = load_prompts(prompts)
    token_lists = tokenize_prompts(lm, prompts)
    layers = blocks.moe_layers
    with shapes_only():  # a streamed model's blocks are shapes on the meta device until each is read
        n_experts = {l: blocks.n_experts(l) for l in layers}
    groups = {l: {g: _Sums.empty(n_experts[l]) for g in ("carrier", "ordinary")} for l in layers}
    maxima = {(l, e): _Max() for l in layers for e in range(n_experts[l])}
    shared_max = {l: _Max() for l in layers if blocks.ffn(l).shared_expert}
    top_k = {}

    def hooks_for(batch):
        # every hook reads its batch from this closure: a streamed model runs every batch through block l before
        # block l + 1 (block-major), an ordinary one batch by batch, and the hooks are attached per batch
        mask = batch.attention_mask.bool()
        width, valid = mask.shape[1], mask.flatten()
        carrier = torch.zeros_like(mask)
        carrier[:, CARRIER] = True
        carrier = carrier.flatten() & valid
        groups_of = {"carrier": carrier, "ordinary": valid & ~carrier}

        def on_router(name, outputs):
            logits, _, chosen = outputs
            layer = parse_hook_name(name)[0]
            top_k[layer] = chosen.shape[-1]
            probs = routing.probabilities(logits)
            for group, rows in groups_of.items():
                rows = rows.to(probs.device)
                groups[layer][group].add(probs[rows], chosen[rows.to(chosen.device)])

        def on_experts(name, inputs):
            x, chosen, _ = inputs
            layer = parse_hook_name(name)[0]
            # Blocks.intermediate's computation, with the 3-D tensors fetched once per call: a model dispatched by
            # accelerate keeps them on the CPU or on disk between forward passes (``get`` finds them there)
            fused, down = blocks.mlp_part(layer, "up"), blocks.mlp_part(layer, "down")
            act, here = blocks.mlp_part(layer, "act"), valid.to(chosen.device)
            for expert in chosen[here].unique().tolist():
                if not 0 <= expert < n_experts[layer]:
                    continue  # some implementations pad with an index past the last expert
                rows = (here & (chosen == expert).any(-1)).nonzero().flatten()
                gate, up = nn.functional.linear(x[rows.to(x.device)], fused[expert].to(x.device)).chunk(2, dim=-1)
                out = nn.functional.linear(act(gate) * up, down[expert].to(x.device))
                maxima[(layer, expert)].add(out, rows.cpu(), batch, width)

        def on_shared(name, out):
            rows = valid.nonzero().flatten()
            shared_max[parse_hook_name(name)[0]].add(out.reshape(-1, out.shape[-1])[rows.to(out.device)], rows,
                                                     batch, width)

        return {**{hook_name(l, "mlp.hook_router"): on_router for l in layers},
                **{hook_name(l, "mlp.hook_experts_in"): on_experts for l in layers},
                **{hook_name(l, "mlp.hook_shared_out"): on_shared for l in shared_max}}

    run_batches(lm, token_lists, hooks_for, batch_size=batch_size, progress=progress, desc="MoE")
    router = []
    for l in layers:
        router.append({"layer": l, "n_experts": n_experts[l], "top_k": top_k.get(l, 0),
                       "max_entropy": float(torch.log(torch.tensor(float(n_experts[l])))),
                       **{g: s.summary() for g, s in groups[l].items()}})
    collapsed = [r["layer"] for r in router if r["carrier"]["top1"] >= collapse]
    values = {key: m.value for key, m in maxima.items()}
    flagged, cut = super_expert_rule(values, percentile=percentile, fraction=fraction) if values else ([], 0.0)
    table = [{"layer": l, "expert": e, "max_abs": m.value, "tokens": m.tokens, **m.where}
             for (l, e), m in maxima.items()]
    super_experts = {
        "percentile": percentile, "fraction": fraction, "threshold": cut,
        "layer_max": {str(l): max(values[(l, e)] for e in range(n_experts[l])) for l in layers},
        "flagged": [{"layer": l, "expert": e, "max_abs": values[(l, e)], "tokens": maxima[(l, e)].tokens,
                     **maxima[(l, e)].where} for l, e in flagged],
        "experts": table,
        "shared": [{"layer": l, "expert": SHARED, "max_abs": m.value, "tokens": m.tokens, **m.where}
                   for l, m in shared_max.items()],
    }
    notes = []
    dense = [l for l in range(len(blocks)) if l not in layers]
    if dense:
        notes.append(f"dense FFN layers (no router): {dense}")
    if lm.bos_id is None:
        notes.append("no BOS token is put first: the carrier is each prompt's first token")
    mw = None
    if massive_weights:
        mw = find_massive_weights(lm, prompts, k=k, layer=layer, batch_size=batch_size, criterion=criterion).to_dict()
        if mw["layer"] not in layers:
            notes.append(f"the massive-weight layer {mw['layer']} is a dense FFN layer: no expert holds them")
    first = layers[0] if layers else None
    return MoEAnalysis(model=lm.describe(), moe_layers=layers, n_experts=n_experts.get(first, 0),
                       top_k=top_k.get(first, 0), shared_expert=bool(shared_max), prompts=len(prompts), router=router,
                       collapse=collapse, collapse_layer=collapsed[0] if collapsed else None,
                       collapsed_layers=collapsed,
                       super_experts=super_experts, massive_weights=mw, notes=notes)
