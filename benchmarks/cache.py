"""The cost of checking the dequantized-model cache on load: a verified load (the sha256 of every cached file,
then the load) against an unverified one (the load alone), side by side on the same cache folder.

    python benchmarks/cache.py [--model smollm2-135m] [--repeats 5]

Prints the median seconds of each and their ratio (goal: a small fraction of a load; measured on a shared
2-core machine, so both sides see the same contention), and what the first load, dequantizing the GGUF
without the cache, takes beside them.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    import torch

    from cardhouse.models.integrity import broken
    from cardhouse.models.loading import BUNDLED, _load_auto, gguf_cache_folder, load_gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=list(BUNDLED))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gguf = BUNDLED[args.model].locate_gguf()
    load_gguf(gguf)  # builds and seals the cache if needed
    folder = gguf_cache_folder(gguf)
    size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20

    def unverified() -> None:
        _load_auto(folder, torch.float32)

    def verified() -> None:
        assert broken(folder) is None
        _load_auto(folder, torch.float32)

    times = {"verified": [], "unverified": []}
    unverified()  # warm the page cache: both sides then read from memory
    for _ in range(args.repeats):  # interleaved, so drifting load on the machine hits both alike
        for name, fn in (("unverified", unverified), ("verified", verified)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    start = time.perf_counter()
    broken(folder)
    check = time.perf_counter() - start
    start = time.perf_counter()
    load_gguf(gguf, use_cache=False)  # what the first load costs: the GGUF dequantized, no cache
    first = time.perf_counter() - start
    v, u = statistics.median(times["verified"]), statistics.median(times["unverified"])
    print(f"{args.model}: cache {size:,.0f} MiB; checksum check alone {check:.2f} s")
    print(f"load with the check {v:.2f} s, without {u:.2f} s (medians of {args.repeats}): ratio {v / u:.2f}")
    print(f"first load (dequantizing the GGUF) {first:.1f} s: {first / v:.0f}x a cached, checked load")


if __name__ == "__main__":
    main()
