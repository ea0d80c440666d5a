"""Cost of MacDrop per training step: steps with MacDrop divided by steps without, in the same run.

    python benchmarks/macdrop.py [--model smollm2-135m] [--steps 24] [--length 64] [--scope massive]

One LoRA fine-tuning run with transformers.Trainer on Alpaca examples that all have exactly
``--length`` tokens; MacDrop masks the rows on even steps only, so steps with and without it
alternate under the same load on a shared CPU. Each step is timed from before MacDrop's mask to
after its restore. Prints the median step time of each kind; the median, over the steps with
MacDrop, of their time divided by the mean of their two neighbours without it (goal <= 1.02);
and, as a check that does not depend on how busy the CPU is, the time spent inside MacDrop
itself (masking and restoring) per step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import Trainer, TrainerCallback

from cardhouse import load_model
from cardhouse.finetuning import FinetuneConfig, MacDrop, MacDropConfig, load_records, tokenize_records
from cardhouse.finetuning.data import collator
from cardhouse.finetuning.train import lora_config, training_arguments


class EvenSteps(MacDrop):
    """MacDrop on even steps only (the odd steps are the baseline of the same run), timing its own work."""

    own_seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % 2 == 0:
            start = time.perf_counter()
            super().on_step_begin(args, state, control, **kwargs)
            self.own_seconds.append(time.perf_counter() - start)

    def on_step_end(self, args, state, control, **kwargs):
        if self.masked:
            start = time.perf_counter()
            super().on_step_end(args, state, control, **kwargs)
            self.own_seconds[-1] += time.perf_counter() - start


class Clock(TrainerCallback):
    def __init__(self, start: bool, times: dict):
        self.start, self.times = start, times

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start:
            self.times[state.global_step] = -time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # global_step has moved on by one
        if not self.start:
            self.times[state.global_step - 1] += time.perf_counter()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--length", type=int, default=64, help="tokens per example")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--scope", default="massive", help="massive, non-massive or all")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    config = FinetuneConfig(batch_size=args.batch_size, grad_accum=1, max_steps=args.steps, lr=1e-4,
                            max_length=args.length, save_steps=10**6, logging_steps=10**6)
    examples = [e for e in tokenize_records(lm, load_records(), max_length=args.length)
                if len(e["input_ids"]) == args.length]
    macdrop = EvenSteps.for_model(lm, MacDropConfig(p0=0.8, schedule="constant", scope=args.scope))

    from peft import get_peft_model

    model = get_peft_model(lm.model, lora_config(config))
    times: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(model=model, args=training_arguments(config, folder, progress=False),
                          train_dataset=examples, data_collator=collator(lm.tokenizer),
                          callbacks=[Clock(True, times), macdrop, Clock(False, times)])
        with macdrop:
            trainer.train()
    steps = sorted(times)[2:]  # the first steps warm up
    with_md = statistics.median(times[s] for s in steps if s % 2 == 0)
    without = statistics.median(times[s] for s in steps if s % 2 == 1)
    print(f"{lm.name}: LoRA, batch {args.batch_size} x {args.length} tokens, {args.threads} thread(s), "
          f"MacDrop on {len(macdrop.rows)} rows of W_up and W_gate in layer {macdrop.layer} (scope {args.scope})")
    print(f"median step time with MacDrop:    {with_md * 1000:8.1f} ms ({len(steps[::2])} steps)")
    print(f"median step time without MacDrop: {without * 1000:8.1f} ms ({len(steps[1::2])} steps)")
    # each step with MacDrop against the mean of its two neighbours without: a drifting load cancels out
    ratios = [2 * times[s] / (times[s - 1] + times[s + 1]) for s in steps if s % 2 == 0 and s + 1 in times]
    own = statistics.median(macdrop.own_seconds)
    print(f"ratio with / without (median of {len(ratios)} steps over their neighbours): "
          f"{statistics.median(ratios):.3f}  (goal <= 1.02)")
    print(f"time inside MacDrop (mask + restore): {own * 1000:.3f} ms per step = {own / without:.5f} of a step")


if __name__ == "__main__":
    main()
