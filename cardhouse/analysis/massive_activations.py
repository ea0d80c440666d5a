"""The massive-activation scan (Sun et al., 2024): where, how large, on which tokens.

One pass over the prompts with hooks on the residual stream. Everything is reduced on
the fly (``capture.stats``): memory stays flat however many prompts are scanned.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import torch

from ..capture import Inputs, StreamingStats, all_hook_names, hook_name, run_inputs
from ..capture.hooks import parse_hook_name
from ..capture.inputs import role_codes
from ..capture.stats import OutlierCounter
from ..models.loading import LoadedModel
from .criterion import Criterion
from .prompts import load_prompts
from .tokens import PromptInputs


@dataclass
class _Welford:
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    max_abs: float = 0.0

    def add(self, v: float) -> None:
        self.count += 1
        delta = v - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (v - self.mean)
        self.max_abs = max(self.max_abs, abs(v))

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0


class ActivationOverflow(ValueError):
    """The activations are not finite: the model's dtype cannot hold them (float16 tops out at 65,504)."""


@dataclass
class ScanResult:
    model: dict
    prompts: int
    tokens: int
    point: str
    criterion: dict
    layers: list[dict]  # per layer: Table 1 statistics, massive count, dims, top entries
    massive_layers: list[int]
    first_layer: int | None
    vanish_layer: int | None  # first layer after the last one that has them
    massive_dims: list[dict]  # dim, layers it is massive in
    values: list[dict]  # per (layer, dim, role): count, mean, std, max |a| across prompts (Sun Table 2)
    roles: dict[str, dict]  # role -> prompts where it carries one / prompts that have it
    token_strings: list[dict]  # token text -> occurrences that carry a massive activation
    outlier_features: dict = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return bool(self.massive_layers)

    @property
    def dims(self) -> list[int]:
        return [d["dim"] for d in self.massive_dims]

    def values_at(self, layer: int) -> list[dict]:
        return [v for v in self.values if v["layer"] == layer]

    def to_dict(self) -> dict:
        return asdict(self)


def scan(lm: LoadedModel, prompts: list[str] | str = "builtin", *, criterion: Criterion = Criterion(),
         point: str = "hook_resid_post", batch_size: int = 8, top_k: int = 100,
         outlier_threshold: float = 6.0, progress: bool = True) -> ScanResult:
    """Scan the hidden states at ``point`` of every layer over ``prompts``.

    Side by side, the classic outlier features (Dettmers et al.) are counted on the
    inputs of the FFN's linear layers (``mlp.hook_in``), where that definition applies.
    """
    if isinstance(prompts, str):
        prompts = load_prompts(prompts)
    return scan_inputs(lm, PromptInputs(lm, prompts), criterion=criterion, point=point, batch_size=batch_size,
                       top_k=top_k, outlier_threshold=outlier_threshold, progress=progress)


def scan_inputs(lm: LoadedModel, inputs: Inputs, *, criterion: Criterion = Criterion(),
                point: str = "hook_resid_post", batch_size: int = 8, top_k: int = 100,
                outlier_threshold: float = 6.0, progress: bool = True) -> ScanResult:
    """``scan`` over any inputs (``capture.inputs.Inputs``): prompts, images or sentences, with their roles."""
    names = all_hook_names(lm.model, point)
    d = lm.model.config.hidden_size
    stats = StreamingStats(len(names), d, top_k=top_k)
    outliers = OutlierCounter(len(names), d, outlier_threshold)
    values: dict[tuple[int, int, str], _Welford] = defaultdict(_Welford)
    role_hits: Counter = Counter()
    role_present: Counter = Counter()
    token_hits: Counter = Counter()
    role_names, role_lists = inputs.role_names, inputs.role_lists
    strings: dict[int, str] = {}
    overflow: set[int] = set()  # layers with a non-finite activation
    last = parse_hook_name(names[-1])[0]

    def tally(batch, codes, carriers):
        """Count one batch's carriers once all its layers ran: which tokens, and which roles per prompt."""
        per_prompt_roles = defaultdict(set)
        for row, pos in carriers:
            token_id = int(batch.input_ids[row, pos])
            strings.setdefault(token_id, inputs.token_text(token_id))
            token_hits[token_id] += 1
            per_prompt_roles[row].add(role_names[int(codes[row, pos])])
        for found in per_prompt_roles.values():
            role_hits.update(found)
        for index in batch.prompt_index.tolist():
            role_present.update(set(role_lists[index]))

    def hooks_for(batch):
        # the hooks close over their own batch: a streamed model runs every batch through a block before the next
        codes = role_codes([role_lists[i] for i in batch.prompt_index.tolist()], batch.input_ids.shape[1],
                           role_names, role_names[-1])
        carriers: set[tuple[int, int]] = set()  # (row, position) carrying a massive activation in some layer

        def observe(name, acts):
            layer, _ = parse_hook_name(name)
            mags, flat = stats.update(layer, acts, batch.attention_mask, batch.input_ids, batch.prompt_index)
            if not bool(torch.isfinite(mags[:, 0]).all()):  # topk puts inf and nan first: one look per prompt
                overflow.add(layer)
            cutoff = criterion.threshold(stats.median(layer))
            for row, col in (mags > cutoff).nonzero().tolist():
                pos, dim = divmod(int(flat[row, col]), d)
                role = role_names[int(codes[row, pos])]
                values[(layer, dim, role)].add(float(acts[row, pos, dim]))
                carriers.add((row, pos))
            if layer == last:  # this batch's last hook: its carriers are complete
                tally(batch, codes, carriers)

        def count_outliers(name, acts):
            outliers.update(parse_hook_name(name)[0], acts, batch.attention_mask)

        return {**{name: observe for name in names},
                **{hook_name(layer, "mlp.hook_in"): count_outliers for layer in range(len(names))}}

    run_inputs(lm, inputs.batches(batch_size), -(-len(inputs) // batch_size), hooks_for, progress=progress,
               desc="scan")
    if overflow:
        dtype = lm.describe()["dtype"]
        limit = f" (|a| > {torch.finfo(getattr(torch, dtype)).max:,.0f} cannot be stored)" if dtype != "float32" else ""
        raise ActivationOverflow(
            f"the activations overflow {dtype} from layer {min(overflow)} on{limit}: {point} is not finite "
            f"in layers {_ranges(sorted(overflow))}; run with --dtype bfloat16 or float32")
    return _summarize(lm, inputs, point, criterion, stats, values, role_hits, role_present, token_hits, strings,
                      outliers)


def _ranges(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _summarize(lm, inputs, point, criterion, stats, values, role_hits, role_present, token_hits, strings,
               outliers) -> ScanResult:
    layers, massive_layers = [], []
    dim_layers: dict[int, list[int]] = defaultdict(list)
    for layer in range(stats.n_layers):
        s = stats.result(layer)
        here = {k: v for k, v in values.items() if k[0] == layer}
        dims = sorted({dim for _, dim, _ in here})
        for dim in dims:
            dim_layers[dim].append(layer)
        if here:
            massive_layers.append(layer)
        layers.append({
            "layer": layer, **s.table1(), "ratio_top1_median": s.top_ranks[0] / s.median if s.median else math.inf,
            "massive_count": sum(w.count for w in here.values()), "massive_dims": dims,
            "threshold": criterion.threshold(s.median),
            "top_entries": [{**asdict(e), "token": inputs.token_text(e.token_id)} for e in s.top_entries[:8]],
        })
    first = massive_layers[0] if massive_layers else None
    vanish = massive_layers[-1] + 1 if massive_layers else None
    return ScanResult(
        model=lm.describe(), prompts=len(inputs), tokens=inputs.tokens, point=point,
        criterion=asdict(criterion), layers=layers, massive_layers=massive_layers,
        first_layer=first, vanish_layer=vanish if vanish is not None and vanish < stats.n_layers else None,
        massive_dims=sorted(({"dim": dim, "layers": ls} for dim, ls in dim_layers.items()),
                            key=lambda x: -len(x["layers"])),
        values=[{"layer": l, "dim": dim, "role": role, "count": w.count, "mean": w.mean, "std": w.std,
                 "max_abs": w.max_abs} for (l, dim, role), w in sorted(values.items())],
        roles={role: {"prompts_with_massive": role_hits[role], "prompts_with_role": role_present[role]}
               for role in inputs.role_names if role_present[role]},
        token_strings=[{"token": strings[t], "token_id": t, "count": c} for t, c in token_hits.most_common(20)],
        outlier_features=outliers.outlier_features(),
    )
