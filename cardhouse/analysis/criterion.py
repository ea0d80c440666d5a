"""What "massive" means: one ``Criterion`` passed to everything that decides it.

Sun et al.'s rule of thumb: an activation is massive if |a| > ``min_abs`` and |a| > ``min_ratio`` x
the median |a| of its layer. The scan, the massive-weight search (is position 0 massive?), MacDrop
(does the FFN of layer l write a massive value?) and set C of the attention and trace analyses
(which tokens carry one) all read the same object; the CLI builds it from ``--min-abs``,
``--min-ratio`` and ``--relative`` (``cli.common.criterion_from``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_MIN_ABS, DEFAULT_MIN_RATIO = 100.0, 1000.0
RELATIVE_MIN_RATIO = 100.0  # the ratio-only criterion's default


@dataclass(frozen=True)
class Criterion:
    """|a| > min_abs and |a| > min_ratio x the layer's median |a|; a token of set C also has its largest |h|
    above ``token_ratio`` x the median token's largest |h| (models whose whole residual stream is large,
    Gemma-3, would otherwise put every token in C)."""

    min_abs: float = DEFAULT_MIN_ABS
    min_ratio: float = DEFAULT_MIN_RATIO
    token_ratio: float = 10.0

    @classmethod
    def relative(cls, min_ratio: float = RELATIVE_MIN_RATIO) -> "Criterion":
        """For models whose magnitudes are smaller (ViTs, small LMs): a ratio to the median only."""
        return cls(0.0, min_ratio)

    @classmethod
    def from_options(cls, min_abs: float | None = None, min_ratio: float | None = None,
                     relative: bool = False) -> "Criterion":
        """The criterion of the CLI options (``--min-abs``, ``--min-ratio``, ``--relative``; None: the default)."""
        if relative:
            if min_abs is not None:
                raise ValueError("--relative is a ratio-only criterion: give --min-ratio, not --min-abs")
            return cls.relative(RELATIVE_MIN_RATIO if min_ratio is None else min_ratio)
        return cls(DEFAULT_MIN_ABS if min_abs is None else min_abs, DEFAULT_MIN_RATIO if min_ratio is None else min_ratio)

    def threshold(self, median: float) -> float:
        return max(self.min_abs, self.min_ratio * median)

    def is_massive(self, value: float, median: float) -> bool:
        return abs(value) > self.threshold(median)

    def token_cutoff(self, median: float, median_token_max: float) -> float:
        """The largest |h| a token needs to belong to set C, given its prompt's median |h| in the layer and the
        median over the prompt's tokens of their largest |h|."""
        return max(self.threshold(median), self.token_ratio * median_token_max)

    def describe(self) -> str:
        """What massive means here, for texts and tables: ``|a| > 100 and > 1000x the layer median``."""
        ratio = f"{self.min_ratio:g}x the layer median"
        return f"|a| > {self.min_abs:g} and > {ratio}" if self.min_abs > 0 else f"|a| > {ratio}"

    def to_dict(self) -> dict:
        return asdict(self)
