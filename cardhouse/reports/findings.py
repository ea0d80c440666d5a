"""The report's opening: what it found, in a few sentences and one small table, read from the sections.

Where the massive activations are and how large, which FFN writes them, what breaks the model and
against what control. Every number is in the table (taken from the sections' own results, so the
page's number checks cover it); the sentences name dims, layers and tokens and say what the numbers
mean. A model whose steps failed gets the parts that did run.
"""

from __future__ import annotations

from ..evaluation.metrics import PPL, metric_keys, metric_of
from ..interventions.variants import get_attack, original
from .html import Section, Table, layer_ranges

BREAKS, HARMLESS = 2.0, 1.05  # perplexity ratios called "breaks the model" / "barely changes it"
ATTACK = "topk-zero"  # the attack the opening reports, beside its registered random control


def _data(model: dict, key: str) -> dict:
    section = next((s for s in model["sections"] if s["key"] == key), None)
    return section["data"] if section and section["status"] == "ok" else {}


def _effect(ratio: float) -> str:
    if ratio >= BREAKS:
        return "breaks the model"
    if ratio <= HARMLESS:
        return "barely changes it"
    return "hurts it"


def _model_findings(model: dict, attack_k: int) -> tuple[list[str], list]:
    scan = _data(model, "scan").get("scan")
    weights = _data(model, "weights").get("massive_weights")
    rows = _data(model, "attacks").get("results", [])
    name, sentences = model["name"], []
    row = [name, None, None, None, None, None, None, None, None, None, None, None]
    if scan is not None:
        if scan["massive_layers"]:
            peak = max(scan["layers"], key=lambda r: r["top-1"])
            roles = {role: r["prompts_with_massive"] for role, r in scan["roles"].items()}
            carrier = max(roles, key=roles.get)
            row[1:6] = [[d["dim"] for d in scan["massive_dims"]], layer_ranges(scan["massive_layers"]), peak["top-1"],
                        peak["median"], f"{carrier} ({roles[carrier]} of {scan['prompts']} prompts)"]
            sentences.append(f"{name}: massive activations in dim {', '.join(str(d['dim']) for d in scan['massive_dims'])}"
                             f" of layers {layer_ranges(scan['massive_layers'])}, carried by the "
                             f"{'BOS' if carrier == 'bos' else carrier} token.")
        else:
            sentences.append(f"{name}: no activation meets the criterion in any layer.")
    if weights is not None:
        row[6:8] = [weights["layer"], weights["indices"][:attack_k]]
        through = f"rows {', '.join(map(str, weights['indices'][:attack_k]))} of W_up and W_gate"
        first = next((min(d["layers"]) for d in (scan or {}).get("massive_dims", []) if d["dim"] == weights["dim"]),
                     None)
        if weights["massive"] and first is not None and first < weights["layer"]:  # Gemma-3: no one FFN writes it
            sentences.append(f"Dim {weights['dim']} is massive from layer {first} and grows over several layers; "
                             f"the FFN of layer {weights['layer']} adds the most to it, through {through}.")
        elif weights["massive"]:
            sentences.append(f"The FFN of layer {weights['layer']} writes them, through {through}.")
    by_kind = {(r["kind"], r["k"]): r for r in rows}
    base, top, control = by_kind.get((original().kind, None)), by_kind.get((ATTACK, attack_k)), \
        by_kind.get((get_attack(ATTACK).control, attack_k))
    metric = next((key for key in metric_keys(base or {}) if metric_of(key) is PPL), None)  # the first corpus's
    if base and top and control and metric:
        ratio = top[metric] / base[metric]
        row[8:12] = [base[metric], top[metric], control[metric], ratio]
        spec = metric_of(metric)  # "perplexity on wikipedia", not the row key ppl_wikipedia
        sentences.append(f"Zeroing those top-{attack_k} rows {_effect(ratio)} ({spec.title} on {spec.source(metric)}); "
                         f"zeroing {attack_k} random "
                         f"rows, the control, {_effect(control[metric] / base[metric])}.")
    return sentences, row


def findings(reports: list[dict], attack_k: int) -> Section:
    """The opening section of ``reports`` (``results["models"]``): sentences, and one row per model."""
    text, rows = [], []
    for model in reports:
        sentences, row = _model_findings(model, attack_k)
        text.append(" ".join(sentences))
        rows.append(row)
    table = Table(f"What was found (perplexity on the first corpus; k = {attack_k} rows)",
                  ["model", "massive dims", "layers", "largest |a|", "median |a| there", "carried by",
                   "FFN layer l", f"top-{attack_k} rows", "perplexity", f"top-{attack_k} zeroed",
                   f"{attack_k} random rows zeroed", "top-k / original"], rows)
    return Section(key="findings", title="Findings", text=text, tables=[table])
