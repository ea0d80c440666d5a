"""Tiny random models written as GGUF files the way llama.cpp's converter writes them (its tensor names,
the llama q/k row permutation, the config and tokenizer as metadata), so that
transformers loads them with ``gguf_file=`` like a downloaded GGUF. Written with the ``gguf`` package's
``GGUFWriter``; 2-D weights quantized with ``gguf.quants.quantize`` where the row length allows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# model_type -> llama.cpp architecture (its converter writes Mixtral as a llama with experts)
ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (convert_hf_to_gguf.py ``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(lm, path: Path, qtype: str = "F32", split_max_tensors: int = 0, float64: tuple[str, ...] = ()
               ) -> Path:
    """``lm`` (a tiny model of a family in ARCH) as a GGUF file; ``split_max_tensors``: write a split file
    (``path``'s stem + ``-00001-of-0000N.gguf``) and return its first part; ``float64``: GGUF names of
    tensors written as F64 (a type the gguf package cannot dequantize)."""
    import gguf
    from gguf.quants import quantize
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, Qwen2MoeTensorProcessor, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    config, arch = lm.model.config, ARCH[lm.family]
    writer = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if getattr(config, "moe_intermediate_size", None):  # Mixtral's experts are intermediate_size wide
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    vocab = sorted(lm.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    tokens = [t for t, _ in vocab] + [f"<extra_{i}>" for i in range(len(vocab), config.vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<") and t.endswith(">") and len(t) > 1 else 1 for t in tokens])
    writer.add_token_scores([0.0] * len(tokens))  # no merges: transformers derives them (none: one character each)
    writer.add_bos_token_id(lm.tokenizer.bos_token_id)
    writer.add_eos_token_id(lm.tokenizer.eos_token_id)
    writer.add_pad_token_id(lm.tokenizer.pad_token_id)
    writer.add_add_bos_token(True)

    # the names only: Qwen2-MoE's processor maps the fused gate_up_proj to ffn_gate_exps and ffn_up_exps
    processor = (Qwen2MoeTensorProcessor if experts else TENSOR_PROCESSORS.get(arch, TensorProcessor))(config={})
    names: dict[str, list[str]] = {}
    for g, hf in get_gguf_hf_weights_map(lm.model, processor, model_type=arch).items():
        names.setdefault(hf, []).append(g)
    state = lm.model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    quant = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[quant][0]
    tensors = []  # (llama.cpp name, array)
    for hf, tensor in state.items():
        if hf not in names or (tied and hf == "lm_head.weight"):
            continue
        w = tensor.detach().float().numpy().copy()
        if hf.endswith("experts.gate_up_proj"):  # transformers fuses [experts, gate | up, d_model]; llama.cpp does not
            gate, up = np.split(w, 2, axis=1)
            tensors += [(next(g for g in names[hf] if "gate" in g) + ".weight", gate),
                        (next(g for g in names[hf] if "_up_" in g) + ".weight", up)]
        elif hf.endswith("shared_expert_gate.weight"):  # llama.cpp keeps it 1-D, [d_model]
            tensors.append((names[hf][0], w.reshape(-1)))
        else:
            tensors.append((names[hf][0] + (".weight" if hf.endswith("experts.down_proj") else ""), w))
    for gguf_name, w in tensors:
        if arch == "llama" and ".attn_q." in gguf_name:
            w = _permute(w, config.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            w = _permute(w, config.num_key_value_heads)
        if gguf_name in float64:
            writer.add_tensor(gguf_name, w.astype(np.float64))
        elif quant != gguf.GGMLQuantizationType.F32 and w.ndim >= 2 and w.shape[-1] % block == 0:
            try:
                data = quantize(w, quant)
            except NotImplementedError:  # K-quants: the gguf package only dequantizes them
                data = _random_k_blocks(w.shape, quant, np.random.default_rng(len(gguf_name)))
            writer.add_tensor(gguf_name, data, raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name, w.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))[0]
    return path


def _random_k_blocks(shape: tuple[int, ...], quant, rng) -> np.ndarray:
    """Random Q4_K/Q5_K/Q6_K blocks (random packed values and sub-scales) with small, finite super-block
    scales (d and dmin, the first two float16 fields of Q4_K/Q5_K; d, the last one of Q6_K): weights
    that both loads must dequantize alike."""
    assert quant.name in ("Q4_K", "Q5_K", "Q6_K"), quant
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[quant]
    data = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    if quant == gguf.GGMLQuantizationType.Q6_K:
        data[..., -2:] = scale
    else:
        data[..., 0:2], data[..., 2:4] = scale, scale
    return data.reshape(*shape[:-1], -1)
