"""What an emergence run trains: the variants (what the attention has before the sequence's keys) and
``TrainConfig`` with its named sizes (``CONFIGS``: ``cpu`` and ``gpu``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .model import GPTConfig

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


def config_with(name: str = "cpu", **overrides) -> TrainConfig:
    """A named config (``cpu`` or ``gpu``) with some fields replaced (None leaves a field as it is)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; configs: {', '.join(CONFIGS)}")
    return replace(CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None})


def config_dict(config: TrainConfig) -> dict:
    """The config as JSON (the corpora a list), as checkpoints and emergence.json hold it."""
    d = asdict(config)
    d["corpora"] = list(config.corpora)
    return d
