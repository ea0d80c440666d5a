"""Mixture of Experts on tiny random models of every MoE family, with the ground truth planted.

No trained MoE small enough is reachable offline, so each test model gets, by hand:
- in layer ``CARRIER_LAYER``, expert ``CARRIER_EXPERT``: neuron ``NEURON`` fires hugely on the BOS
  token and writes into hidden dimension ``DIM`` (a massive activation), and the router sends BOS
  to that expert (its router row points along BOS's FFN input);
- in layer ``SUPER_LAYER``, expert ``SUPER_EXPERT``: a down projection scaled up, so that its outputs
  are the largest of all experts (a super expert).
Qwen-MoE and DeepSeek models also get a dense first layer (``mlp_only_layers``, ``first_k_dense_replace``),
which the tools must handle.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import BOS_ID, MOE_FAMILIES, all_params_digest, bos_mlp_input, forward, sample_inputs, text_config
from cardhouse.analysis import find_massive_weights
from cardhouse.capture import MOE_POINTS, hook_name, hooks, parse_hook_name, record
from cardhouse.analysis.moe import analyze_moe, super_expert_rule
from cardhouse.interventions.experts import (EXPERT_ATTACKS, MOE_ATTACKS, OTHER, ExpertTarget, expert_attack,
                                             prune_experts, random_experts, route_around)
from cardhouse.interventions.weights import weights_digest, zero_rows
from cardhouse.models.adapters import ADAPTERS, SHARED, UnsupportedModelError
from cardhouse.models.loading import from_pretrained_objects

N_LAYERS, N_EXPERTS = 4, 8
CARRIER_LAYER, CARRIER_EXPERT, NEURON, DIM = 1, 2, 5, 7
SUPER_LAYER, SUPER_EXPERT = 3, 6
MIXED = {"qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"}  # may mix dense and MoE layers: layer 0 is dense
SHARED_FAMILIES = {"qwen2_moe", "deepseek_v2", "deepseek_v3"}
ON_OTHER_EXPERT = {"expert-other-zero", "expert-other-retain", "random-expert-ablate"}  # the controls on another expert


def build_moe(family: str, tokenizer, seed: int = 0):
    overrides = dict(num_hidden_layers=N_LAYERS, num_experts_per_tok=2)
    experts = {"mixtral": "num_local_experts", "deepseek_v2": "n_routed_experts",
               "deepseek_v3": "n_routed_experts"}.get(family, "num_experts")
    overrides[experts] = N_EXPERTS
    if family in MIXED:
        overrides |= {"first_k_dense_replace": 1} if family.startswith("deepseek") else {"mlp_only_layers": [0]}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(text_config(family, **overrides)).eval()
    return from_pretrained_objects(model, tokenizer, name=f"tiny-moe-{family}", bos=True)


def plant(lm) -> None:
    blocks = lm.blocks
    with torch.no_grad():
        x0 = bos_mlp_input(lm, CARRIER_LAYER)
        u = x0 / x0.norm()
        blocks.mlp_part(CARRIER_LAYER, "router").weight[CARRIER_EXPERT] = 3.0 * u  # BOS logit ~17, others ~±3
        for tensor, axis, offset in blocks.neuron_slices(CARRIER_LAYER, CARRIER_EXPERT):
            tensor.select(axis, offset + NEURON).copy_(6.0 * u)
        blocks.down_weight(CARRIER_LAYER, CARRIER_EXPERT)[DIM, NEURON] = 100.0
        # the super expert: chosen by ordinary tokens (its router row along their mean FFN input), not by BOS ...
        inputs = sample_inputs(lm)
        with record(lm.model, [hook_name(SUPER_LAYER, "mlp.hook_in")]) as store:
            forward(lm, inputs)
        ordinary = store[hook_name(SUPER_LAYER, "mlp.hook_in")][:, 1:][inputs["attention_mask"][:, 1:].bool()]
        bos = store[hook_name(SUPER_LAYER, "mlp.hook_in")][0, 0]
        mean = ordinary.mean(0)
        mean = mean - (mean @ bos) / (bos @ bos) * bos  # orthogonal to BOS's input: BOS is not sent there
        blocks.mlp_part(SUPER_LAYER, "router").weight[SUPER_EXPERT] = 2.0 * mean / mean.norm()
        # ... with outputs ~1e6 (random experts output ~1e-3, the carrier's expert ~1e5 on BOS)
        blocks.mlp_part(SUPER_LAYER, "down")[SUPER_EXPERT] *= 1e9


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def planted(request, tokenizer):
    lm = build_moe(request.param, tokenizer)
    plant(lm)
    return lm


@pytest.fixture(scope="module")
def analysis(planted):
    return analyze_moe(planted, k=3, progress=False)


def test_the_carrier_expert_and_its_rows_are_found_exactly(planted, analysis):
    mw = analysis.massive_weights
    assert mw["massive"] and (mw["layer"], mw["dim"], mw["expert"], mw["indices"][0]) == (CARRIER_LAYER, DIM,
                                                                                         CARRIER_EXPERT, NEURON)
    assert abs(mw["activations"][0]) > 100 * abs(mw["activations"][1])
    experts = {e["expert"]: e for e in mw["experts"]}
    routed = [e for e in experts if e != SHARED]
    assert len(routed) == 2 and experts[CARRIER_EXPERT]["indices"][0] == NEURON  # top-2 routing
    assert experts[CARRIER_EXPERT]["weight"] == max(experts[e]["weight"] for e in routed)
    assert (SHARED in experts) == (planted.family in SHARED_FAMILIES)  # the shared expert is listed where it exists
    others = [abs(e["contribution"]) for e in mw["experts"][1:]]
    assert mw["experts"][0]["contribution"] > 1e4 and max(others) < 1e-3 * mw["experts"][0]["contribution"]
    assert mw["super_weight"]["column"] == NEURON and mw["super_weight"]["row"] == DIM


def test_router_collapses_exactly_in_the_massive_layer(planted, analysis):
    layers = list(range(1, N_LAYERS)) if planted.family in MIXED else list(range(N_LAYERS))
    assert analysis.moe_layers == layers and analysis.n_experts == N_EXPERTS and analysis.top_k == 2
    assert analysis.collapse_layer == CARRIER_LAYER and analysis.collapsed_layers == [CARRIER_LAYER]
    by_layer = {r["layer"]: r for r in analysis.router}
    hit = by_layer[CARRIER_LAYER]
    assert hit["carrier"]["top1"] > 0.99 and hit["carrier"]["top1_expert"] == CARRIER_EXPERT
    assert hit["carrier"]["entropy"] < 0.1 and hit["carrier"]["chosen"][CARRIER_EXPERT] == 1.0
    assert hit["carrier"]["tokens"] == analysis.prompts and hit["ordinary"]["tokens"] > 10 * analysis.prompts
    assert hit["ordinary"]["top1"] < 0.7 and hit["ordinary"]["entropy"] > 0.5 * hit["max_entropy"]
    for r in analysis.router:
        assert sum(r["carrier"]["probs"]) == pytest.approx(1) and sum(r["ordinary"]["probs"]) == pytest.approx(1)
        assert sum(r["ordinary"]["chosen"]) == pytest.approx(2)  # two experts per token
        if r["layer"] != CARRIER_LAYER:
            assert r["carrier"]["top1"] < 0.6


def test_super_expert_is_found_exactly(planted, analysis):
    se = analysis.super_experts
    assert analysis.flagged == [(SUPER_LAYER, SUPER_EXPERT)]  # the default rule: P99.5 and 1/10 of the layer max
    assert se["flagged"][0]["max_abs"] > 1e5 and se["flagged"][0]["max_abs"] > se["threshold"]
    assert len(se["experts"]) == len(analysis.moe_layers) * N_EXPERTS
    # a looser percentile adds the carrier's expert (its output on BOS is massive too), nothing else:
    # every other expert is below 1/10 of its layer's largest or below the 95th percentile
    looser = analyze_moe(planted, percentile=95, progress=False, massive_weights=False)
    assert set(looser.flagged) == {(SUPER_LAYER, SUPER_EXPERT), (CARRIER_LAYER, CARRIER_EXPERT)}
    carrier = next(e for e in looser.super_experts["flagged"] if e["layer"] == CARRIER_LAYER)
    assert carrier["position"] == 0 and carrier["token_id"] == BOS_ID and carrier["dim"] == DIM
    assert bool(looser.super_experts["shared"]) == (planted.family in SHARED_FAMILIES)


def test_moe_hook_points_hand_over_the_routers_decision_and_the_experts_inputs(planted):
    """The named MoE points (capture.moe) that the analysis reads, attached per batch like any hook point."""
    blocks, inputs = planted.blocks, sample_inputs(planted)
    tokens = inputs["input_ids"].numel()
    points = [p for p in MOE_POINTS if p != "mlp.hook_shared_out" or planted.family in SHARED_FAMILIES]
    seen = {}
    with hooks(planted.model, {hook_name(CARRIER_LAYER, p): lambda name, v: seen.setdefault(name, v) for p in points}):
        forward(planted, inputs)
    assert all(parse_hook_name(hook_name(CARRIER_LAYER, p)) == (CARRIER_LAYER, p) for p in MOE_POINTS)
    logits, weights, chosen = seen[hook_name(CARRIER_LAYER, "mlp.hook_router")]
    x, routed_to, _ = seen[hook_name(CARRIER_LAYER, "mlp.hook_experts_in")]
    assert logits.shape == (tokens, N_EXPERTS) and chosen.shape == weights.shape == (tokens, 2)
    assert x.shape == (tokens, planted.model.config.hidden_size) and torch.equal(routed_to, chosen)
    assert CARRIER_EXPERT in chosen[0].tolist()  # the BOS token (the first of the flattened batch x position)
    if planted.family in SHARED_FAMILIES:
        assert seen[hook_name(CARRIER_LAYER, "mlp.hook_shared_out")].shape[-1] == planted.model.config.hidden_size
    modules = [blocks.mlp_part(CARRIER_LAYER, part) for part in ("router", "experts")]
    assert not any(m._forward_hooks for m in modules)  # detached after the block
    if planted.family in MIXED:  # layer 0 is dense: no router to hook
        with pytest.raises(ValueError, match="no Mixture-of-Experts layer"), \
                hooks(planted.model, {hook_name(0, "mlp.hook_router"): lambda name, v: None}):
            pass


def test_super_expert_rule_needs_both_thresholds():
    maxima = {(0, 0): 100.0, (0, 1): 9.0, (1, 0): 1.0, (1, 1): 0.5} | {(2, e): 0.1 for e in range(100)}
    flagged, cut = super_expert_rule(maxima, percentile=97, fraction=0.1)
    assert 0.1 < cut < 0.5  # the 97th percentile of 104 maxima, 100 of them 0.1
    assert flagged == [(0, 0), (1, 0), (1, 1)]  # (0, 1) is above the percentile but below 1/10 of its layer's 100
    assert super_expert_rule(maxima, percentile=97, fraction=0.05)[0] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert super_expert_rule(maxima, percentile=97, fraction=0.6)[0] == [(0, 0), (1, 0)]
    assert super_expert_rule(maxima, percentile=99.5, fraction=0.1)[0] == [(0, 0)]
    with pytest.raises(ValueError, match="percentile"):
        super_expert_rule(maxima, percentile=101)


def _change(lm, before: torch.Tensor) -> float:
    """Mean over real tokens of the change of the last hidden state, relative to its mean norm."""
    inputs = sample_inputs(lm)
    after = forward(lm, inputs)
    mask = inputs["attention_mask"].bool()
    return float((after - before)[mask].norm(dim=-1).mean() / before[mask].norm(dim=-1).mean())


def test_attacks_hit_only_the_planted_experts(planted, analysis):
    """Each attack on the planted expert changes the model's output far more than each of its controls."""
    from cardhouse.analysis.massive_weights import MassiveWeights

    mw = MassiveWeights(**{k: v for k, v in analysis.massive_weights.items() if k != "n_weights"})
    target = ExpertTarget.build(planted, mw, k=1, super_experts=analysis.flagged)
    before = forward(planted, sample_inputs(planted))
    digest = all_params_digest(planted)
    changes = {}
    for attack, controls in MOE_ATTACKS.items():
        for kind in (attack, *controls):
            variant = expert_attack(target, kind)
            assert variant.expert == (None if kind.endswith("experts") else
                                      target.other if kind in ON_OTHER_EXPERT else CARRIER_EXPERT)
            with variant.apply():
                changes[kind] = _change(planted, before)
            assert all_params_digest(planted) == digest, kind
    for attack in ("expert-topk-zero", "expert-ablate", "super-experts"):  # the planted expert breaks the model
        for control in MOE_ATTACKS[attack]:
            assert changes[attack] > 0.05 and changes[attack] > 100 * changes[control], (attack, control, changes)
    # keeping only the massive row of the carrier's expert keeps the model (House of Cards' retaining);
    # keeping random rows instead breaks it; keeping those rows in another expert leaves the massive one alone
    assert changes["expert-random-retain"] > 0.05
    assert changes["expert-random-retain"] > 100 * changes["expert-topk-retain"], changes
    assert changes["expert-random-retain"] > 100 * changes["expert-other-retain"], changes
    assert torch.equal(forward(planted, sample_inputs(planted)), before)


def test_adding_an_moe_attack_is_one_entry(tokenizer):
    """The MoE registry's tables (controls in table order, which entries aim at another expert) are derived from
    the entries: one ``register_expert_attack`` each adds an attack and its control to ``attack moe``."""
    from cardhouse.interventions import Edit, ExpertAttackSpec, moe_variants, register_expert_attack

    assert {k for k, spec in EXPERT_ATTACKS.items() if spec.aims_at == OTHER} == ON_OTHER_EXPERT
    assert MOE_ATTACKS == {"expert-topk-zero": ("expert-random-zero", "expert-other-zero"),
                           "expert-topk-retain": ("expert-random-retain", "expert-other-retain"),
                           "expert-ablate": ("random-expert-ablate",), "super-experts": ("random-experts",)}

    def top1(t):
        return Edit(f"zero row {t.top[0]} of expert {t.expert}", lambda: zero_rows(t.lm, t.layer, t.top[:1],
                                                                                  expert=t.expert), t.top[:1])

    lm = build_moe("mixtral", tokenizer)
    plant(lm)
    try:
        register_expert_attack(ExpertAttackSpec("expert-top1-zero", "zero the top row", top1, takes_k=False,
                                                controls=("expert-other-top1-zero",)))
        register_expert_attack(ExpertAttackSpec("expert-other-top1-zero", "control", top1, takes_k=False,
                                                aims_at=OTHER))
        variants, target, _ = moe_variants(lm, "moe", k=1)
        by_kind = {v.kind: v for v in variants}
        assert [v.kind for v in variants][-2:] == ["expert-top1-zero", "expert-other-top1-zero"]
        attack, control = by_kind["expert-top1-zero"], by_kind["expert-other-top1-zero"]
        assert (attack.expert, attack.indices, attack.control_of) == (CARRIER_EXPERT, (NEURON,), None)
        assert (control.expert, control.control_of) == (target.other, "expert-top1-zero")
    finally:
        for name in ("expert-top1-zero", "expert-other-top1-zero"):
            EXPERT_ATTACKS.pop(name, None)
        register_expert_attack(EXPERT_ATTACKS["random-experts"])  # the derived tables again without them
    assert list(MOE_ATTACKS) == ["expert-topk-zero", "expert-topk-retain", "expert-ablate", "super-experts"]


def test_route_around_routes_as_if_the_expert_never_scored(planted):
    """BOS goes where the family's own router sends it when the ablated expert's logit is hugely negative
    (the ground truth, from the router's own forward with that weight row replaced); the logits are left alone."""
    router = planted.blocks.mlp_part(CARRIER_LAYER, "router")
    x0 = bos_mlp_input(planted, CARRIER_LAYER)[None]
    with torch.inference_mode():
        logits, weights, chosen = router(x0)
        with route_around(planted, CARRIER_LAYER, [CARRIER_EXPERT]):
            new_logits, new_weights, new_chosen = router(x0)
    saved = router.weight[CARRIER_EXPERT].clone()
    try:
        with torch.no_grad():
            router.weight[CARRIER_EXPERT] = -100 * x0[0] / x0.norm()  # logit about -570: as if it were not there
        with torch.inference_mode():
            _, true_weights, true_chosen = router(x0)
    finally:
        with torch.no_grad():
            router.weight[CARRIER_EXPERT] = saved
    assert CARRIER_EXPERT in chosen[0].tolist() and CARRIER_EXPERT not in new_chosen[0].tolist()
    assert torch.equal(new_logits, logits)
    order, true_order = new_chosen[0].argsort(), true_chosen[0].argsort()
    assert new_chosen[0][order].tolist() == true_chosen[0][true_order].tolist()
    torch.testing.assert_close(new_weights[0][order].float(), true_weights[0][true_order].float())
    assert not router._forward_hooks


def test_every_moe_edit_restores_bit_identical_weights_also_on_error(planted):
    digest = all_params_digest(planted)
    edits = [lambda: zero_rows(planted, CARRIER_LAYER, [NEURON, 0], expert=CARRIER_EXPERT),
             lambda: prune_experts(planted, [(SUPER_LAYER, SUPER_EXPERT), (CARRIER_LAYER, 0)]),
             lambda: route_around(planted, CARRIER_LAYER, [CARRIER_EXPERT])]
    for edit in edits:
        with pytest.raises(KeyError):
            with edit():
                forward(planted, sample_inputs(planted))
                raise KeyError("the body failed")
        assert all_params_digest(planted) == digest
        assert not planted.blocks.mlp_part(CARRIER_LAYER, "router")._forward_hooks
    with prune_experts(planted, [(SUPER_LAYER, SUPER_EXPERT)]):
        assert torch.all(planted.blocks.mlp_part(SUPER_LAYER, "down")[SUPER_EXPERT] == 0)
        assert all_params_digest(planted) != digest
    assert all_params_digest(planted) == digest


def test_random_experts_are_other_experts_of_the_same_layers(planted):
    chosen = [(SUPER_LAYER, SUPER_EXPERT), (CARRIER_LAYER, CARRIER_EXPERT)]
    for seed in range(5):
        control = random_experts(planted, chosen, seed=seed)
        assert [l for l, _ in control] == [SUPER_LAYER, CARRIER_LAYER] and not set(control) & set(chosen)


# ---- clear errors -------------------------------------------------------------------------------


def test_expert_out_of_range_is_a_clear_error(planted):
    with pytest.raises(IndexError, match=rf"expert {N_EXPERTS} is out of range.*0..{N_EXPERTS - 1}"):
        with route_around(planted, CARRIER_LAYER, [N_EXPERTS]):
            pass
    with pytest.raises(IndexError, match="out of range"):
        with prune_experts(planted, [(SUPER_LAYER, -1)]):
            pass
    with pytest.raises(ValueError, match="shared expert is not routed"):
        with route_around(planted, CARRIER_LAYER, [SHARED]):
            pass


def test_moe_attack_on_a_dense_layer_or_model_is_a_clear_error(planted, tiny):
    if planted.family in MIXED:
        with pytest.raises(ValueError, match="layer 0 is a dense FFN layer"):
            with route_around(planted, 0, [0]):
                pass
    dense = tiny("llama")
    with pytest.raises(ValueError, match="dense.*MoE model"):
        analyze_moe(dense, progress=False)
    with pytest.raises(ValueError, match="dense.*MoE model"):
        with prune_experts(dense, [(0, 0)]):
            pass
    mw = find_massive_weights(dense, k=2, n_prompts=2)
    with pytest.raises(ValueError, match="not a Mixture-of-Experts layer"):
        ExpertTarget.build(dense, mw)


def test_unknown_router_layout_names_the_adapter_fields(monkeypatch, tiny):
    from dataclasses import replace

    lm = tiny("olmoe")
    monkeypatch.setitem(ADAPTERS, "olmoe", replace(ADAPTERS["olmoe"], routing=None))
    for call in (lambda: analyze_moe(lm, progress=False), lambda: route_around(lm, 0, [0]).__enter__()):
        with pytest.raises(UnsupportedModelError, match=r"`router`.*`experts`.*`routing`.*adapters.py"):
            call()


def test_bad_thresholds_fail_before_model_time(planted):
    with pytest.raises(ValueError, match="percentile"):
        analyze_moe(planted, percentile=120, progress=False)
    with pytest.raises(ValueError, match="collapse"):
        analyze_moe(planted, collapse=0, progress=False)


def test_shared_expert_of_a_qwen2_moe_layer_is_a_massive_weight_candidate(tokenizer):
    """Plant the massive neuron in the shared expert instead: it is found there, as expert 'shared'."""
    lm = build_moe("qwen2_moe", tokenizer)
    blocks = lm.blocks
    x0 = bos_mlp_input(lm, CARRIER_LAYER)
    u = x0 / x0.norm()
    with torch.no_grad():
        for tensor, axis, offset in blocks.neuron_slices(CARRIER_LAYER, SHARED):
            tensor.select(axis, offset + NEURON).copy_(6.0 * u)
        blocks.down_weight(CARRIER_LAYER, SHARED)[DIM, NEURON] = 100.0
    mw = find_massive_weights(lm, k=3)
    assert (mw.layer, mw.dim, mw.expert, mw.indices[0]) == (CARRIER_LAYER, DIM, SHARED, NEURON)
    digest = all_params_digest(lm)
    before = forward(lm, sample_inputs(lm))
    with zero_rows(lm, mw.layer, mw.indices[:1], expert=SHARED):
        assert _change(lm, before) > 0.05
    assert all_params_digest(lm) == digest


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_bfloat16_model_gives_the_same_truth_and_restores_every_edit(family, tokenizer):
    """Statistics accumulate in float32/float64 whatever the model's dtype; edits restore bfloat16 bits."""
    lm = build_moe(family, tokenizer)
    plant(lm)
    lm.model.to(torch.bfloat16)
    a = analyze_moe(lm, k=3, progress=False)
    mw = a.massive_weights
    assert (a.collapse_layer, a.flagged) == (CARRIER_LAYER, [(SUPER_LAYER, SUPER_EXPERT)])
    assert (mw["layer"], mw["dim"], mw["expert"], mw["indices"][0]) == (CARRIER_LAYER, DIM, CARRIER_EXPERT, NEURON)
    target = ExpertTarget.build(lm, find_massive_weights(lm, k=3), k=1, super_experts=a.flagged)
    digest = all_params_digest(lm)
    for kind in EXPERT_ATTACKS:
        with expert_attack(target, kind).apply():
            forward(lm, sample_inputs(lm))
        assert all_params_digest(lm) == digest, kind


def test_massive_weights_in_a_dense_layer_of_a_mixed_model(tokenizer):
    """Qwen2-MoE with a dense layer 0 that writes the massive activation: found there, with no expert;
    the MoE analysis says so and the expert attacks refuse clearly."""
    lm = build_moe("qwen2_moe", tokenizer)
    blocks = lm.blocks
    x0 = bos_mlp_input(lm, 0)
    with torch.no_grad():
        for tensor, axis, offset in blocks.neuron_slices(0):
            tensor.select(axis, offset + NEURON).copy_(6.0 * x0 / x0.norm())
        blocks.down_weight(0)[DIM, NEURON] = 100.0
    a = analyze_moe(lm, k=3, progress=False)
    mw = a.massive_weights
    assert (mw["layer"], mw["dim"], mw["expert"], mw["indices"][0], mw["experts"]) == (0, DIM, None, NEURON, [])
    assert any("massive-weight layer 0 is a dense FFN layer" in n for n in a.notes)
    with pytest.raises(ValueError, match="not a Mixture-of-Experts layer"):
        ExpertTarget.build(lm, find_massive_weights(lm, k=3))


def test_dispatched_with_disk_offload_gives_the_same_analysis_and_edits(tokenizer, tmp_path):
    """accelerate keeps block 0 on the CPU and the rest on disk: the MoE analysis is the in-memory one,
    pruning and routing around act as in memory and restore the offloaded weights bit-identically."""
    from test_placement import split_map

    from cardhouse.models import load_model

    ref = build_moe("mixtral", tokenizer)
    plant(ref)
    ref.model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    lm = load_model(str(tmp_path / "ckpt"), bos=True, device_map=split_map(ref), offload_folder=tmp_path / "off")
    assert lm.blocks.mlp_part(SUPER_LAYER, "experts").down_proj.is_meta  # really offloaded
    a, b = analyze_moe(lm, k=3, progress=False), analyze_moe(ref, k=3, progress=False)
    assert (a.collapse_layer, a.flagged, a.massive_weights["expert"], a.massive_weights["indices"]) == \
        (b.collapse_layer, b.flagged, b.massive_weights["expert"], b.massive_weights["indices"])
    for x, y in zip(a.super_experts["experts"], b.super_experts["experts"]):
        assert x["max_abs"] == pytest.approx(y["max_abs"], rel=1e-5)
    ids = torch.tensor([[BOS_ID, 40, 41, 42, 43, 44, 45]])

    def logits(model):
        with torch.inference_mode():
            return model.model(input_ids=ids).logits

    def digest():
        return all_params_digest(ref), weights_digest([lm.blocks.mlp_part(l, "down") for l in range(N_LAYERS)])

    clean, before = logits(lm), digest()
    for edit in (lambda m: prune_experts(m, [(SUPER_LAYER, SUPER_EXPERT)]),
                 lambda m: route_around(m, CARRIER_LAYER, [CARRIER_EXPERT])):
        with edit(lm), edit(ref):
            torch.testing.assert_close(logits(lm), logits(ref))
            assert not torch.allclose(logits(lm), clean)
        assert digest() == before and torch.equal(logits(lm), clean)
