"""What a run measures on held-out text: the validation loss, the project's massive-activation scan of
the small model, the attention shares, and the counting baselines the loss curves stand against."""

from __future__ import annotations

import copy

import torch

from ..analysis.massive_activations import Criterion, ScanResult, scan
from ..models.loading import from_pretrained_objects
from .model import GPT
from .tokens import TokenData


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
