"""Peak memory of the attention analysis on a 2,048-token prompt: maps reduced on the fly vs stored.

    python benchmarks/attention.py [--model smollm2-135m] [--tokens 2048]

Each variant runs in its own process (so that one's peak cannot hide another's), on the same
prompt, and reports the peak resident memory above what the loaded model already holds
(sampled every 2 ms from /proc/self/statm):

- ``eager forward``: a plain forward pass under eager attention (each layer makes its
  [head, query, key] map and drops it): the floor;
- ``analyze_attention``: concentration, sinks and the value-update decomposition, every map
  reduced inside its layer's hook (two passes: set C, then attention);
- ``stored maps``: the same forward keeping every layer's probabilities
  (``output_attentions=True``), what a store-then-analyze approach needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Peak:
    """Samples the resident set size in a thread while the block runs."""

    def __enter__(self):
        self.start, self.peak, self.running = rss(), rss(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def long_prompt(lm, n_tokens: int) -> str:
    from cardhouse.analysis import load_prompts

    sentences, words = load_prompts(), []
    i = 0
    while len(lm.encode(" ".join(words))) < n_tokens:
        words += sentences[i % len(sentences)].split()
        i += 1
    while len(lm.encode(" ".join(words))) > n_tokens:
        words.pop()
    return " ".join(words)


def run_variant(model: str, variant: str, n_tokens: int) -> dict:
    from cardhouse import load_model
    from cardhouse.analysis.attention import analyze_attention

    torch.set_num_threads(1)
    lm = load_model(model)
    prompt = long_prompt(lm, n_tokens)
    ids = torch.tensor([lm.encode(prompt)])
    start = time.perf_counter()
    with Peak() as peak:
        if variant == "analyze_attention":
            result = analyze_attention(lm, [prompt], progress=False)
            kept = 0
        else:
            lm.model.set_attn_implementation("eager")  # this process runs only this variant: nothing to restore
            with torch.inference_mode():
                out = lm.model.base_model(input_ids=ids, use_cache=False,
                                          output_attentions=variant == "stored maps")
            maps = out.attentions or ()
            kept = sum(m.numel() * m.element_size() for m in maps)
            result = None
    seconds = time.perf_counter() - start
    return {"variant": variant, "tokens": ids.shape[1], "peak_extra_bytes": peak.extra, "kept_bytes": kept,
            "seconds": seconds, "after_layer_11_share_on_bos": None if result is None
            else result.summary["after"]["concentration"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.model, args.variant, args.tokens)))
        return
    rows = []
    for variant in ("eager forward", "analyze_attention", "stored maps"):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens),
                              "--variant", variant], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mib = 2 ** 20
    print(f"{args.model}: one prompt of {rows[0]['tokens']} tokens, torch threads 1")
    print(f"{'variant':20s} {'peak RSS above model':>22s} {'maps kept':>12s} {'time':>8s}")
    for r in rows:
        print(f"{r['variant']:20s} {r['peak_extra_bytes'] / mib:18.0f} MiB {r['kept_bytes'] / mib:8.0f} MiB "
              f"{r['seconds']:7.1f} s")
    streamed, stored = rows[1]["peak_extra_bytes"], rows[2]["peak_extra_bytes"]
    print(f"stored / on-the-fly peak = {stored / streamed:.1f}x "
          f"(on the fly: {streamed / rows[0]['peak_extra_bytes']:.2f}x a plain eager forward)")


if __name__ == "__main__":
    main()
