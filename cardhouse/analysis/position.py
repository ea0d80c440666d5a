"""The BOS position study (House of Cards Fig. 2 and App. C): does the BOS token carry the massive
activation because it is BOS, or because it is first?

The same prompt runs four times: BOS at the start, in the middle, at the end, and left out.
For every layer we report which token then carries the largest activation and how large it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..capture import all_hook_names, record
from ..models.loading import LoadedModel
from .tokens import token_strings

PLACEMENTS = ("start", "middle", "end", "absent")
MIN_TOKENS = 4  # the middle must have at least two tokens on each side


def placed(ids: list[int], bos_id: int, placement: str) -> tuple[list[int], int | None]:
    """The token ids with BOS put at ``placement``, and BOS's position (None when absent)."""
    middle = len(ids) // 2
    return {"start": ([bos_id, *ids], 0),
            "middle": ([*ids[:middle], bos_id, *ids[middle:]], middle),
            "end": ([*ids, bos_id], len(ids)),
            "absent": (list(ids), None)}[placement]


@dataclass
class PositionStudy:
    model: dict
    prompt: str
    dim: int  # the massive dimension (largest |h| in the middle layer with BOS at the start)
    reference_layer: int
    tokens: dict[str, list[str]]  # placement -> tokens
    bos_position: dict[str, int | None]
    layers: list[dict]  # per layer, per placement: the carrier (position, token, dim, value), and BOS's and position 0's max |h|
    summary: dict[str, dict]  # placement -> the carrier at the reference layer
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _carrier(h: torch.Tensor, tokens: list[str], bos_position: int | None, dim: int) -> dict:  # h [pos, d]
    largest = h.abs().amax(-1)  # [pos]
    pos = int(largest.argmax())
    top_dim = int(h[pos].abs().argmax())
    role = "bos" if pos == bos_position else "first token" if pos == 0 else "other"
    return {"position": pos, "token": tokens[pos], "role": role, "dim": top_dim, "value": float(h[pos, top_dim]),
            "median_abs": float(h.abs().median()),
            "at_dim": {"bos": float(h[bos_position, dim]) if bos_position is not None else None,
                       "position 0": float(h[0, dim]), "carrier": float(h[pos, dim])},
            "second_largest": float(largest.topk(2).values[1]) if len(largest) > 1 else 0.0}


def position_study(lm: LoadedModel, prompt: str, *, placements: tuple[str, ...] = PLACEMENTS) -> PositionStudy:
    """Run ``prompt`` with BOS at each placement; report the carrier of the largest activation per layer."""
    bos_id = lm.tokenizer.bos_token_id
    if bos_id is None:
        raise ValueError(f"{lm.name}'s tokenizer has no BOS token: nothing to place")
    unknown = set(placements) - set(PLACEMENTS)
    if unknown:
        raise ValueError(f"unknown placements {sorted(unknown)}; choose from {', '.join(PLACEMENTS)}")
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) < MIN_TOKENS:
        raise ValueError(f"the prompt is too short for the position study: {len(ids)} tokens, at least {MIN_TOKENS} "
                         "are needed so that BOS in the middle has tokens on both sides")
    names = all_hook_names(lm.model, "hook_resid_post")
    n_layers = len(names)
    reference = n_layers // 2
    runs = {}
    for placement in placements:
        tokens, bos_position = placed(ids, bos_id, placement)
        with torch.inference_mode(), record(lm.model, names) as store:
            lm.model.base_model(input_ids=torch.tensor([tokens]), use_cache=False)
        runs[placement] = (token_strings(lm.tokenizer, tokens), bos_position, [store[n][0].float() for n in names])
    first = runs[placements[0]][2][reference]  # [pos, d]
    dim = int(first.abs().amax(0).argmax())
    layers = [{"layer": l, **{p: _carrier(h[l], tokens, pos, dim) for p, (tokens, pos, h) in runs.items()}}
              for l in range(n_layers)]
    return PositionStudy(
        model=lm.describe(), prompt=prompt, dim=dim, reference_layer=reference,
        tokens={p: r[0] for p, r in runs.items()}, bos_position={p: r[1] for p, r in runs.items()},
        layers=layers, summary={p: layers[reference][p] for p in runs})
