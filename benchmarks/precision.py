"""Cost of the headroom scan against one plain forward pass over the same tokens.

    python benchmarks/precision.py [--model smollm2-135m] [--prompts 64]

The headroom scan keeps one running max |a| per hook point (8 points x every layer); the plain pass runs
the model body over the same batches with no hook. Measured side by side, interleaved, best of
``--repeats``; goal: ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import time

import torch

from cardhouse import load_model
from cardhouse.analysis import load_prompts
from cardhouse.capture import run_batches, tokenize_prompts
from cardhouse.precision import headroom


def prompts_of(n: int) -> list[str]:
    base = load_prompts()
    return [f"{base[i % len(base)]} {base[(3 * i + 1) % len(base)]}" for i in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lm = load_model(args.model)
    token_lists = tokenize_prompts(lm, prompts_of(args.prompts))
    n_tokens = sum(map(len, token_lists))

    plain = lambda: run_batches(lm, token_lists, lambda batch: {}, progress=False)  # noqa: E731
    scanned = lambda: headroom(lm, token_lists, progress=False)  # noqa: E731
    plain(), scanned()  # warm-up
    t_plain, t_scan = [], []
    for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
        t_plain.append(timed(plain))
        t_scan.append(timed(scanned))
    tp, ts = min(t_plain), min(t_scan)
    hooks = len(headroom(lm, token_lists[:1], progress=False).points)
    print(f"{args.model}: {args.prompts} prompts, {n_tokens} tokens, {hooks} hook points, "
          f"torch threads {torch.get_num_threads()}")
    print(f"plain forward  {tp:6.2f} s  ({n_tokens / tp:6.0f} tokens/s)")
    print(f"headroom scan  {ts:6.2f} s  ({n_tokens / ts:6.0f} tokens/s)")
    print(f"ratio headroom / plain = {ts / tp:.3f}  (goal <= 1.2)")


if __name__ == "__main__":
    main()
