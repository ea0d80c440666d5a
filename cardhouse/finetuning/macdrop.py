"""MacDrop (House of Cards, Sec. 4, Algorithm 1): curriculum dropout on the massive weights during PEFT.

For every optimisation step t (all micro-batches of one optimizer update):

1. keep a copy of the massive rows of W_up and W_gate in layer l (frozen base weights);
2. multiply them by a fresh Bernoulli keep-mask, each entry dropped with probability p_t;
3. run the step (forward, backward, optimizer update of the adapter);
4. write the copy back, bit for bit.

p_t follows a schedule that decays from p0, so the adapter first learns to cope without the
massive weights and is then trained on the intact model. ``MacDrop`` is a
``transformers.TrainerCallback`` that does steps 1-4 around each update; entering it as a
context manager around ``trainer.train()`` also restores the rows when training stops on an
error or Ctrl-C between on_step_begin and on_step_end::

    macdrop = MacDrop.for_model(lm, MacDropConfig(schedule="step"))
    trainer = Trainer(model=peft_model, ..., callbacks=[macdrop])
    with macdrop:
        trainer.train()

The masks come from a generator seeded with (seed, step), so a resumed run draws the same
masks as an uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from ..analysis.criterion import Criterion
from ..analysis.massive_weights import find_massive_weights
from ..interventions.weights import check_indices, overwrite_slices, random_indices
from ..models.adapters import Blocks
from ..models.loading import LoadedModel

SCHEDULES = ("constant", "step", "epoch-before", "epoch-after", "exponential")
SCOPES = ("massive", "non-massive", "all")


class NoMassiveWeightsError(ValueError):
    pass


@dataclass
class MacDropConfig:
    p0: float = 0.8  # initial drop rate
    schedule: str = "step"  # see drop_rate
    alpha: float | None = None  # exponential decay per step; None: 3 / total steps (p_T = p0 * e^-3)
    k: int = 5  # number of massive rows
    scope: str = "massive"  # massive rows, as many random non-massive rows, or all rows of layer l
    layer: int | None = None  # layer l (default: detected)
    rows: list[int] | None = None  # the massive rows, given by hand (default: detected, top-k)
    expert: int | None = None  # the Mixture-of-Experts expert that holds them (with ``rows``)
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.p0 <= 1.0:
            raise ValueError(f"the MacDrop rate p0 must be in [0, 1], got {self.p0}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown MacDrop schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown MacDrop scope {self.scope!r}; known: {', '.join(SCOPES)}")
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.alpha is not None and self.alpha < 0:
            raise ValueError(f"the exponential decay alpha must be >= 0, got {self.alpha}")
        if self.rows is not None and not self.rows:
            raise ValueError("the list of massive rows is empty")

    def to_dict(self) -> dict:
        return asdict(self)


def drop_rate(config: MacDropConfig, step: int, total_steps: int, epoch: int = 1, total_epochs: float = 1) -> float:
    """p_t: the drop rate of optimisation step ``step`` (0-based) in epoch ``epoch`` (1-based).

    constant p0; step p0 (1 - t/T); epoch-before p0 (1 - (e-1)/E); epoch-after p0 (1 - e/E);
    exponential p0 exp(-alpha t).
    """
    p0, schedule = config.p0, config.schedule
    if schedule == "constant":
        p = p0
    elif schedule == "step":
        p = p0 * (1 - step / max(total_steps, 1))
    elif schedule == "epoch-before":
        p = p0 * (1 - (epoch - 1) / total_epochs)
    elif schedule == "epoch-after":
        p = p0 * (1 - epoch / total_epochs)
    elif schedule == "exponential":
        alpha = config.alpha if config.alpha is not None else 3.0 / max(total_steps, 1)
        p = p0 * math.exp(-alpha * step)
    else:
        raise ValueError(f"unknown MacDrop schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    return min(max(p, 0.0), 1.0)  # a partial last epoch can take e/E past 1


def scope_rows(scope: str, massive: Sequence[int], size: int, *, seed: int = 0) -> list[int]:
    """The rows MacDrop masks: the massive rows, the same number of random others, or all ``size`` rows."""
    if scope == "massive":
        return list(massive)
    if scope == "non-massive":
        return random_indices(size, len(massive), exclude=massive, seed=seed)
    if scope == "all":
        return list(range(size))
    raise ValueError(f"unknown MacDrop scope {scope!r}; known: {', '.join(SCOPES)}")


def detect_massive_rows(lm: LoadedModel, k: int = 5, layer: int | None = None,
                        criterion: Criterion = Criterion()) -> tuple[int, list[int], int | None]:
    """(layer l, its top-k massive rows, the expert of an MoE) from ``find_massive_weights``.

    Refuses when the FFN of layer l writes no massive value into the BOS token's hidden state
    (|ffn| below the criterion's ``min_abs``): there are no massive weights to drop.
    """
    mw = find_massive_weights(lm, k=k, layer=layer, criterion=criterion)
    written = mw.trace[mw.layer]["ffn"]
    if abs(written) < criterion.min_abs:
        raise NoMassiveWeightsError(
            f"no massive weights detected in {lm.name}: the FFN of layer {mw.layer}, the largest writer, adds only "
            f"{written:.3g} to the BOS token's dimension {mw.dim} (massive means |a| >= {criterion.min_abs:g}); "
            "give the layer and rows yourself (MacDropConfig(layer=..., rows=[...]), --layer/--rows)")
    return mw.layer, mw.indices, mw.expert


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (PEFT keeps the base weights' tensors)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class MacDrop(TrainerCallback):
    """Algorithm 1 as a TrainerCallback: mask on_step_begin, restore on_step_end."""

    def __init__(self, model: nn.Module, layer: int, massive: Sequence[int], config: MacDropConfig | None = None,
                 *, expert: int | None = None):
        self.config = config or MacDropConfig()
        blocks = Blocks.of(_base_model(model))
        blocks.check_layer(layer)
        size = blocks.intermediate_size(layer)
        self.layer, self.expert = layer, expert
        self.massive = check_indices(massive, size, "massive row")
        self.rows = scope_rows(self.config.scope, self.massive, size, seed=self.config.seed)
        # the weight matrices only (W_gate, W_up or fc_in): Algorithm 1 masks rows of weights, not biases
        self.slices = [(t, axis, torch.tensor([offset + i for i in self.rows], device=t.device))
                       for t, axis, offset in blocks.neuron_slices(layer, expert) if t.dim() >= 2]
        self.last_rate: float | None = None
        self.rates: dict[int, float] = {}  # step -> p_t, as applied
        self._restore: ExitStack | None = None  # open while the rows are masked

    @classmethod
    def for_model(cls, lm: LoadedModel, config: MacDropConfig | None = None, model: nn.Module | None = None,
                  criterion: Criterion = Criterion()) -> "MacDrop":
        """Find the massive rows of ``lm`` (or take ``config.rows``); ``model`` is the PEFT model, if wrapped already."""
        config = config or MacDropConfig()
        if config.rows is not None:
            layer = config.layer
            if layer is None:
                raise ValueError("give the layer of the massive rows too (MacDropConfig(layer=...), --layer)")
            massive, expert = config.rows, config.expert
        else:
            layer, massive, expert = detect_massive_rows(lm, config.k, config.layer, criterion)
        return cls(model if model is not None else lm.model, layer, massive, config, expert=expert)

    def describe(self) -> dict:
        return {**self.config.to_dict(), "layer": self.layer, "massive_rows": self.massive, "masked_rows": self.rows,
                "expert": self.expert, "rates": self.rates}

    @contextmanager
    def dropped(self, p: float, step: int = 0) -> Iterator[None]:
        """The rows multiplied by a Bernoulli(1 - p) keep-mask inside, the original bits back on exit."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)

        def masked(rows: torch.Tensor) -> torch.Tensor:
            keep = torch.rand(rows.shape, generator=generator) >= p
            return rows * keep.to(rows.device, rows.dtype)

        with overwrite_slices([(tensor, axis, index, masked) for tensor, axis, index in self.slices]):
            yield

    def rate(self, state) -> float:
        """p_t for the Trainer's next optimisation step."""
        epoch = int(state.epoch or 0) + 1
        return drop_rate(self.config, state.global_step, state.max_steps, epoch, state.num_train_epochs or 1)

    @property
    def masked(self) -> bool:
        return self._restore is not None

    def mask(self, p: float, step: int) -> None:
        """Mask the rows until ``restore()`` (what on_step_begin does)."""
        if self._restore is None:
            stack = ExitStack()
            stack.enter_context(self.dropped(p, step))
            self._restore = stack

    def restore(self) -> None:
        """Write the original rows back (a no-op when they are not masked)."""
        stack, self._restore = self._restore, None
        if stack is not None:
            stack.close()

    # --- TrainerCallback ------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if any(t.requires_grad for t, _, _ in self.slices):
            warnings.warn("the masked rows are trainable: restoring them after each step discards their update "
                          "(Algorithm 1 is meant for PEFT, where the base weights are frozen)")

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.masked:
            self.last_rate = self.rates[state.global_step] = self.rate(state)
            self.mask(self.last_rate, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.restore()

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.last_rate is not None and "loss" in logs:
            logs["macdrop_p"] = round(self.last_rate, 6)

    # --- a guard around trainer.train() -----------------------------------------------------
    def __enter__(self) -> "MacDrop":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
