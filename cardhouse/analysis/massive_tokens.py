"""Set C (Sun et al., 2024, Sec. 4): the tokens of each prompt that carry massive activations."""

from __future__ import annotations

import torch

from ..capture import all_hook_names, parse_hook_name, run_batches
from ..capture.batches import PromptBatch
from ..models.loading import LoadedModel
from .criterion import Criterion


def massive_tokens(lm: LoadedModel, token_lists: list[list[int]], criterion: Criterion = Criterion(), *,
                   batch_size: int = 8,
                   progress: bool = False) -> tuple[list[list[int]], list[int]]:
    """Set C of each prompt (positions whose residual stream is massive in some layer) and the layers
    where any token is massive.

    A token is massive in a layer if its largest |h| passes ``criterion.token_cutoff``: the criterion
    against the median |h| of its prompt in that layer, and ``criterion.token_ratio`` x the median
    token's largest |h|.
    """
    found: list[set[int]] = [set() for _ in token_lists]
    layers: set[int] = set()

    def hooks_for(batch: PromptBatch):
        def observe(name, acts: torch.Tensor):  # [batch, pos, d_model]
            layer, _ = parse_hook_name(name)
            largest = acts.abs().amax(-1)  # [batch, pos]
            for row, index in enumerate(batch.prompt_index.tolist()):
                valid = batch.attention_mask[row].bool()
                cutoff = criterion.token_cutoff(float(acts[row][valid].abs().median()),
                                                float(largest[row][valid].median()))
                hits = ((largest[row] > cutoff) & valid).nonzero().flatten().tolist()
                found[index].update(hits)
                layers.update([layer] if hits else [])

        return {name: observe for name in all_hook_names(lm.model, "hook_resid_post")}

    run_batches(lm, token_lists, hooks_for, batch_size=batch_size, progress=progress, desc="massive tokens")
    return [sorted(f) for f in found], sorted(layers)
