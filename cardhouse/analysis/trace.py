"""Where the BOS token's massive activation comes from: its layer states around layer l (House of Cards
Fig. 3), and the query/key/value trajectories of the massive tokens (Sun et al. Fig. 7).

``find_massive_weights`` already finds layer l, the massive dimension, the top-k intermediate
indices and the massive dimension's path through every layer; this module adds what each
state of the block looks like at position 0: how large, in which dimensions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..capture import hook_name, parse_hook_name, record, run_batches, tokenize_prompts
from ..capture.batches import PromptBatch
from ..models.adapters import UnsupportedModelError
from ..models.loading import LoadedModel
from .criterion import Criterion
from .massive_tokens import massive_tokens
from .massive_weights import find_massive_weights
from .prompts import load_prompts

# the states of one block, in the order the block computes them (House of Cards Fig. 3)
STATES = {
    "h_{l-1}": "hook_resid_pre",
    "norm(h_{l-1})": "attn.hook_in",
    "attention out": "hook_attn_out",
    "h_mid": "hook_resid_mid",  # the residual stream after attention
    "norm(h_mid)": "mlp.hook_in",
    "ffn out": "mlp.hook_out",
    "h_l": "hook_resid_post",
}
# what each sublayer adds to the residual stream, post-norms included (sandwich-norm models rescale
# "attention out" and "ffn out" before adding them)
UPDATES = {"attention update": ("h_mid", "h_{l-1}"), "ffn update": ("h_l", "h_mid")}


@dataclass
class BosTrace:
    model: dict
    layer: int  # l: the layer whose FFN writes the massive activation
    dim: int  # the massive dimension
    indices: list[int]  # the BOS token's top-k intermediate indices in layer l
    states: list[dict]  # per layer: per state (STATES, UPDATES), max |x|, norm, x[dim] and the top dimensions
    intermediate: list[dict]  # per layer: top-k indices and values of the BOS intermediate state
    qkv: list[dict]  # per layer: mean norms of q, k, v on the massive tokens and on the others
    massive_weights: dict  # find_massive_weights(...).to_dict(), with the massive dimension's trace
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def jump(self, state: str = "h_l") -> list[float]:
        """max |state| of the BOS token per layer: the jump at layer l shows here."""
        return [row[state]["max_abs"] for row in self.states]


def _describe(x: torch.Tensor, dim: int, top: int) -> dict:  # x [d]
    values, dims = x.abs().topk(top)
    return {"max_abs": float(values[0]), "norm": float(x.norm()), "at_dim": float(x[dim]),
            "top_dims": dims.tolist(), "top_values": [float(x[i]) for i in dims]}


def qkv_trajectories(lm: LoadedModel, token_lists: list[list[int]], positions: list[list[int]], *,
                     batch_size: int = 8) -> list[dict]:
    """Per layer, the mean norm of the queries, keys and values (``attn.hook_q/k/v``, all heads of a token
    together) on the massive tokens (``positions``, set C of each prompt) and on the other tokens.

    The hook points are after any q/k norms and rotary embeddings; the rotation keeps norms, so for a
    model without q/k norms these are the norms of the q/k/v projections' outputs."""
    n_layers = len(lm.blocks)
    names = ("q", "k", "v")
    sums = {(who, name): torch.zeros(n_layers, dtype=torch.float64) for who in ("massive", "other") for name in names}
    counts = {who: torch.zeros(n_layers, dtype=torch.float64) for who in ("massive", "other")}

    def hooks_for(batch: PromptBatch) -> dict:
        in_c = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
        for row, index in enumerate(batch.prompt_index.tolist()):
            in_c[row, positions[index]] = True
        masks = {"massive": in_c, "other": batch.attention_mask.bool() & ~in_c}

        def observe(hook, x):  # [batch, head, pos, d_head]
            layer, point = parse_hook_name(hook)
            name = point[-1]  # attn.hook_q -> q
            norms = x.transpose(1, 2).flatten(2).norm(dim=-1).double()  # [batch, pos]
            for who, mask in masks.items():
                sums[(who, name)][layer] += norms[mask].sum()
                if name == "q":
                    counts[who][layer] += float(mask.sum())

        return {hook_name(layer, f"attn.hook_{name}"): observe for layer in range(n_layers) for name in names}

    run_batches(lm, token_lists, hooks_for, batch_size=batch_size, progress=False)
    return [{"layer": layer, **{f"{who}_{name}": float(sums[(who, name)][layer] / counts[who][layer])
                                for who in ("massive", "other") for name in names if counts[who][layer] > 0}}
            for layer in range(n_layers)]


def trace_bos(lm: LoadedModel, prompts: list[str] | str = "builtin", *, k: int = 5, layer: int | None = None,
              top: int = 3, n_prompts: int = 8, criterion: Criterion = Criterion(),
              batch_size: int = 8) -> BosTrace:
    """The BOS token's (position 0's) states in every layer, and the q/k/v trajectories of the massive tokens.

    Position 0 sees only itself under causal attention, so one prompt gives its states;
    the q/k/v norms average over the first ``n_prompts`` prompts.
    """
    if isinstance(prompts, str):
        prompts = load_prompts(prompts)
    prompts = prompts[:n_prompts]
    blocks = lm.blocks
    if not 1 <= top <= lm.model.config.hidden_size:
        raise ValueError(f"top={top} is out of range: the model has {lm.model.config.hidden_size} dimensions")
    mw = find_massive_weights(lm, prompts, k=k, layer=layer, n_prompts=n_prompts, batch_size=batch_size,
                              criterion=criterion)
    notes = list(mw.notes)
    n_layers = len(blocks)
    points = [hook_name(l, p) for l in range(n_layers) for p in STATES.values()]
    points += [hook_name(l, "mlp.hook_post") for l in range(n_layers) if not blocks.is_moe_layer(l)]
    ids = tokenize_prompts(lm, prompts)[0]
    with torch.inference_mode(), record(lm.model, points) as store:
        lm.model.base_model(input_ids=torch.tensor([ids]), use_cache=False)
    states = []
    for l in range(n_layers):
        x = {label: store[hook_name(l, p)][0, 0].float() for label, p in STATES.items()}  # position 0: [d]
        x |= {label: x[after] - x[before] for label, (after, before) in UPDATES.items()}
        states.append({"layer": l, **{label: _describe(v, mw.dim, top) for label, v in x.items()}})
    intermediate = []
    if blocks.is_moe:
        notes.append("Mixture of Experts: the intermediate states of MoE layers are not traced (see massive_weights)")
    for l in range(n_layers):
        if not blocks.is_moe_layer(l):
            post = store[hook_name(l, "mlp.hook_post")][0, 0].float()
            values, indices = post.abs().topk(k)
            intermediate.append({"layer": l, "indices": indices.tolist(), "values": [float(post[i]) for i in indices]})
    token_lists = tokenize_prompts(lm, prompts)
    positions, _ = massive_tokens(lm, token_lists, criterion, batch_size=batch_size)
    try:
        qkv = qkv_trajectories(lm, token_lists, positions, batch_size=batch_size)
    except UnsupportedModelError as e:
        qkv = []
        notes.append(f"no q/k/v trajectories: {e}")
    return BosTrace(model=lm.describe(), layer=mw.layer, dim=mw.dim, indices=mw.indices, states=states,
                    intermediate=intermediate, qkv=qkv, massive_weights=mw.to_dict(), notes=notes)
