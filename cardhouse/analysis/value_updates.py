"""The value-update decomposition (Sun et al., 2024, Sec. 4.3): the set-C part of attention is an implicit bias.

Each attention output splits exactly into the part read from the values of set C and the part read
from the other tokens (the output projection is linear). Once set C is a sink, its part is nearly
the same vector for every query: ``UpdateSums`` keeps, per layer, the sums that give the pairwise
cosines of those parts across all queries and within each prompt, their norms and the set-C share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..capture import hook_name, record, tokenize_prompts
from ..capture.attention import EAGER, check_implementation, switch_note
from ..models.loading import LoadedModel
from .criterion import Criterion
from .massive_tokens import massive_tokens
from .tokens import token_strings

PARTS = ("c", "rest")


def split_update(probs: torch.Tensor, values: torch.Tensor, in_c: torch.Tensor,
                 o_proj: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output as (part read from set C, part read from the rest): ``[batch, query, d_model]`` each.

    probs ``[batch, head, query, key]`` (``attn.hook_pattern``), values ``[batch, kv_head, key, d_head]``
    (``attn.hook_v``), in_c ``[batch, key]`` bool. The output projection is linear, so
    o(z_C) + o(z_rest) + bias is the module's output; its bias goes to the rest.
    """
    batch, n_heads, n_query, n_key = probs.shape
    v = values.repeat_interleave(n_heads // values.shape[1], dim=1)  # query head h reads kv head h // group (GQA)
    keep = in_c[:, None, :, None].to(v.dtype)
    z_c = probs @ (v * keep)  # [batch, head, query, head_dim]
    z_rest = probs @ (v * (1 - keep))
    flat = lambda z: z.transpose(1, 2).reshape(batch, n_query, -1)  # noqa: E731  heads concatenated
    return nn.functional.linear(flat(z_c), o_proj.weight), o_proj(flat(z_rest))


@dataclass
class UpdateParts:
    layer: int
    tokens: list[str]
    massive_positions: list[int]
    from_c: torch.Tensor  # [query, d_model]
    rest: torch.Tensor  # [query, d_model]
    output: torch.Tensor  # [query, d_model], the attention module's output (hook_attn_out)
    notes: list[str]


def decompose_update(lm: LoadedModel, prompt: str, layer: int, massive_positions: list[int] | None = None, *,
                     criterion: Criterion = Criterion(), implementation: str = EAGER) -> UpdateParts:
    """One prompt's attention output of ``layer`` split into the set-C part and the rest."""
    blocks = lm.blocks
    blocks.check_layer(layer)
    check_implementation(implementation)
    o_proj = blocks.attn_part(layer, "o_proj")  # before any model time: the adapter must name it
    ids = tokenize_prompts(lm, [prompt])[0]
    if massive_positions is None:
        massive_positions = massive_tokens(lm, [ids], criterion)[0][0]
    if any(not 0 <= p < len(ids) for p in massive_positions):
        raise IndexError(f"massive positions {massive_positions} are out of range: the prompt has {len(ids)} tokens")
    in_c = torch.zeros(1, len(ids), dtype=torch.bool)
    in_c[0, massive_positions] = True
    notes = switch_note(lm.model)
    names = {p: hook_name(layer, p) for p in ("attn.hook_v", "attn.hook_pattern", "hook_attn_out")}
    with torch.inference_mode(), record(lm.model, names.values()) as kept:
        lm.model.base_model(input_ids=torch.tensor([ids]), use_cache=False)
        from_c, rest = split_update(kept[names["attn.hook_pattern"]], kept[names["attn.hook_v"]], in_c, o_proj)
    return UpdateParts(layer, token_strings(lm.tokenizer, ids), list(massive_positions), from_c[0].clone(),
                       rest[0].clone(), kept[names["hook_attn_out"]][0].clone(), notes)


class UpdateSums:
    """Per-layer sums of the set-C and rest updates of the ordinary queries."""

    def __init__(self, n_layers: int, d_model: int):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        # sums of unit vectors (pairwise cosine = (|sum|^2 - n) / (n (n - 1)))
        self.unit = {part: zeros(n_layers, d_model) for part in PARTS}
        self.within = {part: zeros(n_layers) for part in PARTS}
        self.n_within, self.n_updates = zeros(n_layers), zeros(n_layers)
        self.norm = {part: zeros(n_layers) for part in PARTS}
        self.share = zeros(n_layers)
        self.error = zeros(n_layers)  # max |C + rest - output| / max |output|

    def add(self, layer: int, parts, output, valid, in_c):
        queries = valid & ~in_c  # [batch, query]: the ordinary tokens
        from_c, rest = parts
        total = (from_c + rest - output)[valid].abs().max() / output[valid].abs().max().clamp(min=1e-30)
        self.error[layer] = max(float(self.error[layer]), float(total))
        norms = {"c": from_c.norm(dim=-1), "rest": rest.norm(dim=-1)}  # [batch, query]
        ok = queries & (norms["c"] > 0) & (norms["rest"] > 0)
        for part, vec in (("c", from_c), ("rest", rest)):
            units = vec / norms[part].clamp(min=1e-30)[..., None]
            for row in range(units.shape[0]):
                s, n = units[row][ok[row]].double().sum(0), float(ok[row].sum())
                self.unit[part][layer] += s
                if n >= 2 and part == "c":
                    self.n_within[layer] += 1
                if n >= 2:
                    self.within[part][layer] += (s.dot(s) - n) / (n * (n - 1))
            self.norm[part][layer] += float(norms[part][ok].sum())
        self.share[layer] += float((norms["c"] / (norms["c"] + norms["rest"]).clamp(min=1e-30))[ok].sum())
        self.n_updates[layer] += float(ok.sum())

    def layer(self, layer: int) -> dict:
        n = float(self.n_updates[layer])
        update = {"queries": int(n), "max_relative_sum_error": float(self.error[layer])}
        if n >= 2:
            for part in PARTS:
                s = self.unit[part][layer]
                update[f"cos_{part}_all"] = float((s.dot(s) - n) / (n * (n - 1)))
                update[f"cos_{part}_within_prompt"] = float(self.within[part][layer] / max(1.0, self.n_within[layer]))
                update[f"norm_{part}"] = float(self.norm[part][layer] / n)
            update["norm_share_c"] = float(self.share[layer] / n)
        return update
