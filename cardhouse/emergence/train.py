"""Training the small decoder from scratch on real text, watching massive activations emerge.

Every ``every`` steps the run records the validation loss, the massive-activation scan's
statistics (``cardhouse.analysis.scan``, the very code that scans pretrained LLMs, through
the ``nanogpt`` adapter) and the attention share on the first token and on k', then
writes a checkpoint: an interrupted run resumes from the last one and continues exactly
as if it had not stopped (the batch sampler's state is in the checkpoint too).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._files import write_atomically
from ..analysis.massive_activations import ScanResult
from ..reports.plots import plot_top_magnitudes
from ..results import write_result
from .config import DEFAULT_VARIANTS, TrainConfig, config_dict
from .measure import measure, ngram_baselines, scan_model, validation_loss
from .model import GPT, GPTConfig
from .report import plot_curves, side_by_side
from .tokens import TokenData, check_data, get_batch, load_data, scan_prompts, smollm2_tokenizer, val_windows

CHECKPOINT = "checkpoint.pt"


# ---- training --------------------------------------------------------------------------------------


def resolve_device(requested: str) -> tuple[torch.device, str | None]:
    """The device to train on, and a note when CUDA was asked for but is not there."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        note = f"{requested} was requested but CUDA is not available: training on the CPU"
        warnings.warn(note)
        return torch.device("cpu"), note
    return torch.device(requested), None


def lr_factor(config: TrainConfig, step: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr (as a factor of lr)."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build(config: TrainConfig, vocab_size: int, variant: str) -> GPT:
    """The seeded model: all variants get the same weights except k' and v' (drawn last, v' is zero)."""
    torch.manual_seed(config.seed)
    return GPT(config.model_config(vocab_size, variant))


def make_optimizer(model: GPT, config: TrainConfig) -> torch.optim.AdamW:
    # weight decay on matrices only; k' and v' are biases of the attention, like the Linear biases
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.endswith(("k_bias", "v_bias")) else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))


def train_step(model: GPT, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               grad_clip: float) -> float:
    """One AdamW step on the batch ``x [B, T]`` -> ``y [B, T]``; returns the training loss.

    (Also what ``benchmarks/train.py`` times.)
    """
    _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())  # waits for the GPU: the timing is honest


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "device"}  # the same run may resume elsewhere


def _save(path: Path, state: dict) -> None:
    write_atomically(path, lambda tmp: torch.save(state, tmp))  # never a half-written checkpoint


def train_variant(config: TrainConfig, variant: str, data: TokenData, tokenizer, folder: Path, *,
                  resume: bool = True, stop_at: int | None = None, progress: bool = True) -> dict:
    """Train (or resume) one variant in ``folder``; returns its record (config, history, final scan).

    ``stop_at``: stop after that step (a later call resumes), e.g. to split a run.
    """
    check_data(data, config)
    device, note = resolve_device(config.device)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT
    vocab_size = len(tokenizer)
    if int(data.train.max()) >= vocab_size or int(data.val.max()) >= vocab_size:
        raise ValueError(f"the token ids go beyond the tokenizer's {vocab_size} tokens: another tokenizer made them")
    model = build(config, vocab_size, variant).to(device)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s))
    sampler = torch.Generator().manual_seed(config.seed)
    step, history, train_seconds = 0, [], 0.0
    losses: list[float] = []  # training losses since the last measurement
    if resume and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)  # the sampler state lives on the CPU
        if _comparable(state["config"]) != _comparable(config_dict(config)) or state["variant"] != variant:
            raise ValueError(f"{path} holds a {state['variant']} run with another config; use another output "
                             f"folder, or start afresh (--fresh) to overwrite it")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.set_state(state["sampler"])
        step, history, train_seconds = state["step"], state["history"], state["train_seconds"]
        losses = state["losses"]
    model.train()
    xv, yv = val_windows(data, config)
    prompts = scan_prompts(data, tokenizer, config)
    attn_ids = xv[torch.linspace(0, len(xv) - 1, min(config.batch_size, len(xv))).long()]  # every corpus too
    tokens_per_step = config.batch_size * config.block_size

    def record(train_loss: float | None) -> None:
        history.append({"step": step, "tokens_seen": step * tokens_per_step, "lr": scheduler.get_last_lr()[0],
                        "train_loss": train_loss, "val_loss": validation_loss(model, xv, yv, config.batch_size),
                        **measure(model, tokenizer, prompts, attn_ids)})

    def save() -> None:
        _save(path, {"config": config_dict(config), "variant": variant, "model_config": model.config.to_dict(),
                     "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "sampler": sampler.get_state(), "history": history,
                     "losses": losses, "train_seconds": train_seconds})

    if not history:
        record(None)  # the untrained model, step 0
    last = min(config.steps, stop_at) if stop_at is not None else config.steps
    bar = tqdm(total=config.steps, initial=step, desc=f"train {variant}", unit="step", disable=not progress)
    while step < last:
        x, y = get_batch(data.train, config.batch_size, config.block_size, sampler)
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, x.to(device), y.to(device), config.grad_clip))
        scheduler.step()
        train_seconds += time.perf_counter() - start
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % config.every == 0 or step == config.steps:
            record(sum(losses) / len(losses))
            losses.clear()
            save()
    bar.close()
    if step % config.every and step != config.steps:
        save()  # stopped between measurements (stop_at): keep the progress
    final = scan_model(model, tokenizer, prompts, name=f"nanogpt-{variant}")
    return {"variant": variant, "device": str(device), "device_note": note, "model": model.config.to_dict(),
            "parameters": model.num_parameters(), "step": step, "finished": step >= config.steps,
            "tokens_seen": step * tokens_per_step, "train_seconds": train_seconds,
            "tokens_per_second": step * tokens_per_step / train_seconds if train_seconds else None,
            "history": history, "final_scan": final.to_dict(), "checkpoint": str(path)}


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[GPT, dict]:
    """The trained model of a checkpoint (in eval mode) and the checkpoint's record."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def run(config: TrainConfig, out: str | Path, *, variants: tuple[str, ...] = DEFAULT_VARIANTS, tokenizer=None,
        data: TokenData | None = None, resume: bool = True, stop_at: int | None = None,
        progress: bool = True) -> dict:
    """Train each variant on the same data, seed and batches; write ``emergence.json`` and ``emergence.png``.

    One folder per variant under ``out`` holds its checkpoint.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        config.model_config(1, variant)  # unknown variants fail before any training
    tokenizer = tokenizer if tokenizer is not None else smollm2_tokenizer(out / "tokenizer")
    data = data if data is not None else load_data(tokenizer, config)
    check_data(data, config)
    runs = {v: train_variant(config, v, data, tokenizer, out / v, resume=resume, stop_at=stop_at,
                             progress=progress) for v in variants}
    baselines = ngram_baselines(data, *val_windows(data, config), len(tokenizer))
    plots = {"curves": str(plot_curves(runs, out / "emergence.png", baselines))}
    for v, r in runs.items():
        final = ScanResult(**r["final_scan"])
        plots[f"final_{v}"] = str(plot_top_magnitudes(final, out / f"final_{v}.png",
                                                      f"{v} variant after {r['step']} steps: top |a| per layer"))
    epochs = max(r["tokens_seen"] for r in runs.values()) / len(data.train)
    results = {"data": {"train_tokens": len(data.train), "val_tokens": len(data.val), "baselines": baselines,
                        "corpora": data.corpora, "epochs": epochs},
               "runs": runs, "final": side_by_side(runs)}
    return write_result(out / "emergence.json", results, settings={"config": config_dict(config),
                                                                   "variants": list(variants)}, plots=plots)
