"""Attention and massive activations (Sun et al., 2024, Sec. 4): sinks, concentration and the implicit bias.

The tokens that carry massive activations (set C, ``.massive_tokens``) become attention sinks once
their hidden states are massive: many heads of the later layers put most of their probability on
them (``.sinks``). What those heads add is then nearly the same vector for every query: each
attention output splits exactly into the part read from the values of set C and the part read
from the other tokens, and the set-C part acts as an implicit bias (``.value_updates``).

``analyze_attention`` runs both in one streaming pass over the prompts. It reads the attention
hook points of ``capture.attention`` (probabilities, values, the masked logits for which keys each
query sees) and reduces each layer to per-head and per-key sums inside the hooks, before the next
layer runs: no [layer, head, query, key] tensor outlives its layer. The hook points compute eager
attention, the only kind that materializes probabilities, whatever the model runs otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..capture import hook_name, parse_hook_name, run_batches, tokenize_prompts
from ..capture.attention import EAGER, check_implementation, switch_note
from ..capture.batches import PromptBatch
from ..models.loading import LoadedModel
from .criterion import Criterion
from .massive_tokens import massive_tokens
from .prompts import load_prompts
from .sinks import GROUPS, MASSIVE, SinkSums, token_groups, visible_keys
from .tokens import roles
from .value_updates import UpdateSums, split_update

__all__ = ["GROUPS", "MASSIVE", "AttentionResult", "analyze_attention", "default_head"]


@dataclass
class AttentionResult:
    model: dict
    prompts: int
    tokens: int
    implementation: str
    threshold: float  # a key is a sink in a head if its mean received attention exceeds this
    massive_layer: int | None  # l: the first layer whose output carries a massive activation
    massive_layers: list[int]  # layers whose output carries one
    massive_positions: list[list[int]]  # set C of each prompt
    layers: list[dict]  # per layer: concentration, sink scores per group and head, value-update statistics
    summary: dict  # layers <= l against layers > l
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _summary(layers: list[dict], massive_layer: int | None) -> dict:
    def mean(rows, get):
        values = [v for v in map(get, rows) if v is not None]
        return sum(values) / len(values) if values else None

    split = {"before": [r for r in layers if massive_layer is None or r["layer"] <= massive_layer],
             "after": [r for r in layers if massive_layer is not None and r["layer"] > massive_layer]}
    out = {}
    for name, rows in split.items():
        out[name] = {
            "layers": [r["layer"] for r in rows],
            "concentration": mean(rows, lambda r: sum(r["concentration"]) / len(r["concentration"])),
            "sink_heads": {g: mean(rows, lambda r, g=g: r["sink_heads"].get(g)) for g in GROUPS},
            "sink": {g: mean(rows, lambda r, g=g: (sum(r["sink"][g]) / len(r["sink"][g])) if g in r["sink"] else None)
                     for g in GROUPS},
            **{key: mean(rows, lambda r, key=key: r["update"].get(key))
               for key in ("cos_c_all", "cos_rest_all", "cos_c_within_prompt", "cos_rest_within_prompt",
                           "norm_share_c")},
        }
    return out


def analyze_attention(lm: LoadedModel, prompts: list[str] | str = "builtin", *, criterion: Criterion = Criterion(),
                      threshold: float = 0.3, implementation: str = EAGER, batch_size: int = 8,
                      progress: bool = True) -> AttentionResult:
    """Concentration on set C, attention sinks per token group, and the value-update decomposition, per layer and head.

    Two passes: the first finds set C (``massive_tokens``), the second reads the attention hook points.
    The decomposition needs the output projection in the adapter table (``o_proj``).
    """
    if not 0 < threshold < 1:
        raise ValueError(f"the sink threshold must be between 0 and 1, not {threshold}")
    check_implementation(implementation)
    if isinstance(prompts, str):
        prompts = load_prompts(prompts)
    blocks = lm.blocks
    n_layers, n_heads = len(blocks), blocks.heads[0]
    o_projs = [blocks.attn_part(layer, "o_proj") for layer in range(n_layers)]
    token_lists = tokenize_prompts(lm, prompts)
    positions, massive_layers = massive_tokens(lm, token_lists, criterion, batch_size=batch_size, progress=progress)
    role_lists = [roles(lm.tokenizer, ids, lm.bos_id) for ids in token_lists]
    sinks, updates = SinkSums(n_layers, n_heads), UpdateSums(n_layers, lm.model.config.hidden_size)
    notes = switch_note(lm.model)

    def hooks_for(batch: PromptBatch) -> dict:
        valid = batch.attention_mask.bool()
        in_c, groups = token_groups(batch, positions, role_lists)
        kept: dict = {}  # this batch's current layer, from its hook points until its attention output

        def keep(name, x):
            kept[name] = x

        def keep_visible(name, scores):  # only which keys each query sees: no [head, query, key] logits kept
            kept[name] = visible_keys(scores, valid)

        def reduce(name, output):  # hook_attn_out: the layer's attention is complete
            layer, _ = parse_hook_name(name)
            probs = kept.pop(hook_name(layer, "attn.hook_pattern")).float()
            visible = kept.pop(hook_name(layer, "attn.hook_scores"))
            parts = split_update(probs, kept.pop(hook_name(layer, "attn.hook_v")).float(), in_c, o_projs[layer])
            sinks.add(layer, probs, visible, valid, in_c, groups, threshold)
            updates.add(layer, parts, output.float(), valid, in_c)

        points = (("attn.hook_v", keep), ("attn.hook_scores", keep_visible), ("attn.hook_pattern", keep),
                  ("hook_attn_out", reduce))  # in the order a layer fires them
        return {hook_name(layer, point): fn for layer in range(n_layers) for point, fn in points}

    run_batches(lm, token_lists, hooks_for, batch_size=batch_size, progress=progress, desc="attention")
    massive_layer = massive_layers[0] if massive_layers else None
    if massive_layer is None:
        notes.append("no massive activation by the criterion: set C is empty, concentration and set-C updates are 0")
    layers = [{"layer": layer, **sinks.layer(layer, threshold), "update": updates.layer(layer)}
              for layer in range(n_layers)]
    return AttentionResult(
        model=lm.describe(), prompts=len(prompts), tokens=sum(map(len, token_lists)), implementation=implementation,
        threshold=threshold, massive_layer=massive_layer, massive_layers=massive_layers, massive_positions=positions,
        layers=layers, summary=_summary(layers, massive_layer), notes=notes)


def default_head(result: AttentionResult, layer: int) -> int:
    """The head of ``layer`` that puts the most attention on set C."""
    row = result.layers[layer]["concentration"]
    return max(range(len(row)), key=row.__getitem__)
