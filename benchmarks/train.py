"""Training speed of the two emergence variants, side by side: what the explicit attention bias costs.

    python benchmarks/train.py [--config cpu] [--steps 30] [--threads 1] [--device cuda]

Both variants (standard attention, and k', v' per head) are built from the same config and
seed and train in one process, step by step in turn: every step both train on the same
batch of the real training text with ``cardhouse.emergence.train.train_step`` (forward,
backward, clipping, AdamW: what ``cardhouse emergence`` runs), standard first on even
steps and bias first on odd ones, so that neither always meets a warmer cache or a busier
machine. One untimed step per variant warms up first.

On the CPU a step is timed in CPU seconds of this process (``time.process_time``): on a
machine shared with other jobs, wall time mostly measures the neighbours. On CUDA it is
wall time after a synchronize. Printed: each variant's tokens per second (from its median
step time and its total), and the ratio bias / standard; the issue's goal is a cost below
5% (ratio > 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cardhouse.emergence.config import config_with
from cardhouse.emergence.tokens import check_data, get_batch, load_data, smollm2_tokenizer
from cardhouse.emergence.train import build, make_optimizer, resolve_device, train_step

VARIANTS = ("standard", "bias")  # the pair whose cost the issue asks for


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu", help="cpu or gpu (the emergence configs)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the config's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = config_with(args.config, device=args.device)
    device, note = resolve_device(config.device)
    tokenizer = smollm2_tokenizer()
    data = load_data(tokenizer, config)
    check_data(data, config)
    models = {v: build(config, len(tokenizer), v).to(device) for v in VARIANTS}
    optimizers = {v: make_optimizer(models[v], config) for v in VARIANTS}
    tokens_per_step = config.batch_size * config.block_size

    def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sampler = torch.Generator().manual_seed(seed)
        return [tuple(t.to(device) for t in get_batch(data.train, config.batch_size, config.block_size, sampler))
                for _ in range(args.steps)]

    def timed(variant: str, x: torch.Tensor, y: torch.Tensor) -> float:
        """Seconds of one training step."""
        if device.type == "cuda":
            torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(models[variant], optimizers[variant], x, y, config.grad_clip)  # syncs: it reads the loss
            return time.perf_counter() - start
        start = time.process_time()
        train_step(models[variant], optimizers[variant], x, y, config.grad_clip)
        return time.process_time() - start

    for v in VARIANTS:  # warm-up: first-call allocations and kernel choices
        timed(v, *batches(-1)[0])
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}  # per step
    for step, (x, y) in enumerate(batches(0)):
        for v in VARIANTS if step % 2 == 0 else VARIANTS[::-1]:
            seconds[v].append(timed(v, x, y))

    clock = "wall seconds (CUDA)" if device.type == "cuda" else "CPU seconds of this process"
    print(f"config {args.config}: {config.n_layer} layers x {config.n_embd} wide, {config.n_head} heads, context "
          f"{config.block_size}, batch {config.batch_size} ({tokens_per_step} tokens/step), vocabulary "
          f"{len(tokenizer):,}; {device}{f' ({note})' if note else ''}, torch threads {torch.get_num_threads()}")
    print(f"{args.steps} steps per variant, in turn on the same batches, timed in {clock}")
    print(f"{'variant':10s} {'parameters':>12s} {'tokens/s (median step)':>23s} {'tokens/s (total)':>17s}")
    rate = {v: tokens_per_step / statistics.median(seconds[v]) for v in VARIANTS}
    total = {v: tokens_per_step * len(seconds[v]) / sum(seconds[v]) for v in VARIANTS}
    for v in VARIANTS:
        print(f"{v:10s} {models[v].num_parameters():12,d} {rate[v]:23,.0f} {total[v]:17,.0f}")
    ratio = rate["bias"] / rate["standard"]
    paired = statistics.median(s / b for s, b in zip(seconds["standard"], seconds["bias"]))
    print(f"bias / standard tokens/s: {ratio:.3f} (median steps), {total['bias'] / total['standard']:.3f} (totals), "
          f"{paired:.3f} (median of the step pairs)")
    print(f"the explicit attention bias costs {100 * (1 - ratio):.1f}% of the training speed "
          f"(goal: < 5%): {'met' if ratio > 0.95 else 'NOT met'}")


if __name__ == "__main__":
    main()
