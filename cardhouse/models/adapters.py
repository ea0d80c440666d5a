"""Where each architecture keeps its parts: the one table of architecture differences.

Every entry names, relative to the model and to one decoder block, the modules the
rest of cardhouse touches. Adding a family is adding one entry to ``ADAPTERS``.

The FFN neurons are addressed by ``mlp_layout``:
- ``"gated"``: separate ``gate`` and ``up`` ``nn.Linear`` (rows = neurons);
- ``"fused"``: one ``nn.Linear`` whose rows are ``[gate; up]`` (Phi-3);
- ``"conv1d"``: GPT-2 ``Conv1D`` whose *columns* are neurons, no gate;
- ``"linear"``: a plain ``nn.Linear`` fc_in, no gate (ViT/DINOv2);
- ``"experts"``: a Mixture of Experts with 3-D ``[expert, 2*inter, d]`` gate_up tensors.

FFN part paths are relative to ``mlp``, or to the block when they start with ``/`` (BERT splits its
FFN over two modules, ``intermediate`` and ``output``). ``inputs`` says what the model reads:
``"causal"`` tokens (decoder LMs), ``"text"`` tokens under bidirectional attention ([CLS] ... [SEP]),
or ``"image"`` pixels (CLS, then any register tokens, then the patches row by row).

A family whose FFN layout depends on its config is resolved in ``adapter_for`` (DINOv2 with
``use_swiglu_ffn`` is gated). A family that mixes dense and MoE layers (Qwen2/3-MoE's
``mlp_only_layers``, ``decoder_sparse_step``) names its dense layout in ``dense``: a layer whose FFN
has no ``router`` is laid out like that (``Blocks.ffn``), decided by the modules, not by config
arithmetic. An always-on shared expert (Qwen2-MoE) is addressed as expert ``SHARED``, laid out like
``dense``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .offload import home, shapes_only


@dataclass(frozen=True)
class Adapter:
    family: str
    layers: str  # model -> ModuleList of blocks
    attn: str  # block -> attention module
    mlp: str  # block -> FFN (or MoE block)
    resid_mid_norm: str  # block -> norm whose *input* is the residual stream after attention
    final_norm: str | None  # model -> last norm before the head (None: post-norm blocks end in their own norm)
    up: str  # mlp -> fc_in / up projection (or fused gate_up)
    down: str  # mlp -> down projection / fc_out
    gate: str | None = None  # mlp -> gate projection, if separate
    mlp_layout: str = "gated"
    act: str = "act_fn"  # mlp -> activation module
    router: str | None = None  # mlp -> MoE router (weight [experts, d])
    sandwich_norm: bool = False  # post-attention and post-FFN norms before the residual add
    # attention: separate q/k/v/o nn.Linear projections (None where q/k/v are fused, e.g. GPT-2's c_attn)
    q_proj: str | None = None  # attn -> query projection
    k_proj: str | None = None  # attn -> key projection
    v_proj: str | None = None  # attn -> value projection
    o_proj: str | None = None  # attn -> output projection (heads concatenated -> d_model)
    n_heads: str = "num_attention_heads"  # config attribute: number of query heads
    n_kv_heads: str | None = "num_key_value_heads"  # config attribute: key/value heads (GQA); None: one per query head
    softmax_fp32: bool = True  # eager attention's softmax runs in float32 (False: in the model dtype); capture/attention.py
    # forward takes a custom 4-D attention mask and position ids as given: the lm-eval backend runs an item's
    # choices as one tree-shaped sequence (evaluation/lm_backend.py); False: a prefix pass, then the choices
    tree_mask: bool = True
    # the residual stream, for the function-preserving rescale (cardhouse/precision/rescale.py); None: not described
    embeddings: tuple[str, ...] | None = None  # model -> tensors whose values enter the residual stream
    writers: tuple[str, ...] | None = None  # block -> what is added to it: a tensor, or a module (weight and bias)
    writer_norms: tuple[str, ...] = ()  # block -> norms whose output is added to it (sandwich norms)
    readers: tuple[str, ...] | None = None  # block -> the norms that read it (their input's scale must not matter)
    norm_offset: float = 0.0  # norms compute x_hat * (norm_offset + weight): Gemma's (1 + weight)
    inputs: str = "causal"  # "causal" (decoder tokens), "text" (bidirectional encoder tokens) or "image" (pixels)
    mlp_out: str | None = None  # block -> module whose output is the FFN output, where that is not ``mlp``
    post_norm: bool = False  # the residual stream is normalized after each sum (BERT): hooks see normed states
    registers: str | None = None  # config attribute: register tokens after CLS (DINOv2 with registers)
    # an encoder's output feature (encoders/measures.py): the first token's last hidden state ("cls"), the
    # mean over the tokens ("mean": sentence encoders) or the model's own pooler_output ("pooler": CLIP)
    features: str = "cls"
    # Mixture of Experts (cardhouse/analysis/moe.py): the router returns (logits, top-k weights, top-k experts)
    experts: str | None = None  # mlp -> the module holding the 3-D expert tensors
    routing: str | None = None  # how router logits become expert weights (cardhouse/models/routing.py::ROUTINGS)
    router_norm: str | bool = True  # top-k weights renormalised: always (True), or the router attribute that says so
    shared_expert: str | None = None  # mlp -> always-on shared expert, laid out like `dense`
    shared_expert_gate: str | None = None  # mlp -> its sigmoid gate (a [1, d] Linear), if any
    dense: "Adapter | None" = None  # layout of this family's dense FFN layers and shared expert


SHARED = "shared"  # the expert index of an MoE layer's shared expert


_LLAMA = dict(layers="model.layers", attn="self_attn", mlp="mlp", resid_mid_norm="post_attention_layernorm",
              final_norm="model.norm", gate="gate_proj", up="up_proj", down="down_proj",
              q_proj="q_proj", k_proj="k_proj", v_proj="v_proj", o_proj="o_proj",
              embeddings=("model.embed_tokens.weight",), writers=("self_attn.o_proj", "mlp.down_proj"),
              readers=("input_layernorm", "post_attention_layernorm"))
_GEMMA = dict(_LLAMA, norm_offset=1.0)
# sandwich norms: the post-norms write into the stream (o_proj and down_proj only into the post-norms)
_SANDWICH = dict(_GEMMA, resid_mid_norm="pre_feedforward_layernorm", sandwich_norm=True, writers=(),
                 writer_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                 readers=("input_layernorm", "pre_feedforward_layernorm"))
_QKVO = dict(q_proj="q_proj", k_proj="k_proj", v_proj="v_proj", o_proj="o_proj")
_DINOV2 = dict(layers="encoder.layer", attn="attention", mlp="mlp", resid_mid_norm="norm2", final_norm="layernorm",
               up="fc1", down="fc2", mlp_layout="linear", act="activation_fn", inputs="image", n_kv_heads=None,
               softmax_fp32=False, **_QKVO)
# the layer scales (lambda1) multiply what each branch adds to the residual stream
_DINOV2_STREAM = dict(embeddings=("embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings",
                                  "embeddings.patch_embeddings.projection"),
                      writers=("layer_scale1.lambda1", "layer_scale2.lambda1"), readers=("norm1", "norm2"))
# transformers 5 MoE blocks: router `gate` -> (logits, weights, experts), experts as 3-D tensors
_MOE = dict(_LLAMA, gate=None, up="experts.gate_up_proj", down="experts.down_proj", mlp_layout="experts",
            act="experts.act_fn", router="gate", experts="experts", routing="softmax-topk",
            writers=("self_attn.o_proj", "mlp.experts.down_proj"))

_DEEPSEEK_WRITERS = _MOE["writers"] + ("mlp.shared_experts.down_proj",)

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", **_LLAMA),
    "mistral": Adapter("mistral", **_LLAMA),
    "qwen2": Adapter("qwen2", **_LLAMA),
    "qwen3": Adapter("qwen3", **_LLAMA),
    "gemma": Adapter("gemma", **_GEMMA),
    "gemma2": Adapter("gemma2", **_SANDWICH),
    "gemma3_text": Adapter("gemma3_text", **_SANDWICH),
    "phi3": Adapter("phi3", **dict(_LLAMA, gate=None, up="gate_up_proj", mlp_layout="fused", act="activation_fn",
                                   q_proj=None, k_proj=None, v_proj=None)),  # fused qkv_proj
    "gpt2": Adapter("gpt2", layers="transformer.h", attn="attn", mlp="mlp", resid_mid_norm="ln_2",
                    final_norm="transformer.ln_f", up="c_fc", down="c_proj", mlp_layout="conv1d", act="act",
                    n_heads="n_head", n_kv_heads=None, embeddings=("transformer.wte.weight", "transformer.wpe.weight"),
                    writers=("attn.c_proj", "mlp.c_proj"), readers=("ln_1", "ln_2"), softmax_fp32=False),
    "mixtral": Adapter("mixtral", **_MOE),
    "qwen2_moe": Adapter("qwen2_moe", **dict(_MOE, router_norm="norm_topk_prob", shared_expert="shared_expert",
                                             shared_expert_gate="shared_expert_gate",
                                             dense=Adapter("qwen2_moe", **_LLAMA),
                                             writers=_MOE["writers"] + ("mlp.shared_expert.down_proj",))),
    "qwen3_moe": Adapter("qwen3_moe", **dict(_MOE, router_norm="norm_topk_prob", dense=Adapter("qwen3_moe", **_LLAMA))),
    "olmoe": Adapter("olmoe", **dict(_MOE, router_norm="norm_topk_prob")),
    # multi-head latent attention: no separate q/k/v projections; first_k_dense_replace dense layers
    "deepseek_v2": Adapter("deepseek_v2", **dict(_MOE, routing="softmax-group-greedy", router_norm=False,
                                                 shared_expert="shared_experts", q_proj=None, k_proj=None, v_proj=None,
                                                 dense=Adapter("deepseek_v2", **_LLAMA), writers=_DEEPSEEK_WRITERS)),
    "deepseek_v3": Adapter("deepseek_v3", **dict(_MOE, routing="sigmoid-group-topk", router_norm="norm_topk_prob",
                                                 shared_expert="shared_experts", q_proj=None, k_proj=None, v_proj=None,
                                                 dense=Adapter("deepseek_v3", **_LLAMA), writers=_DEEPSEEK_WRITERS)),
    # cardhouse's own from-scratch decoder (cardhouse/emergence/model.py): GPT-2 names, nn.Linear FFN
    "nanogpt": Adapter("nanogpt", layers="transformer.h", attn="attn", mlp="mlp", resid_mid_norm="ln_2",
                       final_norm="transformer.ln_f", up="c_fc", down="c_proj", mlp_layout="linear", act="act",
                       embeddings=("transformer.wte.weight", "transformer.wpe.weight"),
                       writers=("attn.c_proj", "mlp.c_proj"), readers=("ln_1", "ln_2"), tree_mask=False),
    "dinov2": Adapter("dinov2", **_DINOV2, **_DINOV2_STREAM),
    "dinov2_with_registers": Adapter("dinov2_with_registers", **_DINOV2, registers="num_register_tokens"),
    "vit": Adapter("vit", layers="layers", attn="attention", mlp="mlp", resid_mid_norm="layernorm_after",
                   final_norm="layernorm", up="fc1", down="fc2", mlp_layout="linear", act="activation_fn",
                   inputs="image", n_kv_heads=None, **_QKVO),
    "clip_vision_model": Adapter("clip_vision_model", layers="encoder.layers", attn="self_attn", mlp="mlp",
                                 resid_mid_norm="layer_norm2", final_norm="post_layernorm", up="fc1", down="fc2",
                                 mlp_layout="linear", act="activation_fn", inputs="image", n_kv_heads=None,
                                 features="pooler", **dict(_QKVO, o_proj="out_proj")),
    # post-norm: LayerNorm(x + attention) and LayerNorm(x + FFN) inside each block; the FFN spans two modules
    "bert": Adapter("bert", layers="encoder.layer", attn="attention", mlp="intermediate",
                    resid_mid_norm="attention.output.LayerNorm", final_norm=None, up="dense", down="/output.dense",
                    mlp_layout="linear", act="intermediate_act_fn", inputs="text", n_kv_heads=None, softmax_fp32=False,
                    q_proj="self.query", k_proj="self.key", v_proj="self.value", o_proj="output.dense",
                    mlp_out="output.dense", post_norm=True, features="mean"),
}

# Config-dependent layouts of a family (same model_type, different FFN modules).
# DINOv2 with ``use_swiglu_ffn`` (the giant checkpoints) has a gated FFN with biases.
_DINOV2_SWIGLU = {family: replace(ADAPTERS[family], gate="gate_proj", up="up_proj", down="down_proj",
                                  mlp_layout="gated", act="act_fn") for family in ("dinov2", "dinov2_with_registers")}


class UnsupportedModelError(ValueError):
    pass


def adapter_for(model: nn.Module) -> Adapter:
    config = model.config
    family = getattr(config, "model_type", None)
    if family in _DINOV2_SWIGLU and getattr(config, "use_swiglu_ffn", False):
        return _DINOV2_SWIGLU[family]
    if family in ADAPTERS:
        return ADAPTERS[family]
    raise UnsupportedModelError(
        f"model family {family!r} is not in cardhouse's adapter table (known: {', '.join(sorted(ADAPTERS))}). "
        "Add one `Adapter(...)` entry to cardhouse/models/adapters.py naming its decoder layers, "
        "norms, attention and MLP projections."
    )


def _has(root: nn.Module, path: str | None) -> bool:
    try:
        return path is not None and get(root, path) is not None
    except AttributeError:
        return False


def get(root: nn.Module, path: str):
    """The module or tensor at ``path``; a tensor accelerate offloaded is returned from where it keeps it."""
    parent, _, last = path.rpartition(".")
    for name in filter(None, parent.split(".")):
        root = getattr(root, name)
    return home(root, last)


@dataclass
class Blocks:
    """An adapted model: its blocks and their parts, by layer index."""

    model: nn.Module
    adapter: Adapter

    @classmethod
    def of(cls, model: nn.Module) -> "Blocks":
        return cls(model, adapter_for(model))

    @property
    def layers(self) -> nn.ModuleList:
        return get(self.model, self.adapter.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < len(self):
            raise IndexError(f"layer {layer} is out of range: the model has layers 0..{len(self) - 1}")
        return layer

    def part(self, layer: int, name: str) -> nn.Module:
        block = self.layers[self.check_layer(layer)]
        return get(block, getattr(self.adapter, name))

    def ffn(self, layer: int) -> Adapter:
        """The FFN layout of ``layer``: the adapter's own, or its ``dense`` layout where the FFN has no router."""
        dense = self.adapter.dense
        return dense if dense is not None and not _has(self.part(layer, "mlp"), self.adapter.router) else self.adapter

    def _ffn(self, layer: int, expert: int | str | None = None) -> tuple[nn.Module, Adapter]:
        """(module, layout) of the FFN that ``expert`` names in ``layer`` (the shared expert is a dense FFN)."""
        mlp, layout = self.part(layer, "mlp"), self.ffn(layer)
        if expert == SHARED:
            if layout.shared_expert is None:
                raise ValueError(f"layer {layer} of this {self.adapter.family} model has no shared expert")
            return get(mlp, layout.shared_expert), layout.dense
        return mlp, layout

    def mlp_part(self, layer: int, name: str, expert: int | str | None = None):
        module, layout = self._ffn(layer, expert)
        path = getattr(layout, name)
        if path is None:
            kind = "an MoE" if layout.mlp_layout == "experts" else "a dense"
            raise ValueError(f"layer {layer}'s FFN has no {name} (it is {kind} FFN of the {layout.family} adapter "
                             "in cardhouse/models/adapters.py)")
        if path.startswith("/"):  # relative to the block: an FFN split over two modules (BERT)
            return get(self.layers[self.check_layer(layer)], path[1:])
        return get(module, path)

    def mlp_out(self, layer: int) -> nn.Module:
        """The module whose output is the FFN's output (before any residual add or post-norm)."""
        return self.part(layer, "mlp_out" if self.adapter.mlp_out else "mlp")

    @property
    def n_registers(self) -> int:
        return int(getattr(self.model.config, self.adapter.registers, 0)) if self.adapter.registers else 0

    def attn_part(self, layer: int, name: str) -> nn.Module:
        """``q_proj``, ``k_proj``, ``v_proj`` or ``o_proj`` of a layer's attention."""
        path = getattr(self.adapter, name)
        if path is None:
            raise UnsupportedModelError(f"the {self.adapter.family} adapter names no separate attention {name} "
                                        "(its projections are fused); see cardhouse/models/adapters.py")
        return get(self.part(layer, "attn"), path)

    @property
    def heads(self) -> tuple[int, int]:
        """(query heads, key/value heads): query head h reads key/value head h // (query heads / kv heads)."""
        config = self.model.config
        n_heads = getattr(config, self.adapter.n_heads)
        return n_heads, getattr(config, self.adapter.n_kv_heads) if self.adapter.n_kv_heads else n_heads

    @property
    def is_moe(self) -> bool:
        """Whether the family has Mixture-of-Experts layers (a mixed model may also have dense ones)."""
        return self.adapter.mlp_layout == "experts"

    def is_moe_layer(self, layer: int) -> bool:
        return self.ffn(layer).mlp_layout == "experts"

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(len(self)) if self.is_moe_layer(layer)]

    def n_experts(self, layer: int) -> int:
        """Routed experts of an MoE layer (0 for a dense layer)."""
        return self.mlp_part(layer, "down").shape[0] if self.is_moe_layer(layer) else 0

    @property
    def is_gated(self) -> bool:
        return self.adapter.mlp_layout in ("gated", "fused", "experts")

    def intermediate_size(self, layer: int, expert: int | str | None = None) -> int:
        """Number of FFN neurons (per expert for MoE): the last axis of W_down as ``[d_model, d_intermediate]``."""
        _, layout = self._ffn(layer, expert)
        if layout.mlp_layout == "experts":  # [expert, d_model, d_intermediate]: the same for every expert
            return self.mlp_part(layer, "down").shape[-1]
        with shapes_only():  # a shape: a block streamed from disk (on the meta device) has it too
            return self.down_weight(layer, expert).shape[-1]

    def down_weight(self, layer: int, expert: int | str | None = None) -> torch.Tensor:
        """W_down as ``[d_model, d_intermediate]`` (a view, whatever the storage layout)."""
        down = self.mlp_part(layer, "down", expert)
        layout = self._ffn(layer, expert)[1].mlp_layout
        if layout == "experts":
            return down[self._expert(layer, expert)]
        if layout == "conv1d":
            return home(down, "weight").T
        return home(down, "weight")

    def neuron_slices(self, layer: int, expert: int | str | None = None) -> list[tuple[torch.Tensor, int, int]]:
        """The tensors that hold the FFN's input-side neuron rows of one layer (of one expert for MoE).

        Each item is ``(tensor, axis, offset)``: neuron ``i`` is ``tensor.select(axis, offset + i)``.
        These are the 'massive weight' rows of W_up and W_gate (and fc_in's bias where present).
        """
        layout, n = self._ffn(layer, expert)[1].mlp_layout, self.intermediate_size(layer, expert)
        up = self.mlp_part(layer, "up", expert)
        if layout == "gated":
            gate = self.mlp_part(layer, "gate", expert)
            slices = [(home(gate, "weight"), 0, 0), (home(up, "weight"), 0, 0)]
            slices += [(home(m, "bias"), 0, 0) for m in (gate, up) if m.bias is not None]
            return slices
        if layout == "fused":
            slices = [(home(up, "weight"), 0, 0), (home(up, "weight"), 0, n)]
            return slices + ([(home(up, "bias"), 0, 0), (home(up, "bias"), 0, n)] if up.bias is not None else [])
        if layout == "conv1d":
            return [(home(up, "weight"), 1, 0), (home(up, "bias"), 0, 0)]
        if layout == "linear":
            return [(home(up, "weight"), 0, 0)] + ([(home(up, "bias"), 0, 0)] if up.bias is not None else [])
        if layout == "experts":
            fused = up[self._expert(layer, expert)]
            return [(fused, 0, 0), (fused, 0, n)]
        raise ValueError(f"unknown mlp layout {layout!r}")

    def _expert(self, layer: int, expert: int | str | None) -> int:
        """Check a routed expert index of an MoE layer."""
        if expert is None:
            raise ValueError(f"layer {layer} is a Mixture-of-Experts layer: name the expert")
        n = self.n_experts(layer)
        if not isinstance(expert, int) or not 0 <= expert < n:
            raise IndexError(f"expert {expert!r} is out of range: layer {layer} has experts 0..{n - 1}")
        return expert

    def check_expert(self, layer: int, expert: int | str | None) -> int | str | None:
        """``expert`` if it names an FFN of ``layer`` (None for a dense layer, an index or SHARED for MoE)."""
        if not self.is_moe_layer(layer):
            if expert is not None:
                raise ValueError(f"layer {layer} is a dense FFN layer: it has no expert {expert!r}")
            return None
        if expert == SHARED:
            self._ffn(layer, expert)  # raises where the layer has no shared expert
            return expert
        return self._expert(layer, expert)

    def intermediate(self, layer: int, mlp_input: torch.Tensor, expert: int | str | None = None) -> torch.Tensor:
        """act(W_gate x + b) * (W_up x + b) (or act(W_in x + b)): the input of W_down, from the MLP input.

        Used where no module boundary exposes that state (MoE experts stored as 3-D tensors).
        Computed the way the model's own forward computes it (biases included).
        """
        layout = self._ffn(layer, expert)[1].mlp_layout
        act = self.mlp_part(layer, "act", expert)
        up = self.mlp_part(layer, "up", expert)
        if layout == "gated":
            return act(self.mlp_part(layer, "gate", expert)(mlp_input)) * up(mlp_input)
        if layout == "fused":
            gate, up_states = up(mlp_input).chunk(2, dim=-1)
            return act(gate) * up_states
        if layout in ("conv1d", "linear"):
            return act(up(mlp_input))
        if layout == "experts":
            fused = up[self._expert(layer, expert)]  # [2 * d_intermediate, d_model]: rows [gate; up]
            gate, up_states = nn.functional.linear(mlp_input, fused.to(mlp_input.device, mlp_input.dtype)).chunk(2, dim=-1)
            return act(gate) * up_states
        raise ValueError(f"unknown mlp layout {layout!r}")

    def router_choice(self, layer: int, mlp_input: torch.Tensor) -> torch.Tensor:
        """The expert each token of an MoE layer gives the largest weight, as the model's own router
        (``(logits, weights, experts)``) chooses: ``[...]`` long tensor."""
        if not self.is_moe_layer(layer):
            raise ValueError(f"layer {layer} is a dense FFN layer: it has no router")
        router = self.mlp_part(layer, "router")
        with torch.no_grad():  # an index, never differentiated (and mlp_input may be an inference tensor)
            _, weights, experts = router(mlp_input.reshape(-1, mlp_input.shape[-1]).to(router.weight.dtype))[:3]
            return experts.gather(-1, weights.argmax(-1, keepdim=True)).reshape(mlp_input.shape[:-1])
