"""What the timing benchmarks share: their common options, longer prompts of a given count, and two or more
functions timed side by side (``python benchmarks/x.py`` puts this folder on the path, so
``from _timing import ...``)."""

from __future__ import annotations

import argparse
import time
from typing import Callable

from cardhouse.analysis import load_prompts


def options(description: str | None = None) -> argparse.ArgumentParser:
    """--model, --prompts and --repeats; a benchmark adds its own before ``parse_args()``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    return parser


def prompts_of(n: int) -> list[str]:
    """``n`` longer, varied prompts: pairs of the built-in prompts' real sentences."""
    base = load_prompts()
    return [f"{base[i % len(base)]} {base[(3 * i + 1) % len(base)]}" for i in range(n)]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The best of ``repeats`` seconds of each function after one warm-up call each; the runs alternate so that
    machine noise (a shared machine) hits every side alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(seconds) for name, seconds in times.items()}
