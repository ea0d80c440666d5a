"""The super weight as Yu et al. (2024, "The Super Weight in Large Language Models") define it.

A super weight is one entry W_down[r, j] of a layer's down projection that sits where the
down projection's **input** spike (intermediate channel j, huge on one token) meets its
**output** spike (hidden dimension r, the super activation on that token): it writes most of
the massive activation through one product W_down[r, j] * a_j. It is found from forward
passes alone: record, for every layer, the largest |input| and |output| of the down
projection over the prompts; the layers where both spike hold super weights.

This is not "the largest entry of the massive row": a large weight on a channel whose input
is tiny contributes little, while a modest weight on a huge channel writes the activation.
That other quantity is kept, under its own name (``largest_down_entry``), for comparison.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch

from tqdm.auto import tqdm

from ..capture import PromptBatch, hook_name, hooks, parse_hook_name, run_batches, tokenize_prompts
from ..models.adapters import UnsupportedModelError
from ..models.loading import LoadedModel
from .prompts import load_prompts

DEFAULT_RATIO = 20.0  # a spike: the layer's max |input| and max |output| both > RATIO x the median over layers
DEFINITION = ("Yu et al. 2024: W_down[r, j] of a layer whose down projection spikes at both ends, "
              "r = hidden dim of the largest |output|, j = intermediate channel of the largest |input|")


@dataclass
class Spike:
    """The largest |value| seen at one end of a down projection, and where."""

    value: float = 0.0  # signed
    index: int = -1  # channel (input) or hidden dim (output)
    prompt: int = -1
    position: int = -1
    token_id: int = -1

    @property
    def magnitude(self) -> float:
        return abs(self.value)


@dataclass
class _LayerMax:
    input: Spike = field(default_factory=Spike)
    output: Spike = field(default_factory=Spike)
    carrier_input: torch.Tensor | None = None  # the down input on the output spike's token [d_mlp]


@dataclass
class SuperWeight:
    layer: int
    row: int  # hidden dim of the output spike (the super activation)
    column: int  # intermediate channel of the input spike
    value: float  # W_down[row, column]
    input: float  # a_column on the carrier token (the output spike's token)
    output: float  # the down projection's output at [carrier, row]: the super activation
    contribution: float  # value * input
    share: float  # contribution / output
    carrier: dict  # prompt, position, token_id, token of the output spike
    same_token: bool  # the input spike sits on the carrier token too
    input_ratio: float  # the layer's max |input| / median over layers
    output_ratio: float
    contributions: list[dict]  # the massive row's largest |W_down[row, j] * a_j|, ranked, with their share
    largest_down_entry: dict  # the row's largest |W_down[row, j]| (not the super weight), for comparison
    definition: str = DEFINITION

    @property
    def coordinate(self) -> tuple[int, int, int]:
        return self.layer, self.row, self.column

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SuperWeightScan:
    layers: list[dict]  # per layer: the largest |input| and |output| of the down projection, and where
    super_weights: list[SuperWeight]  # every layer where both spike, in layer order
    ratio: float
    median_input: float  # median over layers of the layer's max |input|
    median_output: float
    prompts: int
    tokens: int
    notes: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.super_weights)

    def to_dict(self) -> dict:
        return {"definition": DEFINITION, "ratio": self.ratio, "median_input": self.median_input,
                "median_output": self.median_output, "prompts": self.prompts, "tokens": self.tokens,
                "layers": self.layers, "super_weights": [s.to_dict() for s in self.super_weights],
                "notes": self.notes}


def check_dense_down(lm: LoadedModel) -> None:
    """The detection reads one down projection per layer: refuse models whose adapter has none."""
    adapter = lm.blocks.adapter
    if getattr(adapter, "down", None) is None or lm.blocks.is_moe:
        why = ("its FFN down projections are per-expert 3-D tensors (Mixture of Experts)" if lm.blocks.is_moe
               else "its adapter names no down projection")
        raise UnsupportedModelError(f"the {adapter.family} family has no single down projection per layer ({why}); "
                                    "the super-weight detection needs one (see cardhouse/models/adapters.py)")


def check_coordinate(lm: LoadedModel, layer: int, row: int, column: int) -> tuple[int, int, int]:
    """A user-given W_down coordinate, checked against the model's shapes (clear error otherwise)."""
    check_dense_down(lm)
    lm.blocks.check_layer(layer)
    rows, columns = lm.blocks.down_weight(layer).shape
    if not 0 <= row < rows:
        raise ValueError(f"W_down row {row} is out of range: layer {layer}'s down projection has rows 0..{rows - 1}")
    if not 0 <= column < columns:
        raise ValueError(f"W_down column {column} is out of range: layer {layer}'s down projection has "
                         f"columns 0..{columns - 1}")
    return layer, row, column


def _update(spike: Spike, acts: torch.Tensor, mask: torch.Tensor | None, batch) -> tuple[int, int] | None:
    """Fold a batch's largest |value| into ``spike``; return (row, position) if it is a new maximum."""
    magnitude = acts.abs().float() if mask is None else acts.abs().float() * mask[..., None]
    flat = int(magnitude.argmax())
    b, rest = divmod(flat, magnitude.shape[1] * magnitude.shape[2])
    p, i = divmod(rest, magnitude.shape[2])
    if float(magnitude[b, p, i]) <= spike.magnitude:
        return None
    spike.value, spike.index = float(acts[b, p, i]), i
    spike.prompt, spike.position = int(batch.prompt_index[b]), p
    spike.token_id = int(batch.input_ids[b, p]) if batch.input_ids is not None else -1  # images: no token ids
    return b, p


def down_maxima(lm: LoadedModel, prompts: list[str] | None = None, *, images: torch.Tensor | None = None,
                batch_size: int = 8, progress: bool = False) -> tuple[list[_LayerMax], int]:
    """One pass over the prompts (or, for a vision encoder, the images' ``pixel_values``): per layer, the
    largest |input| and |output| of W_down (streamed maxima, memory independent of the number of
    inputs), and the input vector on the output spike's token."""
    check_dense_down(lm)
    n_layers = len(lm.blocks)
    maxima = [_LayerMax() for _ in range(n_layers)]
    tokens = [0]

    def hooks_for(batch):
        mask = batch.attention_mask.float() if batch.attention_mask is not None else None
        inputs: dict[int, torch.Tensor] = {}

        def on_input(name, acts):  # fires before the same layer's output hook
            layer = parse_hook_name(name)[0]
            inputs[layer] = acts
            _update(maxima[layer].input, acts, mask, batch)

        def on_output(name, acts):
            layer = parse_hook_name(name)[0]
            if layer == 0:
                tokens[0] += int(mask.sum()) if mask is not None else acts.shape[0] * acts.shape[1]
            new = _update(maxima[layer].output, acts, mask, batch)
            if new is not None:
                maxima[layer].carrier_input = inputs[layer][new].float().clone()

        fns = {hook_name(l, "mlp.hook_post"): on_input for l in range(n_layers)}
        # the FFN's output is its down projection's output in every dense layout (Gemma's post-norm comes after)
        return fns | {hook_name(l, "mlp.hook_out"): on_output for l in range(n_layers)}

    if images is None:
        run_batches(lm, tokenize_prompts(lm, prompts), hooks_for, batch_size=batch_size, progress=progress,
                    desc="down projections")
    else:
        for start in tqdm(range(0, len(images), batch_size), desc="down projections", disable=not progress,
                          leave=False):
            pixels = images[start:start + batch_size]
            batch = PromptBatch(None, None, torch.arange(start, start + len(pixels)))  # every patch is real
            with torch.inference_mode(), hooks(lm.model, hooks_for(batch)):
                lm.model(pixel_values=pixels)
    return maxima, tokens[0]


def _token(lm: LoadedModel, token_id: int) -> str | None:
    return lm.tokenizer.decode([token_id]) if lm.tokenizer is not None and token_id >= 0 else None


def _contributions(down_row: torch.Tensor, carrier_input: torch.Tensor, output: float, top: int) -> list[dict]:
    products = down_row.float() * carrier_input
    order = products.abs().argsort(descending=True)[:top]
    return [{"channel": int(j), "weight": float(down_row[j]), "input": float(carrier_input[j]),
             "contribution": float(products[j]), "share": float(products[j]) / output if output else 0.0}
            for j in order]


def find_super_weights(lm: LoadedModel, prompts: list[str] | str = "builtin", *, ratio: float = DEFAULT_RATIO,
                       n_prompts: int | None = None, batch_size: int = 8, top: int = 10,
                       images: torch.Tensor | None = None, progress: bool = False) -> SuperWeightScan:
    """Detect the super weights as Yu et al. do, in every layer where both ends of W_down spike.

    A layer spikes when its largest |input| of W_down is more than ``ratio`` times the median over
    layers of that maximum, and the same holds for its largest |output|. ``top``: how many of the
    massive row's channel contributions W_down[r, j] * a_j to keep (ranked by magnitude). A vision
    encoder (no tokenizer) takes ``images``, a ``[N, 3, H, W]`` tensor of pixel values, instead of prompts.
    """
    if ratio <= 1:
        raise ValueError(f"ratio must be greater than 1 (a spike above the median layer), got {ratio}")
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if images is not None:
        images = images[:n_prompts] if n_prompts else images
        count = len(images)
    elif lm.tokenizer is None:
        raise ValueError("this model has no tokenizer (a vision encoder?): give images, a [N, 3, H, W] tensor "
                         "of pixel values, instead of prompts")
    else:
        prompts = load_prompts(prompts) if isinstance(prompts, str) else prompts
        prompts = prompts[:n_prompts] if n_prompts else prompts
        count = len(prompts)
    maxima, tokens = down_maxima(lm, prompts, images=images, batch_size=batch_size, progress=progress)
    median_in = statistics.median(m.input.magnitude for m in maxima)
    median_out = statistics.median(m.output.magnitude for m in maxima)
    layers, found = [], []
    for layer, m in enumerate(maxima):
        in_ratio = m.input.magnitude / max(median_in, 1e-30)
        out_ratio = m.output.magnitude / max(median_out, 1e-30)
        spikes = in_ratio > ratio and out_ratio > ratio
        layers.append({"layer": layer, "input_max": m.input.magnitude, "input_channel": m.input.index,
                       "input_ratio": in_ratio, "output_max": m.output.magnitude, "output_dim": m.output.index,
                       "output_ratio": out_ratio, "spike": spikes,
                       "input_where": {"prompt": m.input.prompt, "position": m.input.position,
                                       "token_id": m.input.token_id},
                       "output_where": {"prompt": m.output.prompt, "position": m.output.position,
                                        "token_id": m.output.token_id}})
        if spikes:
            found.append(_super_weight(lm, layer, m, in_ratio, out_ratio, top))
    notes = [] if found else [f"no layer's down projection spikes at both ends (> {ratio:g} x the median over "
                              "layers): no super weight by this criterion; try a lower --ratio"]
    return SuperWeightScan(layers, found, ratio, median_in, median_out, count, tokens, notes)


def _super_weight(lm: LoadedModel, layer: int, m: _LayerMax, in_ratio: float, out_ratio: float,
                  top: int) -> SuperWeight:
    row, column = m.output.index, m.input.index
    with torch.no_grad():
        down_row = lm.blocks.down_weight(layer)[row].detach().float().clone()
    a = m.carrier_input
    output = m.output.value
    largest = int(down_row.abs().argmax())
    contribution = float(down_row[column] * a[column])
    return SuperWeight(
        layer=layer, row=row, column=column, value=float(down_row[column]), input=float(a[column]), output=output,
        contribution=contribution, share=contribution / output if output else 0.0,
        carrier={"prompt": m.output.prompt, "position": m.output.position, "token_id": m.output.token_id,
                 "token": _token(lm, m.output.token_id)},
        same_token=(m.input.prompt, m.input.position) == (m.output.prompt, m.output.position),
        input_ratio=in_ratio, output_ratio=out_ratio, contributions=_contributions(down_row, a, output, top),
        largest_down_entry={"layer": layer, "row": row, "column": largest, "value": float(down_row[largest]),
                            "input": float(a[largest]), "contribution": float(down_row[largest] * a[largest]),
                            "share": float(down_row[largest] * a[largest]) / output if output else 0.0})
