"""Cost of the streaming scan against plain forward passes, and its memory as N grows.

    python benchmarks/scan.py [--model smollm2-135m] [--prompts 64] [--mode float32 --mode bfloat16 --mode stream]

Prints (1) for each mode, the time of `scan` over N prompts divided by the time of plain forward
passes of the model body over the same prompts, measured side by side in one run (goal <= 1.15),
with the ratio of CPU seconds beside it and the load average (the machine may be shared). Modes:
float32 (the default load), bfloat16 (``dtype="bfloat16"``) and stream (``stream=True``: the plain side runs the same prompts block by
block without hooks, so both sides read the checkpoint once). (2) The bytes held by the statistics
after N = 8, 32, 128 prompts (goal: flat).
"""

from __future__ import annotations

import os
import time

import torch

from cardhouse import load_model, scan
from cardhouse.capture import StreamingStats, run_batches, tokenize_prompts

from _timing import interleaved, options, prompts_of  # this folder's shared timing

MODES = {"float32": {}, "bfloat16": {"dtype": "bfloat16"}, "stream": {"stream": True}}


def main():
    parser = options(__doc__.splitlines()[0])
    parser.add_argument("--mode", action="append", choices=list(MODES), help="repeatable (default: all three)")
    args = parser.parse_args()
    texts = prompts_of(args.prompts)
    for mode in args.mode or list(MODES):
        lm = load_model(args.model, **MODES[mode])
        token_lists = tokenize_prompts(lm, texts)
        n_tokens = sum(map(len, token_lists))

        cpu: dict[str, list[float]] = {}

        def cpu_timed(name, fn):  # CPU seconds beside the wall time: less hit by the other jobs of a shared machine
            def run():
                start = time.process_time()
                fn()
                cpu.setdefault(name, []).append(time.process_time() - start)
            return run

        # one no-op hook on the last block: a streamed pass reads only up to its last hooked block, and the
        # plain side must run every block the scan runs
        last = {f"blocks.{len(lm.blocks) - 1}.hook_resid_post": lambda name, x: None}
        plain = cpu_timed("plain", lambda: run_batches(lm, token_lists, lambda batch: last, progress=False))
        scanned = cpu_timed("scan", lambda: scan(lm, texts, progress=False))
        best = interleaved({"plain": plain, "scan": scanned}, args.repeats)
        tp, ts = best["plain"], best["scan"]
        cp, cs = (min(cpu[name][1:]) for name in ("plain", "scan"))  # [0]: the warm-up
        print(f"{args.model} ({mode}): {args.prompts} prompts, {n_tokens} tokens, torch threads "
              f"{torch.get_num_threads()}")
        print(f"  plain forward  {tp:6.2f} s  ({n_tokens / tp:6.0f} tokens/s)")
        print(f"  scan           {ts:6.2f} s  ({n_tokens / ts:6.0f} tokens/s)")
        print(f"  ratio scan / plain = {ts / tp:.3f}  (goal <= 1.15; CPU time {cs / cp:.3f}); load average "
              + "/".join(f"{x:.1f}" for x in os.getloadavg()), flush=True)

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
