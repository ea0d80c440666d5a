"""Shared fixtures: tiny random models of every family in the adapter table, built offline.

Every model is created from a config (no download), seeded, with hidden size 32, two
layers and a vocabulary of 300, so a whole test session stays within seconds on a CPU.
Text models share one character-level tokenizer (a ``tokenizers`` BPE without merges,
wrapped as a fast Hugging Face tokenizer with a BOS token) whose ~100 ids fit the vocab.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from cardhouse.models.loading import LoadedModel, from_pretrained_objects

# Tiny matrices: thread start-up and contention cost far more than they save (a tiny forward pass
# takes ~3 ms on one thread, ~300 ms with two threads on a busy 2-core machine).
torch.set_num_threads(int(os.environ.get("CARDHOUSE_TEST_THREADS", "1")))

D_MODEL = 32
D_MLP = 48  # != d_model (and != 2 * d_model) so that transposition mistakes show up as shape errors
MOE_D_MLP = 24  # Qwen2-MoE expert size (moe_intermediate_size)
N_LAYERS = 2
VOCAB = 300
CONTEXT = 128  # the built-in prompts are at most ~90 characters
N_EXPERTS = 4

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]  # ids 0..3
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

TEXT_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2",
                 "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
VISION_FAMILIES = ["dinov2"]
ALL_FAMILIES = TEXT_FAMILIES + VISION_FAMILIES  # the adapter table's keys
VARIANTS = ["dinov2_swiglu"]  # same model_type, another FFN layout (DINOv2-giant's SwiGLU)
ALL_MODELS = ALL_FAMILIES + VARIANTS
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
SANDWICH_FAMILIES = ["gemma2", "gemma3_text"]
# encoders: image models beside DINOv2, and BERT (bidirectional attention, post-norm blocks)
VISION_FAMILIES += ["dinov2_with_registers", "vit", "clip_vision_model"]
ENCODER_TEXT_FAMILIES = ["bert"]
ALL_FAMILIES = TEXT_FAMILIES + VISION_FAMILIES + ENCODER_TEXT_FAMILIES  # the adapter table's keys
ALL_MODELS = ALL_FAMILIES + VARIANTS
N_REGISTERS = 2  # register tokens of the tiny DINOv2 with registers

# the FFN width each family's tiny model is built with (per expert for MoE)
VISION_MLP_RATIO = 3  # DINOv2 takes an integer ratio: d_mlp = 96
EXPECTED_D_MLP = {family: D_MLP for family in ALL_FAMILIES} | {"qwen2_moe": MOE_D_MLP, "qwen3_moe": MOE_D_MLP,
                                                                "deepseek_v2": MOE_D_MLP, "deepseek_v3": MOE_D_MLP,
                                                                "dinov2": VISION_MLP_RATIO * D_MODEL}
EXPECTED_D_MLP["dinov2_with_registers"] = VISION_MLP_RATIO * D_MODEL


def d_mlp(lm: LoadedModel) -> int:
    """The FFN width the tiny model was built with (per expert for MoE)."""
    if getattr(lm.model.config, "use_swiglu_ffn", False):  # DINOv2 keeps 2/3 of it, rounded up to 8
        return (int(VISION_MLP_RATIO * D_MODEL * 2 / 3) + 7) // 8 * 8
    return EXPECTED_D_MLP[lm.family]


def text_config(family: str, **overrides):
    from transformers import AutoConfig

    ids = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if family == "gpt2":
        kwargs = dict(vocab_size=VOCAB, n_embd=D_MODEL, n_inner=D_MLP, n_layer=N_LAYERS, n_head=4,
                      n_positions=CONTEXT, **ids)
    else:
        kwargs = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, **ids)
        if family in ("qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text"):
            kwargs["head_dim"] = 8  # their defaults (128, 256) would dwarf the model
        if family == "mixtral":
            kwargs.update(num_local_experts=N_EXPERTS, num_experts_per_tok=2)
        if family == "qwen2_moe":
            kwargs.update(num_experts=N_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=MOE_D_MLP,
                          shared_expert_intermediate_size=D_MLP)
        if family == "qwen3_moe":
            kwargs.update(num_experts=N_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=MOE_D_MLP,
                          norm_topk_prob=True)
        if family == "olmoe":
            kwargs.update(num_experts=N_EXPERTS, num_experts_per_tok=2)
        if family in ("deepseek_v2", "deepseek_v3"):  # two groups of experts, the best one used; one shared
            kwargs.update(n_routed_experts=N_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=MOE_D_MLP,
                          n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=None,
                          kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                          num_key_value_heads=4)  # expert, multi-head latent attention
        if family == "deepseek_v2":
            kwargs.update(topk_method="group_limited_greedy")
    return AutoConfig.for_model(family, **kwargs | overrides)


def build_text_model(family: str, seed: int = 0, n_layers: int = N_LAYERS):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    layers = {"n_layer" if family == "gpt2" else "num_hidden_layers": n_layers}
    model = AutoModelForCausalLM.from_config(text_config(family, **layers))
    assert model.config.model_type == family
    return model.eval()


def build_vision_model(seed: int = 0, swiglu: bool = False, n_layers: int = N_LAYERS,
                       family: str = "dinov2"):
    from transformers import AutoConfig, AutoModel

    if family.startswith("dinov2"):
        kwargs = dict(mlp_ratio=VISION_MLP_RATIO, use_swiglu_ffn=swiglu,
                      layerscale_value=0.5)  # != 1 so that a forgotten layer scale shows
        if family == "dinov2_with_registers":
            kwargs["num_register_tokens"] = N_REGISTERS
    else:
        kwargs = dict(intermediate_size=D_MLP)
    config = AutoConfig.for_model(family, hidden_size=D_MODEL, num_hidden_layers=n_layers, num_attention_heads=4,
                                  image_size=28, patch_size=14, **kwargs)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config).eval()
    assert model.config.model_type == family
    return model


def build_encoder_tokenizer():
    """Character-level fast tokenizer with BERT's special tokens: [CLS] text [SEP]."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {token: i for i, token in enumerate(specials + [chr(i) for i in range(32, 127)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                               ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def build_encoder_model(seed: int = 0):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
                        num_attention_heads=4, max_position_embeddings=CONTEXT)
    torch.manual_seed(seed)
    return BertModel(config).eval()


def build_tokenizer():
    """Character-level fast tokenizer: 4 special tokens then printable ASCII and newline (~100 ids)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    assert len(vocab) < VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))  # no merges: one token per character
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK)


def build(family: str, tokenizer=None, seed: int = 0, n_layers: int = N_LAYERS) -> LoadedModel:
    """A fresh tiny LoadedModel of ``family`` or of a variant (image models: no processor, feed them
    ``pixel_values``; BERT: its own [CLS]/[SEP] tokenizer)."""
    if family in VISION_FAMILIES + VARIANTS:
        model = build_vision_model(seed, swiglu=family == "dinov2_swiglu", n_layers=n_layers,
                                   family="dinov2" if family == "dinov2_swiglu" else family)
        return from_pretrained_objects(model, None, name=f"tiny-{family}", bos=False)
    if family in ENCODER_TEXT_FAMILIES:
        return from_pretrained_objects(build_encoder_model(seed), build_encoder_tokenizer(), name=f"tiny-{family}",
                                       bos=False)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    model = build_text_model(family, seed, n_layers)
    return from_pretrained_objects(model, tokenizer, name=f"tiny-{family}", bos=True)


def sample_inputs(lm: LoadedModel, seed: int = 0) -> dict:
    """Model inputs for a forward pass of the model *body*: two right-padded prompts or two images."""
    if lm.family in VISION_FAMILIES:
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(2, 3, 28, 28, generator=g)}
    texts = ["The quick brown fox jumps over the lazy dog.", "Summer is warm."]
    if lm.family in ENCODER_TEXT_FAMILIES:
        lists = [lm.tokenizer(t)["input_ids"] for t in texts]
    else:
        lists = [lm.encode(t) for t in texts]
    width = max(map(len, lists))
    ids = torch.full((len(lists), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(lists):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask, **({} if lm.family in ENCODER_TEXT_FAMILIES else {"use_cache": False})}


def forward(lm: LoadedModel, inputs: dict) -> torch.Tensor:
    """The body's last hidden state (what the analyses run: no LM head)."""
    with torch.inference_mode():
        return lm.model.base_model(**inputs).last_hidden_state


def save_folder(lm: LoadedModel, path):
    """Save a tiny model and its tokenizer as a Hugging Face folder (what the commands load with --model)."""
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def all_params_digest(lm: LoadedModel) -> str:
    from cardhouse.interventions import weights_digest

    return weights_digest([p for _, p in sorted(lm.model.named_parameters())])


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny(tokenizer):
    """Factory ``tiny(family)``: one shared tiny model per family for the session.

    Tests must leave it as they found it (the interventions restore weights; the digest
    tests check that). Tests that edit weights for good use ``build(family)`` instead.
    """
    cache: dict[str, LoadedModel] = {}

    def get(family: str) -> LoadedModel:
        if family not in cache:
            cache[family] = build(family, tokenizer)
        return cache[family]

    return get


@pytest.fixture(params=ALL_MODELS)
def family(request) -> str:
    return request.param


@pytest.fixture(params=TEXT_FAMILIES)
def text_family(request) -> str:
    return request.param


@pytest.fixture
def lm(tiny, family) -> LoadedModel:
    return tiny(family)


@pytest.fixture
def text_lm(tiny, text_family) -> LoadedModel:
    return tiny(text_family)


# ---- planting known massive activations and weights ------------------------------------------------


def plant_bos_embedding(lm: LoadedModel, dim: int = 11, value: float = 1e4) -> int:
    """Make the BOS token's embedding huge in one dimension: a massive activation on BOS in every layer."""
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[BOS_ID, dim] = value
    return dim


def bos_mlp_input(lm: LoadedModel, layer: int) -> torch.Tensor:
    """The MLP input of ``layer`` at position 0 (BOS): the same in every prompt under causal attention."""
    from cardhouse.capture import hook_name, record

    name = hook_name(layer, "mlp.hook_in")
    with record(lm.model, [name]) as store:
        forward(lm, {"input_ids": torch.tensor([[BOS_ID]]), "use_cache": False})
    return store[name][0, 0].clone()  # cloned outside inference mode: a normal tensor


def plant_neuron(lm: LoadedModel, direction: torch.Tensor, *, layer: int, neuron: int, dim: int, scale: float,
                 down: float) -> None:
    """FFN neuron ``neuron`` of ``layer`` reads ``direction`` of the MLP input and writes into hidden ``dim``:
    its W_gate and W_up rows (fc_in row for non-gated MLPs, in every expert for MoE) become ``scale`` x
    ``direction``, its bias 0, and W_down[dim, neuron] = ``down``."""
    blocks = lm.blocks
    with torch.no_grad():
        for expert in range(N_EXPERTS) if blocks.is_moe else [None]:
            for tensor, axis, offset in blocks.neuron_slices(layer, expert):
                row = tensor.select(axis, offset + neuron)
                row.copy_(scale * direction if row.dim() == 1 else torch.zeros(()))
            blocks.down_weight(layer, expert)[dim, neuron] = down


def plant_massive_weight(lm: LoadedModel, layer: int = 0, neuron: int = 5, dim: int = 7, scale: float = 6.0,
                         down: float = 100.0) -> dict:
    """Make FFN neuron ``neuron`` of ``layer`` fire hugely on BOS and write it into hidden ``dim``.

    ``plant_neuron`` along the unit direction of BOS's MLP input.
    Sandwich-norm models renormalize the FFN output, so their post-FFN norm is scaled up at ``dim``.
    """
    blocks = lm.blocks
    x0 = bos_mlp_input(lm, layer)
    direction = x0 / x0.norm()
    plant_neuron(lm, direction, layer=layer, neuron=neuron, dim=dim, scale=scale, down=down)
    with torch.no_grad():
        if lm.family in SANDWICH_FAMILIES:  # Gemma norms multiply by (1 + weight)
            blocks.layers[layer].post_feedforward_layernorm.weight[dim] = 999.0
    expert = int(blocks.router_choice(layer, x0)) if blocks.is_moe else None
    return {"down": down, "bos_expert": expert, "direction": direction}
