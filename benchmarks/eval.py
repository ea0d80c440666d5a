"""Perplexity throughput: cardhouse's ``perplexity()`` versus lm-eval's rolling loglikelihood.

Both score the same Wikipedia tokens with the same model (SmolLM2-135M, float32, CPU) and
the same 512-token forward passes with BOS first; throughput is predicted tokens per second.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/eval.py
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def cardhouse_run(model, token_ids: torch.Tensor, *, context: int, bos_id: int, batch_size: int) -> dict:
    from cardhouse.evaluation import perplexity

    start = time.perf_counter()
    result = perplexity(model, token_ids, context=context, bos_id=bos_id, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": result.n_predicted_tokens, "ppl": result.ppl,
            "tokens_per_s": result.n_predicted_tokens / seconds}


def lm_eval_run(model, tokenizer, token_ids: torch.Tensor, *, context: int, batch_size: int) -> dict:
    """``HFLM.loglikelihood_rolling`` on the decoded text: windows of ``context`` tokens, BOS as prefix."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=context, device="cpu")
    text = tokenizer.decode(token_ids.tolist())
    n_tokens = len(lm.tok_encode(text))  # what lm-eval predicts after re-tokenizing the text
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    start = time.perf_counter()
    (loglikelihood,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": n_tokens, "ppl": math.exp(-loglikelihood / n_tokens),
            "tokens_per_s": n_tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="Wikipedia tokens to score")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    from cardhouse.evaluation import tokenize_corpus
    from cardhouse.models import load_model

    lm = load_model("smollm2-135m")
    model, tokenizer = lm.model.eval(), lm.tokenizer
    token_ids = tokenize_corpus(tokenizer, "wikipedia", max_tokens=args.tokens)
    print(f"model smollm2-135m, {args.tokens} Wikipedia tokens, context {args.context}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")

    ours = cardhouse_run(model, token_ids, context=args.context, bos_id=tokenizer.bos_token_id,
                         batch_size=args.batch_size)
    theirs = lm_eval_run(model, tokenizer, token_ids, context=args.context, batch_size=args.batch_size)
    for name, run in (("cardhouse perplexity()", ours), ("lm-eval loglikelihood_rolling", theirs)):
        print(f"{name:30s} {run['tokens']:6d} tokens in {run['seconds']:6.1f} s = {run['tokens_per_s']:7.1f} tokens/s"
              f"  (ppl {run['ppl']:.2f})")
    print(f"ratio (cardhouse / lm-eval tokens/s): {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
