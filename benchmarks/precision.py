"""Cost of the headroom scan against one plain forward pass over the same tokens.

    python benchmarks/precision.py [--model smollm2-135m] [--prompts 64]

The headroom scan keeps one running max |a| per hook point (8 points x every layer); the plain pass runs
the model body over the same batches with no hook. Measured side by side, interleaved, best of
``--repeats``; goal: ratio <= 1.2.
"""

from __future__ import annotations

import torch

from cardhouse import load_model
from cardhouse.capture import run_batches, tokenize_prompts
from cardhouse.precision import headroom

from _timing import interleaved, options, prompts_of  # this folder's shared timing


def main():
    args = options(__doc__.splitlines()[0]).parse_args()
    lm = load_model(args.model)
    token_lists = tokenize_prompts(lm, prompts_of(args.prompts))
    n_tokens = sum(map(len, token_lists))

    plain = lambda: run_batches(lm, token_lists, lambda batch: {}, progress=False)  # noqa: E731
    scanned = lambda: headroom(lm, token_lists, progress=False)  # noqa: E731
    best = interleaved({"plain": plain, "headroom": scanned}, args.repeats)
    tp, ts = best["plain"], best["headroom"]
    hooks = len(headroom(lm, token_lists[:1], progress=False).points)
    print(f"{args.model}: {args.prompts} prompts, {n_tokens} tokens, {hooks} hook points, "
          f"torch threads {torch.get_num_threads()}")
    print(f"plain forward  {tp:6.2f} s  ({n_tokens / tp:6.0f} tokens/s)")
    print(f"headroom scan  {ts:6.2f} s  ({n_tokens / ts:6.0f} tokens/s)")
    print(f"ratio headroom / plain = {ts / tp:.3f}  (goal <= 1.2)")


if __name__ == "__main__":
    main()
