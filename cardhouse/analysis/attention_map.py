"""Heat maps of one head (Sun et al., 2024, Figs. 5-6): its attention logits and probabilities for one prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import hook_name, record, tokenize_prompts
from ..capture.attention import EAGER, check_implementation, switch_note
from ..models.loading import LoadedModel
from .tokens import token_strings


@dataclass
class AttentionMap:
    layer: int
    head: int
    tokens: list[str]
    logits: torch.Tensor  # [query, key], NaN where masked
    probs: torch.Tensor  # [query, key]
    notes: list[str]


def check_head(lm: LoadedModel, head: int) -> int:
    n_heads = lm.blocks.heads[0]
    if not 0 <= head < n_heads:
        raise IndexError(f"head {head} is out of range: the model has heads 0..{n_heads - 1}")
    return head


def attention_map(lm: LoadedModel, prompt: str, layer: int, head: int, *,
                  implementation: str = EAGER) -> AttentionMap:
    """Attention logits (``attn.hook_scores``: scaled, soft-capped, masked) and probabilities
    (``attn.hook_pattern``) of one head for one prompt."""
    lm.blocks.check_layer(layer)
    check_head(lm, head)
    check_implementation(implementation)
    ids = tokenize_prompts(lm, [prompt])[0]
    notes = switch_note(lm.model)
    scores, pattern = hook_name(layer, "attn.hook_scores"), hook_name(layer, "attn.hook_pattern")
    with torch.inference_mode(), record(lm.model, [scores, pattern]) as kept:
        lm.model.base_model(input_ids=torch.tensor([ids]), use_cache=False)
    logits = kept[scores][0, head].float()
    logits = torch.where(logits < torch.finfo(kept[scores].dtype).min / 2, float("nan"), logits)  # masked keys
    # clones outside inference mode: normal tensors
    return AttentionMap(layer, head, token_strings(lm.tokenizer, ids), logits.clone(),
                        kept[pattern][0, head].float().clone(), notes)
