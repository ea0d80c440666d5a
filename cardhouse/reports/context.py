"""What a report step is and what it sees: ``Step(key, title, run)`` and the ``Context`` it runs in.

A step is a function ``run(ctx) -> Section``; it reads what earlier steps computed with
``ctx.need(key)`` and leaves its own results for later steps with ``ctx.keep(key, value)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..models.loading import LoadedModel
from .html import Section

if TYPE_CHECKING:  # annotations only: the settings module imports the steps, which import this one
    from .settings import Settings


class StepError(RuntimeError):
    """A step cannot run (for instance because a step it needs failed)."""


@dataclass
class Context:
    """What a step sees: the model being reported on, the settings, and what earlier steps computed."""

    source: str | LoadedModel
    settings: Settings
    prompts: list[str]
    folder: Path
    prefix: str  # of this model's figure files
    tick: Callable[[str], None] = lambda detail: None  # progress detail of the running step
    done: dict[str, object] = field(default_factory=dict)

    def need(self, key: str):
        if key not in self.done:
            raise StepError(f"it needs the {key!r} step, which failed or did not run")
        return self.done[key]

    def keep(self, key: str, value) -> None:
        self.done[key] = value

    @property
    def lm(self) -> LoadedModel:
        return self.need("model")

    def figure(self, name: str) -> Path:
        return self.folder / f"{self.prefix}{name}.png"


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    run: Callable[[Context], Section]
    applies: Callable[[Context], bool] | None = None  # run only for the models it applies to (None: all)
