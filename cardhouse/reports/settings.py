"""What the report measures (``Settings``), and the checks that refuse bad settings before any model
time is spent."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..analysis import Criterion
from ..evaluation.measure import Budget
from ..validation import check_settings
from .macdrop_section import compare_json
from .steps import OPTIONAL_STEPS


@dataclass(frozen=True)
class Settings:
    """What the report measures. ``Settings.quick()`` is minute-scale; ``Settings.full()`` the papers' sets."""

    mode: str = "full"
    prompts: str = "builtin"  # builtin, a text file or corpus:NAME (see analysis.load_prompts)
    prompt_limit: int | None = None
    relative: bool = False  # ratio-only criterion for massive activations
    min_abs: float | None = None  # the criterion's options (None: the default; see Criterion.from_options)
    min_ratio: float | None = None
    k: int = 5  # massive-weight indices listed
    layer: int | None = None  # massive-weight layer (None: detected)
    attack_k: int = 2  # rows zeroed / retained in the attack table
    ks: tuple[int, ...] | None = None  # sweep; None: 0, 1, 2, 3, 5, 10, 20, 50, ... up to the whole layer
    corpora: tuple[str, ...] = ("wikipedia", "c4")
    max_tokens: int = 2048  # corpus tokens per corpus and variant
    context: int = 512
    tasks: tuple[str, ...] = ()  # zero-shot tasks (lm-eval), measured for every variant
    limit: int | None = None  # zero-shot examples per task
    seed: int = 0
    bos: bool | None = None
    extras: tuple[str, ...] = ()  # names of OPTIONAL_STEPS to run
    macdrop: str | None = None  # a `cardhouse finetune-compare` folder (or its compare.json), for "macdrop"
    load: dict = field(default_factory=dict)  # load_model placement keywords (dtype, device, device_map, ...)
    images: str = "builtin"  # image models: builtin photographs, a folder or a file
    sentences: str = "builtin"  # text encoders: builtin, a text file or corpus:NAME
    pairs: int = 200  # text encoders: MRPC sentence pairs of the rank-agreement measure
    copies: int = 4  # image models: augmented copies per photograph of the retrieval measure

    # the settings only an encoder's page reads: the run table leaves them out of a report of language models
    ENCODER_ONLY = ("images", "sentences", "pairs", "copies")

    @classmethod
    def quick(cls, **overrides) -> "Settings":
        return replace(cls(mode="quick", ks=(1, 2, 5), corpora=("wikipedia",), max_tokens=510, context=256,
                           pairs=100, copies=2), **overrides)

    @classmethod
    def full(cls, **overrides) -> "Settings":
        return replace(cls(mode="full"), **overrides)

    @property
    def criterion(self):
        return Criterion.from_options(self.min_abs, self.min_ratio, self.relative)

    def budget(self):
        return Budget(corpora=list(self.corpora), max_tokens=self.max_tokens, context=self.context,
                      tasks=list(self.tasks), limit=self.limit)

    def check(self) -> None:
        """Bad settings fail here, before any model time is spent or any file is written."""
        if not self.corpora:
            raise ValueError("at least one corpus is needed for the attacks")
        if self.context < 2 or self.max_tokens < self.context:
            raise ValueError(f"--max-tokens ({self.max_tokens}) must hold at least one window of "
                             f"--context ({self.context}) tokens")
        check_settings(None, self)  # the ranges that need no model (build_report checks each model's too)
        self.budget()  # the evaluation's own checks: unknown corpora and zero-shot tasks
        self.criterion  # noqa: B018  (--relative with --min-abs is refused here)
        if not 1 <= self.copies <= 5 or self.pairs < 1:
            raise ValueError(f"copies must be 1..5 and pairs at least 1 (got {self.copies}, {self.pairs})")
        unknown = [e for e in self.extras if e not in OPTIONAL_STEPS]
        if unknown:
            raise ValueError(f"unknown extra section {', '.join(unknown)}; available: "
                             f"{', '.join(OPTIONAL_STEPS) or 'none yet'}")
        if "macdrop" in self.extras:
            if self.macdrop is None:
                raise ValueError("the MacDrop section reads a finished comparison: give --macdrop-compare FOLDER "
                                 "(the output of `cardhouse finetune-compare`)")
            compare_json(self.macdrop)

