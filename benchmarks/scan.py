"""Cost of the streaming scan against plain forward passes, and its memory as N grows.

    python benchmarks/scan.py [--model smollm2-135m] [--prompts 64]

Prints (1) the time of `scan` over N prompts divided by the time of plain forward
passes of the model body over the same prompts, measured side by side in one run
(goal <= 1.15), and (2) the bytes held by the statistics after N = 8, 32, 128 prompts
(goal: flat).
"""

from __future__ import annotations

import argparse
import time

import torch

from cardhouse import load_model, scan
from cardhouse.analysis import load_prompts
from cardhouse.capture import StreamingStats, run_batches, tokenize_prompts


def prompts_of(n: int) -> list[str]:
    base = load_prompts()
    # longer, varied prompts: pairs of real sentences
    return [f"{base[i % len(base)]} {base[(3 * i + 1) % len(base)]}" for i in range(n)]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lm = load_model(args.model)
    texts = prompts_of(args.prompts)
    token_lists = tokenize_prompts(lm, texts)
    n_tokens = sum(map(len, token_lists))

    plain = lambda: run_batches(lm, token_lists, lambda batch: {}, progress=False)  # noqa: E731
    scanned = lambda: scan(lm, texts, progress=False)  # noqa: E731
    plain(), scanned()  # warm-up
    t_plain, t_scan = [], []
    for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
        t_plain.append(best_of(plain, 1))
        t_scan.append(best_of(scanned, 1))
    tp, ts = min(t_plain), min(t_scan)
    print(f"{args.model}: {args.prompts} prompts, {n_tokens} tokens, torch threads {torch.get_num_threads()}")
    print(f"plain forward  {tp:6.2f} s  ({n_tokens / tp:6.0f} tokens/s)")
    print(f"scan           {ts:6.2f} s  ({n_tokens / ts:6.0f} tokens/s)")
    print(f"ratio scan / plain = {ts / tp:.3f}  (goal <= 1.15)")

    d, n_layers = lm.model.config.hidden_size, len(lm.blocks)
    stats = StreamingStats(n_layers, d)
    sizes = {}
    updates = 0
    gen = torch.Generator().manual_seed(0)
    for n in (8, 32, 128):
        while updates < n:
            acts = torch.randn(1, 48, d, generator=gen)
            stats.update(updates % n_layers, acts, torch.ones(1, 48), torch.zeros(1, 48, dtype=torch.long),
                         torch.tensor([updates]))
            updates += 1
        kept = sum(len(e) for e in stats.entries)
        sizes[n] = stats.nbytes() + kept * 64
    print("statistics memory by prompts seen: " + ", ".join(f"N={n}: {b / 1024:.0f} KiB" for n, b in sizes.items()))
    print(f"ratio memory N=128 / N=8 = {sizes[128] / sizes[8]:.3f}  (goal: 1.0, flat)")


if __name__ == "__main__":
    main()
