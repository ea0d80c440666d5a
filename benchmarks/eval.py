"""Evaluation speed, measured side by side in one run.

1. Perplexity throughput: cardhouse's ``perplexity()`` versus lm-eval's rolling loglikelihood.
2. A k-sweep (one loaded model, one massive-weight search, the corpus tokenized once, and the
   layers before the attacked one run once per window: ``capture.reuse``) versus running
   each of its variants from scratch (load, search, tokenize, score the full model).

For 1, both score the same Wikipedia tokens with the same model (SmolLM2-135M, float32, CPU), in
forward passes of ``--context`` tokens, ``--batch-size`` windows at a time, BOS first.
Throughput is predicted tokens per second. The two runs alternate ``--repeats`` times and
the best time of each counts, so that a noisy shared CPU penalises neither side.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/eval.py
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch


def cardhouse_scorer(model, token_ids: torch.Tensor, *, context: int, bos_id: int,
                     batch_size: int) -> Callable[[], tuple[int, float]]:
    from cardhouse.evaluation import perplexity

    def score() -> tuple[int, float]:
        result = perplexity(model, token_ids, context=context, bos_id=bos_id, batch_size=batch_size,
                            progress=False)
        return result.n_predicted_tokens, result.ppl

    return score


def lm_eval_scorer(model, tokenizer, token_ids: torch.Tensor, *, context: int,
                   batch_size: int) -> Callable[[], tuple[int, float]]:
    """``HFLM.loglikelihood_rolling`` on the decoded text: windows of ``context`` tokens, BOS as prefix."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=context, device="cpu")
    text = tokenizer.decode(token_ids.tolist())
    retokenized = lm.tok_encode(text)
    if retokenized != token_ids.tolist():
        print(f"note: lm-eval re-tokenizes the text into {len(retokenized)} tokens (ours: {len(token_ids)})")
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)

    def score() -> tuple[int, float]:
        (loglikelihood,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
        return len(retokenized), math.exp(-loglikelihood / len(retokenized))

    return score


def timed(score: Callable[[], tuple[int, float]]) -> dict:
    start = time.perf_counter()
    n_tokens, ppl = score()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": n_tokens, "ppl": ppl, "tokens_per_s": n_tokens / seconds}


def sweep_versus_scratch(args) -> None:
    from cardhouse.analysis import find_massive_weights
    from cardhouse.evaluation.measure import Budget, measurer
    from cardhouse.interventions import attack, original, run_variants
    from cardhouse.models import load_model

    budget = Budget(max_tokens=args.tokens, context=args.context, batch_size=args.batch_size)
    ks, kinds = (1, 2, 3), ("topk-zero", "random-zero", "topk-retain", "random-retain")

    def variants(lm, mw):
        return [original()] + [attack(lm, mw, kind, k=k) for k in ks for kind in kinds]

    start = time.perf_counter()
    lm = load_model("smollm2-135m")
    mw = find_massive_weights(lm, k=max(ks))
    swept = run_variants(lm, variants(lm, mw), measurer(lm, budget, progress=False))
    sweep_seconds = time.perf_counter() - start

    start = time.perf_counter()
    scratch = []
    for i in range(len(swept)):
        lm = load_model("smollm2-135m")
        mw = find_massive_weights(lm, k=max(ks))
        scratch += run_variants(lm, [variants(lm, mw)[i]], measurer(lm, budget, progress=False), reuse=False)
    scratch_seconds = time.perf_counter() - start

    same = all(a["ppl_wikipedia"] == b["ppl_wikipedia"] for a, b in zip(swept, scratch))
    print(f"k-sweep of {len(swept)} variants (k in {ks}, {kinds}), {args.tokens} Wikipedia tokens each")
    print(f"  sweep:        {sweep_seconds:7.1f} s")
    print(f"  from scratch: {scratch_seconds:7.1f} s   (identical perplexities: {same})")
    print(f"ratio (from scratch / sweep time): {scratch_seconds / sweep_seconds:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="Wikipedia tokens to score")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=["perplexity", "sweep", "all"], default="all")
    args = parser.parse_args()
    if args.part in ("perplexity", "all"):
        perplexity_versus_lm_eval(args)
    if args.part in ("sweep", "all"):
        sweep_versus_scratch(args)


def perplexity_versus_lm_eval(args) -> None:
    from cardhouse.data.token_cache import tokenize_corpus
    from cardhouse.models import load_model

    lm = load_model("smollm2-135m")
    model, tokenizer = lm.model.eval(), lm.tokenizer
    token_ids = tokenize_corpus(tokenizer, "wikipedia", max_tokens=args.tokens)
    print(f"model smollm2-135m, {len(token_ids)} Wikipedia tokens, context {args.context}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, best of {args.repeats}")

    scorers = {
        "cardhouse perplexity()": cardhouse_scorer(model, token_ids, context=args.context,
                                                   bos_id=tokenizer.bos_token_id, batch_size=args.batch_size),
        "lm-eval loglikelihood_rolling": lm_eval_scorer(model, tokenizer, token_ids, context=args.context,
                                                        batch_size=args.batch_size),
    }
    with torch.inference_mode():  # warm-up: first-call allocations are nobody's throughput
        model(input_ids=token_ids[None, : args.context], use_cache=False)
    runs: dict[str, list[dict]] = {name: [] for name in scorers}
    for _ in range(args.repeats):
        for name, score in scorers.items():
            runs[name].append(timed(score))

    best = {name: max(name_runs, key=lambda run: run["tokens_per_s"]) for name, name_runs in runs.items()}
    for name, run in best.items():
        all_rates = ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs[name])
        print(f"{name:30s} {run['tokens']:6d} tokens in {run['seconds']:6.1f} s = {run['tokens_per_s']:7.1f} "
              f"tokens/s (runs: {all_rates}; ppl {run['ppl']:.2f})")
    ours, theirs = best.values()
    print(f"ratio (cardhouse / lm-eval tokens/s): {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
