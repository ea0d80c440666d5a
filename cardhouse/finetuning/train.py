"""LoRA / DoRA fine-tuning with transformers.Trainer and PEFT, with or without MacDrop, and its evaluation.

Defaults mirror House of Cards Table 6 (batch 8, gradient accumulation 4, lr 1e-4, 3 epochs,
warmup 5%, LoRA r=16, alpha=16 on every linear layer but the embeddings and lm_head). On a
laptop CPU use the overrides: ``max_length``, ``limit`` (records), ``max_steps``.

Outputs in ``out``: ``adapter/`` (PEFT format: adapter_config.json, adapter_model.safetensors),
``finetune.json`` (configs, massive rows, losses, log history) and ``checkpoints/`` (Trainer
checkpoints, for ``resume=True``). The base weights are never changed: PEFT freezes them and
MacDrop writes the original rows back after every step.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..results import read_result, write_result
from ..analysis.criterion import Criterion
from ..evaluation.measure import Budget, measurer
from ..evaluation.metrics import VAL_LOSS, metric_keys
from ..interventions import Target, Variant, get_attack, original, run_variants
from ..models.loading import LoadedModel, from_pretrained_objects
from .data import DEFAULT_DATA, collator, load_records, split_records, tokenize_records
from .macdrop import MacDrop, MacDropConfig, detect_massive_rows
from .report import suffix_of

METHODS = ("lora", "dora")
ATTACK_K, ATTACK = 3, "topk-zero"  # House of Cards Table 4: top-3 zeroing


@dataclass
class FinetuneConfig:
    method: str = "lora"  # lora or dora
    rank: int = 16
    lora_alpha: int = 16
    batch_size: int = 8
    grad_accum: int = 4
    lr: float = 1e-4
    epochs: float = 3
    warmup: float = 0.05  # fraction of the steps
    max_length: int = 512  # tokens per example (prompt + response)
    max_steps: int = -1  # > 0 overrides epochs
    limit: int | None = None  # use this many records (before the split)
    val_fraction: float = 0.05
    template: str = "alpaca"
    data: str = DEFAULT_DATA  # "alpaca" or a .json / .jsonl file
    eval_steps: int | None = None  # validation loss every n steps (None: before and after training only)
    save_steps: int = 50  # checkpoint every n steps
    logging_steps: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        for name in ("rank", "batch_size", "grad_accum", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.epochs <= 0:
            raise ValueError(f"lr and epochs must be positive, got {self.lr} and {self.epochs}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneResult:
    out: Path
    config: FinetuneConfig
    macdrop: dict | None  # MacDrop.describe()
    val_loss_before: float | None
    val_loss: float
    steps: int
    seconds: float
    n_train: int
    n_val: int
    log_history: list[dict] = field(default_factory=list)
    trainer: object = None  # the transformers.Trainer (its model carries the adapter)

    def to_dict(self) -> dict:
        return {"out": str(self.out), "config": self.config.to_dict(), "macdrop": self.macdrop,
                "val_loss_before": self.val_loss_before, "val_loss": self.val_loss, "steps": self.steps,
                "seconds": self.seconds, "n_train": self.n_train, "n_val": self.n_val,
                "log_history": self.log_history}


def lora_config(config: FinetuneConfig):
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, target_modules="all-linear",
                      use_dora=config.method == "dora", task_type="CAUSAL_LM")


def training_arguments(config: FinetuneConfig, folder: Path, progress: bool = True):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(folder), per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr, num_train_epochs=config.epochs, max_steps=config.max_steps,
        warmup_steps=config.warmup, logging_steps=config.logging_steps,
        eval_strategy="steps" if config.eval_steps else "no", eval_steps=config.eval_steps,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=2,
        seed=config.seed, report_to="none", disable_tqdm=not progress, use_cpu=not torch.cuda.is_available())


def finetune(lm: LoadedModel, config: FinetuneConfig | None = None, macdrop: MacDropConfig | None = None, *,
             out: str | Path = "cardhouse-out/finetune", resume: bool = False, progress: bool = True,
             evaluate_before: bool = True, callbacks: list | None = None) -> FinetuneResult:
    """Fine-tune ``lm`` with a LoRA or DoRA adapter (in place: ``lm.model`` then carries it), MacDrop if given.

    ``resume`` continues from the last checkpoint in ``out/checkpoints`` (the same MacDrop masks
    are drawn as in an uninterrupted run). An error or Ctrl-C during training leaves the base
    weights restored and the checkpoints usable. ``callbacks``: more TrainerCallbacks (after MacDrop's).
    """
    from peft import get_peft_model
    from transformers import Trainer

    config = config or FinetuneConfig()
    out = Path(out)
    records = load_records(config.data)
    train_records, val_records = split_records(records, config.val_fraction, seed=config.seed, limit=config.limit)
    train = tokenize_records(lm, train_records, template=config.template, max_length=config.max_length)
    val = tokenize_records(lm, val_records, template=config.template, max_length=config.max_length)
    checkpoints = out / "checkpoints"
    last = last_complete_checkpoint(checkpoints)
    if resume and last is None:
        raise FileNotFoundError(f"nothing to resume: no complete checkpoint in {checkpoints}")
    dropper = MacDrop.for_model(lm, macdrop) if macdrop is not None else None  # before PEFT wraps the layers

    model = get_peft_model(lm.model, lora_config(config))
    trainer = Trainer(model=model, args=training_arguments(config, checkpoints, progress), train_dataset=train,
                      eval_dataset=val, data_collator=collator(lm.tokenizer),
                      callbacks=([dropper] if dropper is not None else []) + list(callbacks or []))
    before = trainer.evaluate()["eval_loss"] if evaluate_before and not resume else None
    start = time.perf_counter()
    with dropper if dropper is not None else nullcontext():  # rows restored on error and Ctrl-C too
        trainer.train(resume_from_checkpoint=str(last) if resume else None)
    seconds = time.perf_counter() - start
    after = trainer.evaluate()["eval_loss"]
    lm.model.eval()

    trainer.save_model(str(out / "adapter"))  # PEFT format: the adapter only
    result = FinetuneResult(out=out, config=config, macdrop=dropper.describe() if dropper else None,
                            val_loss_before=before, val_loss=after, steps=trainer.state.global_step,
                            seconds=seconds, n_train=len(train), n_val=len(val),
                            log_history=trainer.state.log_history, trainer=trainer)
    saved = result.to_dict()
    write_result(out / "finetune.json", saved, model=lm.describe(),
                 settings={"config": saved.pop("config"), "macdrop": macdrop.to_dict() if macdrop else None,
                           "resume": resume})
    return result


def robustness(lm: LoadedModel, trainer, layer: int, massive: list[int], *, expert: int | None = None,
               budget: Budget | None = None, k: int = ATTACK_K, progress: bool = False) -> list[dict]:
    """House of Cards Table 4: validation loss and perplexity of the fine-tuned model, original vs top-k zeroed.

    Two attacks on the top-``k`` massive rows of W_up and W_gate in ``layer``:

    - ``topk-zero``: the base model's rows (what MacDrop drops during training), adapter on;
    - ``topk-zero merged``: the rows of a merged copy of the fine-tuned model (W + BA, and DoRA's
      magnitude folded in), i.e. the fine-tuned model's own weights. DoRA rescales every row of
      W + BA to its learned magnitude, so zeroing only the base rows leaves a DoRA row
      restored along the adapter's direction: the two attacks differ for DoRA.
    """
    from transformers import Trainer

    rows = list(massive[:k])
    ppl = measurer(lm, budget, progress=progress) if budget is not None else (lambda lm: {})

    def measure_with(evaluator):
        return lambda lm: {VAL_LOSS.key(): evaluator.evaluate()["eval_loss"], **ppl(lm)}

    def zeroed(target: LoadedModel, on: str | None = None) -> Variant:  # the registered attack on these rows
        edit = get_attack(ATTACK).edit(Target(target, layer, expert, len(rows), rows, random=[]))
        return Variant(ATTACK, edit.description, edit.apply, layer, k=len(rows), expert=expert,
                       indices=tuple(edit.indices), on=on)

    table = run_variants(lm, [original(), zeroed(lm)], measure_with(trainer))
    if not hasattr(trainer.model, "merge_and_unload"):  # no adapter: the rows zeroed were the model's own
        return table
    merged = copy.deepcopy(trainer.model).merge_and_unload()  # the adapter's copy; lm keeps its own
    merged_lm = from_pretrained_objects(merged, lm.tokenizer, name=f"{lm.name} merged", bos=lm.bos)
    evaluator = Trainer(model=merged, args=trainer.args, eval_dataset=trainer.eval_dataset,
                        data_collator=trainer.data_collator)
    table += run_variants(merged_lm, [zeroed(merged_lm, "merged")], measure_with(evaluator))
    return table


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint the Trainer finished writing. ``trainer_state.json`` is the last file it writes;
    a checkpoint cut by a crash while saving lacks it, and resuming from it would start without the optimizer
    state or from step 0 without a word (transformers' ``get_last_checkpoint`` takes the newest folder)."""
    done = [p for p in Path(folder).glob("checkpoint-*") if (p / "trainer_state.json").is_file()
            and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def run_name(method: str, schedule: str | None) -> str:
    return method if schedule is None else f"{method}+macdrop-{schedule}"


def compare(load: Callable[[], LoadedModel], config: FinetuneConfig, macdrop: MacDropConfig | None = None, *,
            methods: tuple[str, ...] = METHODS, schedules: tuple[str, ...] = ("step",), out: str | Path,
            budget: Budget | None = None, progress: bool = True, criterion: Criterion = Criterion()) -> list[dict]:
    """Each method with and without MacDrop (one run per schedule), each evaluated original vs top-3 zeroed.

    ``load`` gives a fresh base model for every run (PEFT wraps it in place). A run whose
    ``result.json`` exists is read back and an unfinished one resumes from its last checkpoint,
    so an interrupted comparison goes on where it stopped.
    """
    out = Path(out)
    macdrop = macdrop or MacDropConfig()
    first = load()
    if macdrop.rows is None:  # find the massive rows once, on the untouched base model
        layer, rows, expert = detect_massive_rows(first, macdrop.k, macdrop.layer, criterion)
        macdrop = replace(macdrop, layer=layer, rows=rows, expert=expert)
    else:
        layer, rows, expert = macdrop.layer, list(macdrop.rows), macdrop.expert
    results = []
    plan = [(m, s) for m in methods for s in (None, *schedules)]
    for method, schedule in plan:
        name = run_name(method, schedule)
        folder = out / name
        done = folder / "result.json"
        if done.exists():
            results.append(read_result(done)["results"])
            continue
        lm = first if first is not None else load()
        first = None
        run_config = replace(macdrop, schedule=schedule) if schedule else None
        resume = last_complete_checkpoint(folder / "checkpoints") is not None  # an interrupted run goes on
        result = finetune(lm, replace(config, method=method), run_config, out=folder, progress=progress,
                          resume=resume)
        table = robustness(lm, result.trainer, layer, rows, expert=expert, budget=budget)
        row = {"run": name, "method": method, "macdrop": schedule is not None, "schedule": schedule,
               "steps": result.steps, "train_seconds": round(result.seconds, 1),
               "val_loss_before": result.val_loss_before}
        for variant in table:
            row.update({f"{key}{suffix_of(variant)}": variant[key] for key in metric_keys(variant)})
        row["attacked_rows"] = rows[:ATTACK_K]
        write_result(done, row, model=lm.describe(), settings={"config": replace(config, method=method).to_dict(),
                                                               "macdrop": run_config.to_dict() if run_config else None,
                                                               "budget": budget.to_dict() if budget else None})
        results.append(row)
    return results
