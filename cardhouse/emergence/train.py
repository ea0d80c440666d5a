"""Training the small decoder from scratch on real text, watching massive activations emerge.

Every ``every`` steps the run records the validation loss, the massive-activation scan's
statistics (``cardhouse.analysis.scan``, the very code that scans pretrained LLMs, through
the ``nanogpt`` adapter) and the attention share on the first token and on k', then
writes a checkpoint: an interrupted run resumes from the last one and continues exactly
as if it had not stopped (the batch sampler's state is in the checkpoint too).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._files import write_atomically
from ..results import write_result
from ..analysis.massive_activations import Criterion, ScanResult, scan
from ..data.corpora import tokenize_corpus
from ..models.loading import BUNDLED, from_pretrained_objects, gguf_cache_folder
from ..reports.plots import plot_top_magnitudes
from .model import GPT, GPTConfig
from .report import plot_curves, side_by_side

# variant -> what its attention has before the sequence's keys (GPTConfig fields)
VARIANTS: dict[str, dict[str, bool]] = {
    "standard": {},
    "bias": {"attn_bias": True},  # the explicit attention bias: learned k' and v' per head
    "sink": {"attn_bias": True, "zero_value": True},  # a learned k' whose value v' is zero
}
DEFAULT_VARIANTS = ("standard", "bias")
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    # optimization: AdamW, linear warmup then cosine decay to min_lr
    batch_size: int = 8
    steps: int = 200
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # data and measurements
    corpora: tuple[str, ...] = ("wikipedia", "c4", "austen")
    val_fraction: float = 0.05  # the end of each corpus is held out
    every: int = 20  # measure, validate and checkpoint every N steps
    eval_windows: int = 32  # validation windows of block_size tokens
    scan_prompts: int = 16  # held-out windows of block_size // 2 tokens, scanned like LLM prompts
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and f.name != "seed" and value < 1:
                raise ValueError(f"{f.name} must be at least 1, not {value}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, not {self.val_fraction}")
        if self.n_embd % self.n_head:
            raise ValueError(f"the head count ({self.n_head}) must divide the width n_embd ({self.n_embd})")

    def model_config(self, vocab_size: int, variant: str) -> GPTConfig:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
        return GPTConfig(vocab_size=vocab_size, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                         block_size=self.block_size, **VARIANTS[variant])


CONFIGS: dict[str, TrainConfig] = {
    # ~7M parameters (6.3M of them the tied embedding of SmolLM2's 49k tokens); a few minutes per variant on 2 cores
    "cpu": TrainConfig(),
    # the GPU scale: 8 layers, width 512, context 256, 16k tokens per step; 98M tokens seen, so all the
    # real text there is (not wiki-demo: another revision of the Wikipedia articles, it would leak into validation)
    "gpu": TrainConfig(n_layer=8, n_head=8, n_embd=512, block_size=256, batch_size=64, steps=6000, lr=6e-4,
                       min_lr=6e-5, warmup=300, every=250, eval_windows=256, scan_prompts=32, device="cuda",
                       corpora=("wikipedia", "c4", "austen", "kjv", "botchan")),
}


# ---- data ------------------------------------------------------------------------------------------


@dataclass
class TokenData:
    train: torch.Tensor  # [n_train] token ids
    val: torch.Tensor  # [n_val] held-out token ids
    corpora: dict[str, int]  # corpus -> tokens (train + val)


def smollm2_tokenizer(folder: Path | None = None):
    """SmolLM2's tokenizer without its weights.

    From ``folder`` when it holds one (a run folder keeps its own copy, so that it can be
    carried to a machine without package registries), else from the bundled model's cache,
    else from its GGUF file; then saved to ``folder``.
    """
    from transformers import AutoTokenizer


    if folder is not None and (Path(folder) / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    gguf = BUNDLED["smollm2-135m"].locate_gguf()
    cached = gguf_cache_folder(gguf)  # where load_model keeps it
    if (cached / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # parses the GGUF: seconds
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


def split_tokens(per_corpus: dict[str, torch.Tensor], val_fraction: float) -> TokenData:
    """Hold out the end of every corpus, so that each one is in the validation text."""
    train, val = [], []
    for ids in per_corpus.values():
        cut = len(ids) - int(len(ids) * val_fraction)
        train.append(ids[:cut])
        val.append(ids[cut:])
    return TokenData(torch.cat(train), torch.cat(val), {name: len(ids) for name, ids in per_corpus.items()})


def load_data(tokenizer, config: TrainConfig) -> TokenData:
    return split_tokens({name: tokenize_corpus(tokenizer, name) for name in config.corpora}, config.val_fraction)


def check_data(data: TokenData, config: TrainConfig) -> None:
    T, B = config.block_size, config.batch_size
    if len(data.train) < B * T + 1:
        raise ValueError(f"the training text has {len(data.train):,} tokens, too few for a batch of {B} windows of "
                         f"{T} tokens (at least {B * T + 1:,}): add corpora or lower the context or batch size")
    if len(data.val) < T + 1:
        raise ValueError(f"the held-out text has {len(data.val):,} tokens, fewer than one window of {T + 1}: "
                         f"add corpora, raise val_fraction or lower the context")


def get_batch(tokens: torch.Tensor, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows ``x [B, T]`` and their next tokens ``y [B, T]``."""
    start = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    x = torch.stack([tokens[i:i + block_size] for i in start.tolist()])
    y = torch.stack([tokens[i + 1:i + 1 + block_size] for i in start.tolist()])
    return x, y


def val_windows(data: TokenData, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping held-out windows ``x, y [n, T]``, spread evenly over the whole held-out text.

    Spread, because the held-out text is every corpus's end one after the other: the first
    windows alone would be the first corpus's. The same windows at every measurement.
    """
    T = config.block_size
    n = min(config.eval_windows, (len(data.val) - 1) // T)
    starts = torch.linspace(0, len(data.val) - T - 1, n).long().tolist()  # spaced >= T apart: n * T <= len - 1
    x = torch.stack([data.val[s:s + T] for s in starts])
    y = torch.stack([data.val[s + 1:s + T + 1] for s in starts])
    return x, y


def ngram_baselines(data: TokenData, x: torch.Tensor, y: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Cross-entropy of counting models of the training text on the held-out windows ``x -> y``.

    Where the loss curves stand against counting: a unigram model (add-one) and a bigram
    model (Witten-Bell interpolation with the unigram: no parameter tuned on held-out text).
    A transformer below the bigram line uses more context than the previous token.
    """
    train, V = data.train, vocab_size
    unigram = (torch.bincount(train, minlength=V).double() + 1) / (len(train) + V)
    pairs, counts = torch.unique(train[:-1] * V + train[1:], return_counts=True)  # sorted (previous, next) codes
    context = torch.bincount(train[:-1], minlength=V).double()  # c(h)
    followers = torch.bincount(pairs // V, minlength=V).double()  # distinct next tokens after h
    h, w = x.flatten(), y.flatten()
    query = h * V + w
    i = torch.searchsorted(pairs, query).clamp(max=len(pairs) - 1)
    seen = torch.where(pairs[i] == query, counts[i].double(), torch.zeros((), dtype=torch.float64))
    bigram = torch.where(context[h] > 0, (seen + followers[h] * unigram[w]) / (context[h] + followers[h]).clamp(min=1),
                         unigram[w])
    return {"unigram": float(-unigram[w].log().mean()), "bigram": float(-bigram.log().mean())}


def scan_prompts(data: TokenData, tokenizer, config: TrainConfig) -> list[str]:
    """Held-out text cut into windows of half the context (re-tokenizing them stays within it)."""
    length = config.block_size // 2 or 1
    starts = torch.linspace(0, len(data.val) - length - 1, config.scan_prompts).long().unique().tolist()
    return [tokenizer.decode(data.val[s:s + length].tolist()) for s in starts]


# ---- measurements ----------------------------------------------------------------------------------


def scan_model(model: GPT, tokenizer, prompts: list[str], *, name: str = "nanogpt",
               criterion: Criterion = Criterion()) -> ScanResult:
    """The project's massive-activation scan of the small model, as for any pretrained LLM.

    No BOS token: training windows start anywhere in the text, so position 0 is the
    first token, as in the GPT-2 runs of Sun et al.
    """
    was_training = model.training
    # the scan feeds CPU tensors; a copy keeps the trained model (and its optimizer) on the GPU
    on_cpu = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    try:
        return scan(from_pretrained_objects(on_cpu, tokenizer, name=name, source="trained from scratch", bos=False),
                    prompts, criterion=criterion, progress=False)
    finally:
        model.train(was_training)


def layer_summary(result: ScanResult) -> list[dict]:
    """Per layer: Table 1's top-1..3 and median, their ratio, and where the top value sits."""
    rows = []
    for row in result.layers:
        top = row["top_entries"][0] if row["top_entries"] else {}
        rows.append({"layer": row["layer"], **{k: row[k] for k in ("top-1", "top-2", "top-3", "median")},
                     "ratio": row["ratio_top1_median"], "massive_dims": row["massive_dims"],
                     "top_dim": top.get("dim"), "top_position": top.get("position"), "top_token": top.get("token")})
    return rows


@torch.no_grad()
def validation_loss(model: GPT, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(x), batch_size):
        _, loss = model(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))
        total += float(loss) * len(x[i:i + batch_size])
    model.train(was_training)
    return total / len(x)


def measure(model: GPT, tokenizer, prompts: list[str], attn_ids: torch.Tensor) -> dict:
    result = scan_model(model, tokenizer, prompts)
    layers = layer_summary(result)
    peak = max(layers, key=lambda r: r["ratio"])
    shares = model.attention_shares(attn_ids.to(next(model.parameters()).device))
    return {"layers": layers, "max_top1": max(r["top-1"] for r in layers), "max_ratio": peak["ratio"],
            "max_ratio_layer": peak["layer"], "massive_layers": result.massive_layers, "massive_dims": result.dims,
            "attention": shares}


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
        if _comparable(state["config"]) != _comparable(_config_dict(config)) or state["variant"] != variant:
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
        _save(path, {"config": _config_dict(config), "variant": variant, "model_config": model.config.to_dict(),
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


def _config_dict(config: TrainConfig) -> dict:
    d = asdict(config)
    d["corpora"] = list(config.corpora)
    return d


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[GPT, dict]:
    """The trained model of a checkpoint (in eval mode) and the checkpoint's record."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def config_with(name: str = "cpu", **overrides) -> TrainConfig:
    """A named config (``cpu`` or ``gpu``) with some fields replaced (None leaves a field as it is)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; configs: {', '.join(CONFIGS)}")
    return replace(CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None})


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
    return write_result(out / "emergence.json", results, settings={"config": _config_dict(config),
                                                                   "variants": list(variants)}, plots=plots)
