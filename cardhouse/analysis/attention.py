"""Attention and massive activations (Sun et al., 2024, Sec. 4): sinks, concentration and the implicit bias.

The tokens that carry massive activations (set C) become attention sinks once their hidden
states are massive: many heads of the later layers put most of their probability on them.
What those heads add is then nearly the same vector for every query (Sun et al. Sec. 4.3):
each attention output splits exactly into the part read from the values of C and the part
read from the other tokens, and the set-C part acts as an implicit bias.

Attention probabilities exist only under eager attention: the analyses switch the model to
it for their duration (``eager_attention``), restore the model's own implementation after,
and say so in their notes. An implementation that returns no probabilities is an error,
never a silent zero. Every map is reduced inside the attention module's forward hook to
per-head and per-key sums: no [layer, head, query, key] tensor outlives its layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..capture import all_hook_names, parse_hook_name, run_batches, tokenize_prompts
from ..models.loading import LoadedModel
from .criterion import Criterion
from .prompts import load_prompts
from .tokens import ROLES, roles, token_strings

EAGER = "eager"  # the implementation that materializes (and returns) the probabilities
MASSIVE = "massive"  # the token group "set C", beside the roles of .tokens
GROUPS = (MASSIVE, *ROLES)


# ---- eager attention ---------------------------------------------------------------------------


@contextmanager
def eager_attention(lm: LoadedModel, implementation: str = EAGER) -> Iterator[list[str]]:
    """Run the block under ``implementation``; the model's own is restored after, also on error.

    Yields the notes to report (what was switched). Whether the implementation returns
    probabilities is checked where they are read (``_probabilities``).
    """
    model = lm.model
    before = model.config._attn_implementation
    notes = []
    if implementation != before:
        try:
            model.set_attn_implementation(implementation)
        except (ValueError, KeyError, ImportError) as e:
            raise ValueError(f"cannot switch {lm.name} to attention implementation {implementation!r}: {e}") from e
        notes.append(f"attention implementation switched from {before!r} to {implementation!r} for this "
                     "analysis (only eager attention returns probabilities); restored after")
    try:
        yield notes
    finally:
        if implementation != before:
            model.set_attn_implementation(before)


def _probabilities(output, implementation: str) -> torch.Tensor:
    """The attention module's probabilities ``[batch, head, query, key]`` from its output tuple."""
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if weights is None:
        raise ValueError(f"attention implementation {implementation!r} returns no attention probabilities; "
                         f"use {EAGER!r} (the default), which cardhouse switches to for the analysis")
    return weights


def _visible(mask: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    """Which keys each real query can see: ``[batch, query, key]`` bool.

    Read from the mask the model itself used (causal, padding, sliding windows).
    """
    n = valid.shape[1]
    if mask is None:
        seen = torch.ones(n, n, dtype=torch.bool).tril()[None] & valid[:, None, :]
    elif mask.dtype == torch.bool:
        seen = mask[:, 0, :, :n]
    else:  # additive float mask: 0 where visible, the dtype's minimum where not
        seen = mask[:, 0, :, :n] > torch.finfo(mask.dtype).min / 2
    return seen & valid[:, :, None]


def check_head(lm: LoadedModel, head: int) -> int:
    n_heads = lm.blocks.heads[0]
    if not 0 <= head < n_heads:
        raise IndexError(f"head {head} is out of range: the model has heads 0..{n_heads - 1}")
    return head


def _attention_modules(lm: LoadedModel) -> dict[nn.Module, int]:
    blocks = lm.blocks
    return {blocks.part(layer, "attn"): layer for layer in range(len(blocks))}


@contextmanager
def module_hooks(pairs: list[tuple[nn.Module, object]], **kwargs) -> Iterator[None]:
    handles = [module.register_forward_hook(fn, **kwargs) for module, fn in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---- set C: the tokens that carry massive activations ------------------------------------------


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
    current = {}

    def observe(name, acts):  # [batch, pos, d_model]
        layer, _ = parse_hook_name(name)
        batch = current["batch"]
        largest = acts.abs().amax(-1)  # [batch, pos]
        for row, index in enumerate(batch.prompt_index.tolist()):
            valid = batch.attention_mask[row].bool()
            cutoff = criterion.token_cutoff(float(acts[row][valid].abs().median()),
                                            float(largest[row][valid].median()))
            hits = ((largest[row] > cutoff) & valid).nonzero().flatten().tolist()
            found[index].update(hits)
            layers.update([layer] if hits else [])

    run_batches(lm, token_lists, lambda batch: (current.update(batch=batch),
                                                {name: observe for name in all_hook_names(lm.model, "hook_resid_post")})[1],
                batch_size=batch_size, progress=progress, desc="massive tokens")
    return [sorted(f) for f in found], sorted(layers)


# ---- the value-update decomposition ------------------------------------------------------------


def split_update(probs: torch.Tensor, values: torch.Tensor, in_c: torch.Tensor, o_proj: nn.Linear,
                 n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output as (part read from set C, part read from the rest): ``[batch, query, d_model]`` each.

    probs ``[batch, head, query, key]``, values (the v projection) ``[batch, key, n_kv_heads * head_dim]``,
    in_c ``[batch, key]`` bool. The output projection is linear, so o(z_C) + o(z_rest) + bias is
    the module's output; its bias goes to the rest.
    """
    batch, n_heads, n_query, n_key = probs.shape
    v = values.view(batch, n_key, n_kv_heads, -1).transpose(1, 2)  # [batch, kv_head, key, head_dim]
    v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)  # query head h reads kv head h // group (GQA)
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
    ids = tokenize_prompts(lm, [prompt])[0]
    if massive_positions is None:
        massive_positions = massive_tokens(lm, [ids], criterion)[0][0]
    if any(not 0 <= p < len(ids) for p in massive_positions):
        raise IndexError(f"massive positions {massive_positions} are out of range: the prompt has {len(ids)} tokens")
    in_c = torch.zeros(1, len(ids), dtype=torch.bool)
    in_c[0, massive_positions] = True
    kept = {}
    with eager_attention(lm, implementation) as notes, torch.inference_mode(), module_hooks(
            [(blocks.attn_part(layer, "v_proj"), lambda m, a, out: kept.update(values=out))]), module_hooks(
            [(blocks.part(layer, "attn"), lambda m, a, out: kept.update(
                probs=_probabilities(out, implementation), output=out[0]))]):
        lm.model.base_model(input_ids=torch.tensor([ids]), use_cache=False)
        from_c, rest = split_update(kept["probs"], kept["values"], in_c, blocks.attn_part(layer, "o_proj"),
                                    blocks.heads[1])
    return UpdateParts(layer, token_strings(lm.tokenizer, ids), list(massive_positions), from_c[0].clone(),
                       rest[0].clone(), kept["output"][0].clone(), notes)


# ---- heat maps --------------------------------------------------------------------------------


class _SoftmaxInputs(TorchFunctionMode):
    """Keeps the input of ``softmax`` while ``active``: under eager attention, the attention logits
    (scaled, soft-capped, masked) exactly as the model computed them."""

    def __init__(self):
        super().__init__()
        self.active, self.inputs = False, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.active and func is nn.functional.softmax:
            self.inputs.append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


@dataclass
class AttentionMap:
    layer: int
    head: int
    tokens: list[str]
    logits: torch.Tensor | None  # [query, key], NaN where masked; None if no softmax input was seen
    probs: torch.Tensor  # [query, key]
    notes: list[str]


def attention_map(lm: LoadedModel, prompt: str, layer: int, head: int, *,
                  implementation: str = EAGER) -> AttentionMap:
    """Attention logits and probabilities of one head for one prompt (Sun et al. Figs. 5-6)."""
    blocks = lm.blocks
    attn = blocks.part(layer, "attn")  # checks the layer
    check_head(lm, head)
    ids = tokenize_prompts(lm, [prompt])[0]
    logits = _SoftmaxInputs()
    kept = {}

    def start(module, args):
        logits.active = True

    def stop(module, args, output):
        logits.active = False
        kept["probs"] = _probabilities(output, implementation)[0, head]

    handle = attn.register_forward_pre_hook(start)
    try:
        with eager_attention(lm, implementation) as notes, torch.inference_mode(), logits, module_hooks([(attn, stop)]):
            lm.model.base_model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    scores = None
    if len(logits.inputs) == 1:
        scores = logits.inputs[0][0, head].float()
        scores = torch.where(scores < torch.finfo(scores.dtype).min / 2, float("nan"), scores)  # masked keys
    else:
        notes.append(f"attention logits not shown: the attention of layer {layer} called softmax "
                     f"{len(logits.inputs)} times, not once")
    return AttentionMap(layer, head, token_strings(lm.tokenizer, ids), None if scores is None else scores.clone(),
                        kept["probs"].float().clone(), notes)  # clones outside inference mode: normal tensors


# ---- the streaming analysis -------------------------------------------------------------------


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


class _Accumulator:
    """Per-layer sums, reduced from one layer's probabilities at a time."""

    def __init__(self, n_layers: int, n_heads: int, d_model: int):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.to_c, self.queries = zeros(n_layers, n_heads), zeros(n_layers)
        self.sink = {g: zeros(n_layers, n_heads) for g in GROUPS}
        self.sink_above = {g: zeros(n_layers, n_heads) for g in GROUPS}
        self.keys = {g: zeros(n_layers) for g in GROUPS}
        # value updates: sums of unit vectors (pairwise cosine = (|sum|^2 - n) / (n (n - 1)))
        self.unit = {part: zeros(n_layers, d_model) for part in ("c", "rest")}
        self.within = {part: zeros(n_layers) for part in ("c", "rest")}
        self.n_within, self.n_updates = zeros(n_layers), zeros(n_layers)
        self.norm = {part: zeros(n_layers) for part in ("c", "rest")}
        self.share = zeros(n_layers)
        self.error = zeros(n_layers)  # max |C + rest - output| / max |output|

    def add(self, layer: int, probs, visible, valid, in_c, groups, parts, output, threshold: float):
        queries = valid & ~in_c  # [batch, query]: the ordinary tokens' view of C
        qf = queries.to(probs.dtype)
        # share of each ordinary query's probability that lands on set C, summed per head
        self.to_c[layer] += torch.einsum("bhqk,bk,bq->h", probs, in_c.to(probs.dtype), qf).double()
        self.queries[layer] += float(qf.sum())
        # sink score: mean probability a key receives from the queries that can see it
        received = torch.einsum("bhqk,bq->bhk", probs, valid.to(probs.dtype))  # masked entries are 0
        score = received / visible.sum(1).clamp(min=1)[:, None, :]  # [batch, head, key]
        for g, member in groups.items():  # member [batch, key]
            m = member[:, None, :]
            self.sink[g][layer] += (score * m).sum((0, 2)).double()
            self.sink_above[g][layer] += ((score > threshold) & m).sum((0, 2)).double()
            self.keys[g][layer] += float(member.sum())
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

    def layer(self, layer: int, threshold: float) -> dict:
        heads = lambda t: [round(float(x), 6) for x in t]  # noqa: E731
        n = float(self.n_updates[layer])
        sink = {g: heads(self.sink[g][layer] / self.keys[g][layer]) for g in GROUPS if self.keys[g][layer] > 0}
        update = {"queries": int(n), "max_relative_sum_error": float(self.error[layer])}
        if n >= 2:
            for part in ("c", "rest"):
                s = self.unit[part][layer]
                update[f"cos_{part}_all"] = float((s.dot(s) - n) / (n * (n - 1)))
                update[f"cos_{part}_within_prompt"] = float(self.within[part][layer] / max(1.0, self.n_within[layer]))
                update[f"norm_{part}"] = float(self.norm[part][layer] / n)
            update["norm_share_c"] = float(self.share[layer] / n)
        return {
            "layer": layer,
            "concentration": heads(self.to_c[layer] / self.queries[layer].clamp(min=1)),
            "sink": sink,
            "sink_heads": {g: sum(x > threshold for x in v) / len(v) for g, v in sink.items()},
            "sink_rate": {g: heads(self.sink_above[g][layer] / self.keys[g][layer])
                          for g in GROUPS if self.keys[g][layer] > 0},
            "update": update,
        }


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

    Two passes: the first finds set C (``massive_tokens``), the second reads the probabilities.
    The decomposition needs separate v/o projections in the adapter table.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"the sink threshold must be between 0 and 1, not {threshold}")
    if isinstance(prompts, str):
        prompts = load_prompts(prompts)
    blocks = lm.blocks
    n_layers, (n_heads, n_kv_heads) = len(blocks), blocks.heads
    token_lists = tokenize_prompts(lm, prompts)
    positions, massive_layers = massive_tokens(lm, token_lists, criterion, batch_size=batch_size, progress=progress)
    role_lists = [roles(lm.tokenizer, ids, lm.bos_id) for ids in token_lists]
    acc = _Accumulator(n_layers, n_heads, lm.model.config.hidden_size)
    modules = _attention_modules(lm)
    o_projs = [blocks.attn_part(layer, "o_proj") for layer in range(n_layers)]
    v_projs = {blocks.attn_part(layer, "v_proj"): layer for layer in range(n_layers)}
    current: dict = {}

    def on_values(module, args, output):
        current["values"] = output  # the v projection runs just before its layer's attention

    def on_attention(module, args, kwargs, output):
        layer = modules[module]
        probs = _probabilities(output, implementation).float()
        valid, in_c = current["valid"], current["in_c"]
        visible = _visible(kwargs.get("attention_mask"), valid)
        parts = split_update(probs, current.pop("values").float(), in_c, o_projs[layer], n_kv_heads)
        acc.add(layer, probs, visible, valid, in_c, current["groups"], parts, output[0].float(), threshold)

    def hooks_for(batch):
        width = batch.input_ids.shape[1]
        rows = batch.prompt_index.tolist()
        in_c = torch.zeros(len(rows), width, dtype=torch.bool)
        groups = {g: torch.zeros(len(rows), width, dtype=torch.bool) for g in GROUPS}
        for r, i in enumerate(rows):
            in_c[r, positions[i]] = True
            for pos, role in enumerate(role_lists[i]):
                groups[role][r, pos] = True
        groups[MASSIVE] = in_c
        current.update(valid=batch.attention_mask.bool(), in_c=in_c, groups=groups)
        return {}

    with eager_attention(lm, implementation) as notes, module_hooks(list(zip(v_projs, [on_values] * n_layers))), \
            module_hooks([(m, on_attention) for m in modules], with_kwargs=True):
        run_batches(lm, token_lists, hooks_for, batch_size=batch_size, progress=progress, desc="attention")
    massive_layer = massive_layers[0] if massive_layers else None
    if massive_layer is None:
        notes.append("no massive activation by the criterion: set C is empty, concentration and set-C updates are 0")
    layers = [acc.layer(layer, threshold) for layer in range(n_layers)]
    return AttentionResult(
        model=lm.describe(), prompts=len(prompts), tokens=sum(map(len, token_lists)), implementation=implementation,
        threshold=threshold, massive_layer=massive_layer, massive_layers=massive_layers, massive_positions=positions,
        layers=layers, summary=_summary(layers, massive_layer), notes=notes)


def default_head(result: AttentionResult, layer: int) -> int:
    """The head of ``layer`` that puts the most attention on set C."""
    row = result.layers[layer]["concentration"]
    return max(range(len(row)), key=row.__getitem__)
