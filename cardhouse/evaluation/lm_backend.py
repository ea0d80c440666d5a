"""A faster lm-evaluation-harness backend for an in-memory causal LM: ``lm_eval --model cardhouse``.

``CardhouseLM`` is lm-eval's own ``HFLM`` with one method replaced, ``_loglikelihood_tokens``,
the one that runs the model. Everything that decides *what* is scored is HFLM's: the
tokenization (context/continuation split, BOS, empty contexts), left-truncation to the
model's maximum length, ``loglikelihood_rolling``'s windows and greedy ``generate_until``.
So the log-likelihoods are HFLM's, computed with less work:

- Requests whose model inputs share a prefix are grouped (sorted by tokens, a request joins
  its neighbour's group while that costs fewer token positions than running it apart): the
  2-5 choices of a multiple-choice item share their context, and WinoGrande's share the
  sentence start. Identical inputs (one-token answers) run once.
- Each group runs as one tree in one sequence: its shared prefix, then every member's remaining
  tokens (its last context token and its continuation), with a block-causal 4-D attention mask (a
  member sees the prefix and itself) and position ids continuing from the prefix's end, so every
  member sees exactly its own input. Trees are packed first fit into rows as wide as the longest
  tree of the pass (almost no padding), and the LM head and log-softmax only see scored positions.
- Where a tree cannot be used (the adapter table's ``tree_mask=False``, an attention other than
  sdpa/eager, a tree reaching a sliding window), each group's shared prefix runs once into a
  ``DynamicCache`` and the members' remaining tokens run against it, the two passes batched apart:
  prefixes sorted by length, right-padded (causal: a real token never sees the padding); then the
  members sorted by suffix length, each row's cache gathered from its group's with the gap up to
  the longest prefix of the batch masked out, and explicit position ids. A model with a sliding
  window only gathers rows whose padded width stays inside the window (a gap would shift it);
  longer inputs run in one piece, as HFLM runs them.

Inside ``reuse_prefix`` (an attack sweep), every pass skips the unedited layers on inputs seen
before: a tree pass because its tokens, mask and positions repeat; in the two-pass fallback the prefix
pass because its tokens repeat, the suffix pass because the cache holds the same keys and values
(the pass names its cache by each row's prefix tokens, ``capture.reuse.cache_label``,
so the cached tensors are not hashed).

lm-eval's command line finds the backend once this module is imported::

    python -m cardhouse.evaluation.lm_backend run --model cardhouse \\
        --model_args pretrained=smollm2-135m --tasks arc_easy --include_path "$(cardhouse-tasks)"
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..capture.reuse import cache_label
from ..models import load_model
from ..models.adapters import UnsupportedModelError, adapter_for
from ..models.placement import input_device
from ..models.streaming import streamer_of
from .zeroshot import bos_first_tokenizer

SUPPORTED_LM_EVAL = ">=0.4.13,<0.5"
try:  # transformers >= 5: logits_to_keep takes a boolean (batch x positions) mask, so the LM head runs only there
    from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401

    _PER_ROW_KEEP = True
except ImportError:
    _PER_ROW_KEEP = False
# the method this backend replaces, as lm-eval's HFLM declares it
_EXPECTED_SIGNATURE = ["self", "requests", "disable_tqdm", "override_bs"]


class UnsupportedLmEvalError(ValueError):
    pass


STREAMED_ALTERNATIVE = ("a streamed model (--stream) runs one block at a time over every input, but lm-eval scores "
                        "request by request through whole forward passes; load it with accelerate instead: "
                        "device_map='auto' with max_memory and offload_folder (--device-map auto --max-memory ... "
                        "--offload-folder ...), which offloads the blocks that do not fit to the CPU and the disk")


def check_not_streamed(model) -> None:
    """A clear error for a ``stream_skeleton`` model (its blocks are empty until streamed)."""
    if streamer_of(model) is not None:
        raise ValueError(f"zero-shot evaluation of {STREAMED_ALTERNATIVE}")


def check_lm_eval(version: str | None = None) -> str:
    """The installed lm-eval version, if this backend supports it; a clear error otherwise."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    version = version or lm_eval.__version__
    hint = (f"the cardhouse backend supports lm-eval {SUPPORTED_LM_EVAL} (install it with "
            f"pip install 'lm-eval[hf]{SUPPORTED_LM_EVAL}'), or use backend='hflm' (--backend hflm)")
    if Version(version) not in SpecifierSet(SUPPORTED_LM_EVAL):
        raise UnsupportedLmEvalError(f"lm-eval {version} is installed; {hint}")
    params = list(inspect.signature(HFLM._loglikelihood_tokens).parameters)
    if params != _EXPECTED_SIGNATURE:
        raise UnsupportedLmEvalError(f"lm-eval {version}'s HFLM._loglikelihood_tokens takes {params}, "
                                     f"not {_EXPECTED_SIGNATURE}; {hint}")
    return version


@dataclass
class _Row:
    """One distinct model input and what is scored on it (its last ``span`` positions)."""

    tokens: tuple[int, ...]
    span: int = 0
    requests: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, continuation)

    @property
    def first_scored(self) -> int:
        return len(self.tokens) - self.span


@dataclass
class _Group:
    rows: list[_Row]
    prefix: int  # tokens run once for every row

    @property
    def suffix(self) -> int:
        return max(len(row.tokens) for row in self.rows) - self.prefix

    def cost(self) -> int:  # token positions computed: the prefix once, then each row's suffix
        return self.prefix + sum(len(row.tokens) - self.prefix for row in self.rows)


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def plan_groups(rows: list[_Row]) -> list[_Group]:
    """Group rows (sorted by tokens, so a shared prefix means neighbours) where sharing saves work.

    A group's prefix is the start its rows share, up to one token before the shortest row ends
    (every row keeps a suffix); it may reach into the continuations (PIQA's two solutions often
    differ in a word or two), whose log-probabilities the prefix pass then computes once. A row joins
    the group before it if that saves token positions and keeps at least half of the group's prefix
    (a lone row counts up to its first scored position): a template shared by every item
    ("Question:") must not swallow the contexts that items really share.
    """
    groups: list[_Group] = []
    for row in sorted(rows, key=lambda r: r.tokens):
        if groups:
            last = groups[-1]
            cap = last.prefix if len(last.rows) > 1 else len(last.rows[0].tokens) - 1
            shared = min(cap, _common_prefix(last.rows[0].tokens, row.tokens), len(row.tokens) - 1)
            joined = _Group(last.rows + [row], shared)
            if 2 * shared >= last.prefix and joined.cost() < last.cost() + len(row.tokens):
                groups[-1] = joined
                continue
        groups.append(_Group([row], row.first_scored))
    return groups


def _batches(items: list, size, limit: int, fits=lambda batch: True) -> list[list]:
    """Consecutive items, at most ``limit`` (counted by ``size``) a batch, each batch passing ``fits``."""
    batches: list[list] = []
    for item in items:
        if batches and sum(map(size, batches[-1])) + size(item) <= limit and fits(batches[-1] + [item]):
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def pack_trees(groups: list[_Group], rows: int) -> list[list[list[_Group]]]:
    """Forward passes of at most ``rows`` rows, each row a list of trees (a group's prefix, then each
    member's suffix: ``group.cost()`` positions), first fit by decreasing length: a pass is as wide as
    its longest tree and shorter trees fill the rows' ends, so almost nothing is padding. A pass holds
    at most ``rows`` x its width positions, the bound HFLM's batches of that width have."""
    passes: list[list[list[_Group]]] = []
    free: list[tuple[list[_Group], list[int]]] = []  # every row so far, with its free positions
    for group in sorted(groups, key=_Group.cost, reverse=True):
        n = group.cost()
        row = next((r for r in free if r[1][0] >= n), None)
        if row is None:
            if not passes or len(passes[-1]) == rows:
                passes.append([])
            width = passes[-1][0][0].cost() if passes[-1] else n
            row = ([], [width])
            passes[-1].append(row[0])
            free.append(row)
        row[0].append(group)
        row[1][0] -= n
    return passes


def takes_tree_masks(model) -> bool:
    """Whether every choice of an item can run in one packed pass: the family takes a custom 4-D mask and
    position ids as given (the adapter table's ``tree_mask``), under an attention that reads such a mask."""
    try:
        family = adapter_for(model)
    except UnsupportedModelError:
        return False
    return family.tree_mask and getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")


PADDING = 1.2  # a batch's padded positions may exceed its real ones by this factor (plus one per row)


def _little_padding(lengths: list[int]) -> bool:
    """Whether a batch of sequences sorted longest first, right-padded to the first, wastes little: a
    fixed number of rows would pad 30 short prefixes to the length of the longest."""
    return lengths[0] * len(lengths) <= PADDING * sum(lengths) + len(lengths)


def _sliding_window(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


def _cache_kwarg(model) -> str:
    # transformers 5 renamed past_key_values to cache
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _load_pretrained(name: str):
    lm = load_model(name)
    with_bos = bos_first_tokenizer(lm.tokenizer)
    return lm.model, with_bos if with_bos is not None else lm.tokenizer, with_bos is not None


@register_model("cardhouse")
class CardhouseLM(HFLM):
    """HFLM's requests and tokenization, scored from shared prefixes (see the module docstring)."""

    def __init__(self, pretrained, tokenizer=None, batch_size: int | str = 32, **kwargs):
        check_lm_eval()
        if isinstance(pretrained, str):  # a cardhouse model name, folder or GGUF file: load it our way
            pretrained, loaded_tokenizer, bos = _load_pretrained(pretrained)
            tokenizer = tokenizer or loaded_tokenizer
            if bos:
                kwargs.setdefault("add_bos_token", True)
        check_not_streamed(pretrained)
        if not str(batch_size).isdigit():
            raise ValueError(f"the cardhouse backend needs an integer batch size, got {batch_size!r}")
        kwargs.setdefault("device", str(input_device(pretrained)))
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=int(batch_size), **kwargs)
        self._window = _sliding_window(self.model.config)
        self._cache_kwarg = _cache_kwarg(self.model)
        self._pad = self.tokenizer.pad_token_id or 0
        self._packs = takes_tree_masks(self.model)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        from tqdm.auto import tqdm

        rows: dict[tuple[int, ...], _Row] = {}
        for index, (_, context, continuation) in enumerate(requests):
            assert len(context) > 0 and 0 < len(continuation) <= self.max_length  # as HFLM
            # HFLM's input: left-truncated to max_length + 1 tokens, the last one is never fed
            tokens = tuple((context + continuation)[-(self.max_length + 1):][:-1])
            row = rows.setdefault(tokens, _Row(tokens))
            row.span = max(row.span, len(continuation))
            row.requests.append((index, continuation))
        groups = plan_groups(list(rows.values()))

        def in_window(group: _Group) -> bool:  # under a sliding window, a tree or a gathered cache is exact
            return self._window is None or group.prefix + group.suffix < self._window  # while rows stay inside it

        packed = [g for g in groups if self._packs and in_window(g)]
        rest = [g for g in groups if not (self._packs and in_window(g))]
        # inputs too long for a gathered cache under a sliding window run in one piece
        rest = [g for group in rest
                for g in ([group] if in_window(group) else [_Group([row], 0) for row in group.rows])]
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="Running loglikelihood requests (cardhouse)")
        batch_size = override_bs or self.batch_size

        def done(index: int, answer: tuple[float, bool]) -> None:
            answers[index] = answer
            if requests[index][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
            bar.update(1)

        for rows_of_pass in pack_trees(packed, batch_size):
            for index, answer in self._score_trees(rows_of_pass):
                done(index, answer)
        # longest prefixes first (as HFLM: a memory error shows at once); the chunk bounds the cached prefixes
        for chunk in _batches(sorted(rest, key=lambda g: g.prefix, reverse=True), lambda g: 1, 8 * batch_size):
            for row, scored in self._score_chunk(chunk, batch_size):
                for index, continuation in row.requests:
                    done(index, self._answer(row, scored, continuation))
        bar.close()
        return answers

    def _score_trees(self, rows_of_pass: list[list[_Group]]):
        """One forward pass over packed trees: (request index, (log-likelihood, is greedy)) for their requests.

        A tree is a group's shared prefix followed by each member's own suffix; a suffix attends to the
        prefix and to itself (causally), with positions continuing from the prefix's end, so each member
        sees exactly its own input, as in a pass of its own. Trees sit side by side in a row (each sees
        only itself) and a row's unused end attends only to itself (no empty softmax)."""
        width = max(sum(g.cost() for g in row) for row in rows_of_pass)
        ids = torch.full((len(rows_of_pass), width), self._pad, dtype=torch.long)
        positions = torch.zeros((len(rows_of_pass), width), dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows_of_pass), 1, 1)
        keep = torch.zeros((len(rows_of_pass), width), dtype=torch.bool)
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        columns: list[tuple[_Row, int, list[int]]] = []  # (row, its pass row, its column at each scored position)
        for r, trees in enumerate(rows_of_pass):
            at = 0
            for group in trees:
                p = group.prefix
                ids[r, at:at + p] = torch.tensor(group.rows[0].tokens[:p], dtype=torch.long)
                positions[r, at:at + p] = torch.arange(p)
                allowed[r, at:at + p, at:at + p] = causal[:p, :p]
                start = at + p
                for row in group.rows:
                    n = len(row.tokens) - p
                    ids[r, start:start + n] = torch.tensor(row.tokens[p:], dtype=torch.long)
                    positions[r, start:start + n] = torch.arange(p, p + n)
                    allowed[r, start:start + n, at:at + p] = True
                    allowed[r, start:start + n, start:start + n] = causal[:n, :n]
                    cols = [at + i for i in range(row.first_scored, p)] + \
                           [start + i - p for i in range(max(row.first_scored, p), len(row.tokens))]
                    keep[r, cols] = True
                    columns.append((row, r, cols))
                    start += n
                at = start
        inputs = {"input_ids": ids.to(self.device), "position_ids": positions.to(self.device),
                  "attention_mask": self._attention_mask(allowed[:, None]).to(self.device), "use_cache": False}
        log_probs = self._log_softmax(self._call(keep, **inputs))
        greedy = log_probs.argmax(dim=-1)
        flat = keep.flatten().cumsum(0) - 1  # pass position -> its index among the kept ones
        for row, r, cols in columns:
            at = flat[torch.tensor(cols) + r * width].to(log_probs.device)
            for index, continuation in row.requests:
                target = torch.tensor(continuation, dtype=torch.long, device=log_probs.device)
                where = at[len(at) - len(continuation):]
                yield index, (float(log_probs[where, target].sum()), bool((greedy[where] == target).all()))

    def _attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A 4-D mask as the attention implementation reads it: sdpa a boolean one, eager an additive one."""
        if self.model.config._attn_implementation == "sdpa":
            return allowed
        dtype = self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    @staticmethod
    def _answer(row: _Row, scored: "_Scored", continuation: list[int]) -> tuple[float, bool]:
        """Sum and greediness over the continuation's positions: those inside the group's prefix (already
        reduced to the target's log-probability and whether it was the argmax), then the suffix's."""
        start = len(row.tokens) - len(continuation)  # the position predicting the continuation's first token
        in_suffix = min(len(continuation), len(row.tokens) - scored.suffix_start)
        target = torch.tensor(continuation[len(continuation) - in_suffix:], dtype=torch.long,
                              device=scored.log_probs.device)
        log_probs = scored.log_probs[len(scored.log_probs) - in_suffix:]
        total = log_probs.gather(1, target[:, None]).sum()
        greedy = bool((log_probs.argmax(dim=-1) == target).all())
        if start < scored.suffix_start:
            inside = slice(start - scored.prefix_start, scored.suffix_start - scored.prefix_start)
            total = total + scored.prefix_log_probs[inside].sum()
            greedy = greedy and bool(scored.prefix_greedy[inside].all())
        return float(total), greedy

    def _call(self, keep: torch.Tensor | int = 0, **inputs) -> torch.Tensor:
        """The model's logits; with a boolean ``keep`` (batch x positions), only at its True positions
        (flattened, row by row): the LM head and its 49k-wide rows are not computed for the others."""
        with torch.inference_mode(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            if isinstance(keep, int):
                return self.model(**inputs, logits_to_keep=keep).logits
            if _PER_ROW_KEEP:
                return self.model(**inputs, logits_to_keep=keep.to(self.device)).logits
            return self.model(**inputs).logits[keep.to(self.device)]  # older transformers: 1-D positions only

    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)

    def _run_prefixes(self, groups: list[_Group], batch_size: int) -> tuple[dict, dict]:
        """Right-padded batches of prefixes: id(group) -> its prefix's (keys, values) per layer, and
        id(row) -> (log-probability of its next token, was it the argmax) at each of its scored
        positions inside the prefix (targets there are the row's own tokens, shared by its requests)."""
        from transformers import DynamicCache

        cached, scored = {}, {}
        for batch in _batches([g for g in groups if g.prefix], lambda g: 1, batch_size,
                              lambda b: _little_padding([g.prefix for g in b])):
            width = batch[0].prefix  # sorted: the first is the longest
            ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
            keep = torch.zeros((len(batch), width), dtype=torch.bool)
            for i, group in enumerate(batch):
                ids[i, :group.prefix] = torch.tensor(group.rows[0].tokens[:group.prefix])
                keep[i, min(row.first_scored for row in group.rows):group.prefix] = True
            cache = DynamicCache(config=self.model.config)
            inputs = {"input_ids": ids.to(self.device), "use_cache": True, self._cache_kwarg: cache}
            logits = self._call(keep, **inputs) if keep.any() else self._call(1, **inputs)
            at = 0
            for i, group in enumerate(batch):
                cached[id(group)] = [(layer.keys[i:i + 1, :, :group.prefix], layer.values[i:i + 1, :, :group.prefix])
                                     for layer in cache.layers]
                n = int(keep[i].sum())
                if n:
                    log_probs, first = self._log_softmax(logits[at:at + n]), group.prefix - n
                    at += n
                    for row in group.rows:
                        rows = log_probs[max(0, row.first_scored - first):]
                        target = torch.tensor(row.tokens[group.prefix - len(rows) + 1:group.prefix + 1],
                                              device=rows.device)
                        scored[id(row)] = (rows.gather(1, target[:, None])[:, 0], rows.argmax(dim=-1) == target)
        return cached, scored

    def _gathered_cache(self, parts: list, width: int):
        """One cache row per member: its group's prefix, zero-padded to ``width`` (the gap is masked)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        template = next(p for p in parts if p is not None)
        for layer, (keys, values) in enumerate(template):
            def gather(which, like):
                return torch.cat([F.pad(p[layer][which], (0, 0, 0, width - p[layer][which].shape[2])) if p is not None
                                  else like.new_zeros(like.shape[:2] + (width, like.shape[3])) for p in parts])
            cache.update(gather(0, keys), gather(1, values), layer)
        return cache

    def _score_chunk(self, groups: list[_Group], batch_size: int):
        """Run the chunk's prefixes, then its members' suffixes (sorted by length) against them."""
        cached, in_prefix = self._run_prefixes(groups, batch_size)
        members = sorted(((group, row) for group in groups for row in group.rows),
                         key=lambda m: len(m[1].tokens) - m[0].prefix, reverse=True)

        def fits(batch):  # little padding; a gap in a sliding-window cache would shift the window
            width = max(g.prefix for g, _ in batch)
            if not _little_padding([len(row.tokens) - group.prefix for group, row in batch]):
                return False
            return self._window is None or width == 0 or width + len(batch[0][1].tokens) - batch[0][0].prefix < self._window

        for batch in _batches(members, lambda m: 1, batch_size, fits):
            width = max(group.prefix for group, _ in batch)
            length = len(batch[0][1].tokens) - batch[0][0].prefix
            ids = torch.full((len(batch), length), self._pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width + length), dtype=torch.long)
            keep = torch.zeros((len(batch), length), dtype=torch.bool)
            for r, (group, row) in enumerate(batch):
                suffix = row.tokens[group.prefix:]
                ids[r, :len(suffix)] = torch.tensor(suffix)
                mask[r, :group.prefix] = 1  # the group's prefix, not the gap after it
                mask[r, width:width + len(suffix)] = 1
                keep[r, max(0, row.first_scored - group.prefix):len(suffix)] = True  # scored positions only
            positions = torch.tensor([g.prefix for g, _ in batch])[:, None] + torch.arange(length)
            inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                      "position_ids": positions.to(self.device), "use_cache": bool(width)}
            if width:
                inputs[self._cache_kwarg] = self._gathered_cache([cached.get(id(g)) for g, _ in batch], width)
            # what the cache holds: each row's prefix tokens at width (reuse_prefix keys the pass by it in a sweep)
            with cache_label((width, tuple(group.rows[0].tokens[:group.prefix] for group, _ in batch))):
                log_probs = self._log_softmax(self._call(keep, **inputs))
            at = 0
            for r, (group, row) in enumerate(batch):
                n = int(keep[r].sum())
                lp, greedy = in_prefix.get(id(row), (log_probs[:0, 0], log_probs[:0, 0].bool()))
                yield row, _Scored(group.prefix - len(lp), group.prefix, lp, greedy, log_probs[at:at + n])
                at += n


@dataclass
class _Scored:
    """A row's log-probabilities: positions ``prefix_start..suffix_start-1`` (inside its group's prefix)
    reduced to the target's and greediness; from ``suffix_start`` on, full rows over the vocabulary."""

    prefix_start: int
    suffix_start: int
    prefix_log_probs: torch.Tensor
    prefix_greedy: torch.Tensor
    log_probs: torch.Tensor


if __name__ == "__main__":  # lm-eval's own command line, with the cardhouse backend registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
