"""A small GPT-2-style decoder (pre-norm, learned positions), nanoGPT style, in three variants.

The variants differ only in attention. With ``attn_bias=True`` every head has a learnable
key k' and value v' prepended to the keys and values of every sequence (Sun et al. 2024,
Sec. 5): a query can put weight on k' and receive v' instead of parking attention on the
first token, which is what massive activations are thought to provide implicitly. With
``zero_value=True`` as well, v' is fixed at zero: a sink slot that can absorb attention but
adds nothing, so the model may attend "nowhere" without a bias to add.

The module names follow nanoGPT (``transformer.h[l].attn``, ``mlp.c_fc``, ``ln_2``, ...),
and ``config.model_type`` is ``"nanogpt"``: the adapter table entry of that name makes the
model scannable by ``cardhouse.analysis.scan`` like any pretrained model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 49152  # SmolLM2's tokenizer
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128  # context length
    attn_bias: bool = False  # the explicit attention bias k', v' per head
    zero_value: bool = False  # with attn_bias: v' fixed at zero (a sink slot), only k' is learned
    model_type: str = "nanogpt"  # the adapter table key

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"the head count ({self.n_head}) must divide the width n_embd ({self.n_embd})")
        if self.zero_value and not self.attn_bias:
            raise ValueError("zero_value needs attn_bias: it fixes the value of the bias slot")

    # the names the analyses read from Hugging Face configs
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def max_position_embeddings(self) -> int:
        return self.block_size

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        n_slots = 1 if config.attn_bias else 0  # key slots before the sequence's own keys
        if config.attn_bias:
            self.k_bias = nn.Parameter(torch.zeros(config.n_head, 1, self.head_dim))  # k' [head, 1, hd], drawn in GPT
            v_bias = torch.zeros(config.n_head, 1, self.head_dim)  # v' [head, 1, hd]
            if config.zero_value:  # a buffer: no gradient, no optimizer state, zero forever
                self.register_buffer("v_bias", v_bias)
            else:
                self.v_bias = nn.Parameter(v_bias)
        # additive mask [query, key slot]: query i sees the bias slot and keys 0..i
        T = config.block_size
        causal = torch.full((T, T), -math.inf).triu(1)
        self.register_buffer("mask", torch.cat([torch.zeros(T, n_slots), causal], dim=1), persistent=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, hd]; k, v [B, H, slots + T, hd] with k', v' first when the model has them."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        if hasattr(self, "k_bias"):
            k = torch.cat([self.k_bias.expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([self.v_bias.expand(B, -1, -1, -1), v], dim=2)
        return q, k, v

    def _mask(self, T: int) -> torch.Tensor:
        slots = self.mask.shape[1] - self.mask.shape[0]
        return self.mask[:T, :slots + T]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(T))  # [B, H, T, hd]
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights [B, H, query, key slot] (k' is slot 0 when present): for analysis."""
        q, k, _ = self.qkv(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        return torch.softmax(scores + self._mask(x.shape[1]), dim=-1)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The body: embeddings, blocks, final norm. What the scan runs (``GPT.base_model``)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"{T} tokens are more than the context of {self.config.block_size}")
        return self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False) -> torch.Tensor:
        # attention_mask is not needed: batches are right-padded and attention is causal, so
        # padding never reaches a real token (the signature is the one the scan calls)
        x = self.embed(input_ids)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))
        # k' is drawn last, so that both variants start from the same weights everywhere else
        for name, p in self.named_parameters():
            if name.endswith("k_bias"):
                nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def base_model(self) -> Transformer:
        return self.transformer

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits [B, T, vocab] and the mean cross-entropy against ``targets`` (or None)."""
        logits = self.lm_head(self.transformer(input_ids))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def attention_shares(self, input_ids: torch.Tensor) -> dict[str, list[float]]:
        """Per layer, the mean attention weight on the first token and on k' (0 without the bias).

        Averaged over heads, sequences and the queries after the first (query 0 can attend
        only to itself and k', so including it would inflate the first-token share).
        """
        body, first, bias = self.transformer, [], []
        x = body.embed(input_ids)
        for block in body.h:
            p = block.attn.probs(block.ln_1(x))[:, :, 1:]  # [B, H, query >= 1, slot]
            slots = p.shape[-1] - input_ids.shape[1]
            first.append(float(p[..., slots].mean()))
            bias.append(float(p[..., 0].mean()) if slots else 0.0)
            x = block(x)
        return {"first_token": first, "k_bias": bias}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
