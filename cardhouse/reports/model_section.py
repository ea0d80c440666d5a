"""The report's first sections: the model (loaded here, kept for every later step) and its inputs."""

from __future__ import annotations

from ..capture import tokenize_prompts
from ..data.corpora import get_corpus
from ..data.token_cache import tokenize_corpus
from ..evaluation.perplexity import build_windows
from ..models import load_model
from ..models.loading import LoadedModel
from .context import Context
from .html import Section, Table, facts


def model_step(ctx: Context) -> Section:
    if isinstance(ctx.source, LoadedModel):
        lm = ctx.source
    else:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the report shows one progress display, its own
        try:
            lm = load_model(ctx.source, bos=ctx.settings.bos, **ctx.settings.load)
        finally:
            hf_logging.enable_progress_bar()
    ctx.keep("model", lm)
    d = lm.describe()
    table = facts("The model", {"name": d["name"], "family": d["family"], "parameters": d["parameters"],
                                "layers": d["layers"], "hidden size": d["d_model"],
                                "FFN size": lm.blocks.intermediate_size(0), "dtype": d["dtype"],
                                "BOS token first": d["bos_token"] or "no", "source": d["source"]})
    return Section(tables=[table], data={"model": d})


def inputs_step(ctx: Context) -> Section:
    lm, s = ctx.lm, ctx.settings
    token_lists = tokenize_prompts(lm, ctx.prompts)
    prompts = facts("Prompts of the scan and the massive-weight search",
                    {"source": s.prompts, "prompts": len(ctx.prompts), "tokens": sum(map(len, token_lists)),
                     "shortest prompt (tokens)": min(map(len, token_lists)),
                     "longest prompt (tokens)": max(map(len, token_lists))})
    rows, data = [], {}
    for name in s.corpora:
        ids = tokenize_corpus(lm.tokenizer, name, s.max_tokens)
        windows = build_windows(ids, context=s.context, bos_id=lm.bos_id)
        predicted = windows.shape[0] * (s.context - 1)
        rows.append([name, get_corpus(name).source, ids.numel(), windows.shape[0], s.context, predicted])
        data[name] = {"tokens": ids.numel(), "windows": windows.shape[0], "predicted_tokens": predicted}
    corpora = Table("Corpora of the perplexity measurements (the same tokens for every variant)",
                    ["corpus", "source", "tokens", "windows", "window length", "predicted tokens"], rows)
    return Section(tables=[prompts, corpora],
                   text=["Each prompt starts with the BOS token when the model has one; each perplexity window "
                         "does too, and all variants of a model are scored on the same windows."],
                   data={"prompts": ctx.prompts, "corpora": data})

