"""Generation quality without a judge model (a stand-in for House of Cards Appendix G).

Greedy answers to held-out Alpaca instructions (the validation split ``cardhouse finetune``
keeps out of training: ``finetuning.data.split_records`` with its defaults) are scored against
the records' reference answers with reference-based metrics from well-kept packages: ROUGE-L F1
(``rouge-score``, Porter stemming) and chrF (``sacrebleu``), plus the reference answer's mean
log-likelihood per token under the model. No model judges the answers.
"""

from __future__ import annotations

import math

import torch

from ..models.loading import LoadedModel

NO_JUDGE = "reference-based metrics only (ROUGE-L, chrF, reference log-likelihood); no model judge is used"


def held_out_records(n: int, *, seed: int = 0, val_fraction: float = 0.05) -> list[dict]:
    """The first ``n`` records of fine-tuning's validation split (never trained on with the same seed)."""
    from .data import load_records, split_records

    if n < 1:
        raise ValueError(f"the number of records must be at least 1, got {n}")
    _, held_out = split_records(load_records(), val_fraction, seed=seed)
    if n > len(held_out):
        raise ValueError(f"only {len(held_out)} held-out records (validation fraction {val_fraction}); asked for {n}")
    return held_out[:n]


def rouge_l(prediction: str, reference: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure


def chrf(prediction: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_chrf(prediction, [reference]).score


def greedy_answer(lm: LoadedModel, record: dict, max_new_tokens: int = 64) -> str:
    from .data import prompt_ids

    ids = torch.tensor([prompt_ids(lm, record, "alpaca")], device=lm.model.device)
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=lm.tokenizer.eos_token_id)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def reference_loglikelihood(lm: LoadedModel, record: dict) -> tuple[float, int]:
    """(sum of log p(reference token | prompt, earlier reference tokens), number of reference tokens)."""
    from .data import prompt_ids

    prompt = prompt_ids(lm, record, "alpaca")
    reference = lm.tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + reference], device=lm.model.device)
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1].float()
    log_probs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(reference, device=ids.device)[:, None])
    return float(log_probs.sum()), len(reference)


def measurer(records: list[dict], max_new_tokens: int = 64, progress: bool = False):
    """``lm -> row`` for ``run_variants``: mean ROUGE-L, chrF and reference log-likelihood, and every answer."""
    from tqdm.auto import tqdm

    def measure(lm: LoadedModel) -> dict:
        answers, total, tokens = [], 0.0, 0
        for record in tqdm(records, disable=not progress, desc="generation"):
            answer = greedy_answer(lm, record, max_new_tokens)
            loglikelihood, n = reference_loglikelihood(lm, record)
            total, tokens = total + loglikelihood, tokens + n
            answers.append({"instruction": record["instruction"], "reference": record["output"], "answer": answer,
                            "rouge_l": rouge_l(answer, record["output"]), "chrf": chrf(answer, record["output"])})
        return {"rouge_l": math.fsum(a["rouge_l"] for a in answers) / len(answers),
                "chrf": math.fsum(a["chrf"] for a in answers) / len(answers),
                "ref_loglik_per_token": total / tokens, "answers": answers}

    return measure
