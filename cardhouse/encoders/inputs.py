"""Inputs of encoders, shaped for the scan (``capture.inputs.Inputs``): images through the model's image
processor, sentences through its tokenizer with [CLS] and [SEP].

Token roles: ``cls``, ``register`` (DINOv2 with registers), ``patch`` (its grid position is in the
token's text: ``patch (row, col)``), ``sep``, ``punctuation`` and ``other``. Under bidirectional
attention no position sees only itself, so CLS is not the same in every input by construction
(unlike a decoder's position 0): its spread across inputs is a measurement.
"""

from __future__ import annotations

import inspect
import string
from typing import Iterator, Sequence

import torch

from ..analysis.prompts import load_prompts
from ..capture.batches import PromptBatch, batches
from ..capture.run import max_context
from ..models.loading import LoadedModel
from ..models.onnx_dinov2 import IMAGENET_MEAN, IMAGENET_STD, bit_image_processor
from .images import Photo, load_images

CLS, REGISTER, PATCH, SEP, PUNCTUATION, OTHER = "cls", "register", "patch", "sep", "punctuation", "other"
ENCODER_ROLES = (CLS, REGISTER, PATCH, SEP, PUNCTUATION, OTHER)


def _wrong_kind(lm: LoadedModel, wanted: str) -> ValueError:
    reads = {"image": "images", "text": "sentences", "causal": "text prompts (a decoder LM: use `cardhouse scan`)"}
    return ValueError(f"{lm.name} reads {reads[lm.inputs]}, not {wanted}")


def default_processor(config):
    """An image processor for a model folder that ships none: resize and centre-crop to the model's
    image size, ImageNet mean and std (DINOv2's evaluation transform at 224 is ``onnx_dinov2.dinov2_processor``)."""
    side = int(config.image_size)
    return bit_image_processor()(size={"shortest_edge": side * 8 // 7}, resample=3, crop_size={"height": side, "width": side},
                             image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True)


class ImageInputs:
    """Images as the model sees them: ``pixel_values`` and, per image, CLS, registers and the patch grid."""

    role_names = ENCODER_ROLES

    def __init__(self, lm: LoadedModel, photos: Sequence[Photo], processor=None):
        if lm.inputs != "image":
            raise _wrong_kind(lm, "images")
        if not photos:
            raise ValueError("no images given")
        config = lm.model.config
        self.lm, self.photos, self.patch = lm, list(photos), int(config.patch_size)
        small = [f"{p.name} ({p.size[0]}x{p.size[1]})" for p in self.photos if min(p.size) < self.patch]
        if small:
            raise ValueError(f"image smaller than one {self.patch}x{self.patch} patch of {lm.name}: {', '.join(small)}")
        self.processor = processor or lm.tokenizer or default_processor(config)
        self.pixel_values = self.processor(images=[p.image for p in self.photos], return_tensors="pt")["pixel_values"]
        height, width = self.pixel_values.shape[-2:]
        self.grid = (height // self.patch, width // self.patch)
        self.prefix = 1 + lm.blocks.n_registers  # CLS, then the registers, then the patches row by row
        self.positions = self.prefix + self.grid[0] * self.grid[1]
        roles = [CLS] + [REGISTER] * (self.prefix - 1) + [PATCH] * (self.positions - self.prefix)
        self.role_lists = [roles] * len(self.photos)
        self.extra = {}
        forward = inspect.signature(lm.model.base_model.forward).parameters
        if "interpolate_pos_encoding" in forward and height != getattr(config, "image_size", height):
            self.extra["interpolate_pos_encoding"] = True  # ViT and CLIP take other sizes only when asked

    def __len__(self) -> int:
        return len(self.photos)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.photos]

    @property
    def tokens(self) -> int:
        return self.positions * len(self.photos)

    def grid_position(self, position: int) -> tuple[int, int] | None:
        """(row, col) of a patch token, None for CLS and registers."""
        return divmod(position - self.prefix, self.grid[1]) if position >= self.prefix else None

    def token_at(self, index: int, position: int) -> str:
        return self.token_text(position)

    def token_text(self, position: int) -> str:
        if position == 0:
            return "CLS"
        if position < self.prefix:
            return f"register {position}"
        row, col = self.grid_position(position)
        return f"patch ({row}, {col})"

    def batches(self, batch_size: int) -> Iterator[PromptBatch]:
        for start in range(0, len(self.photos), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(self.photos)))
            ids = torch.arange(self.positions).expand(len(rows), -1).clone()  # positions name the tokens
            yield PromptBatch(ids, torch.ones_like(ids), rows, pixel_values=self.pixel_values[rows],
                              extra=dict(self.extra))


def is_punctuation(text: str) -> bool:
    text = text.strip()
    return bool(text) and all(c in string.punctuation for c in text)


class SentenceInputs:
    """Sentences as a bidirectional encoder reads them: [CLS] tokens [SEP], right-padded batches."""

    role_names = ENCODER_ROLES

    def __init__(self, lm: LoadedModel, sentences: Sequence[str], *, truncate: bool = False):
        if lm.inputs != "text":
            raise _wrong_kind(lm, "sentences")
        if not sentences:
            raise ValueError("no sentences given")
        tok = lm.tokenizer
        self.lm, self.sentences, limit = lm, list(sentences), max_context(lm)
        self.token_lists = []
        for i, sentence in enumerate(self.sentences):
            if not sentence.strip():
                raise ValueError(f"sentence {i} is empty")
            ids = list(tok(sentence, add_special_tokens=True, truncation=truncate and bool(limit),
                           max_length=limit if truncate else None)["input_ids"])
            if limit and len(ids) > limit:
                raise ValueError(f"sentence {i} has {len(ids)} tokens, more than the model's context of {limit}")
            self.token_lists.append(ids)
        special = {tok.cls_token_id: CLS, tok.sep_token_id: SEP}
        self.role_lists = [[special.get(t) or (PUNCTUATION if is_punctuation(self.token_text(t)) else OTHER)
                            for t in ids] for ids in self.token_lists]

    def __len__(self) -> int:
        return len(self.sentences)

    @property
    def names(self) -> list[str]:
        return self.sentences

    @property
    def tokens(self) -> int:
        return sum(map(len, self.token_lists))

    def token_text(self, token_id: int) -> str:
        return self.lm.tokenizer.decode([token_id])

    def token_at(self, index: int, position: int) -> str:
        return self.token_text(self.token_lists[index][position])

    def batches(self, batch_size: int) -> Iterator[PromptBatch]:
        pad = self.lm.tokenizer.pad_token_id or 0
        for batch in batches(self.token_lists, batch_size):
            ids = batch.input_ids.masked_fill(batch.attention_mask == 0, pad)
            yield PromptBatch(ids, batch.attention_mask, batch.prompt_index, extra={})


def encoder_inputs(lm: LoadedModel, images: str | None = None, sentences: str | None = None, *,
                   limit: int | None = None):
    """``ImageInputs`` from ``images`` (``builtin``, a folder or a file) or ``SentenceInputs`` from
    ``sentences`` (``builtin``, a text file or ``corpus:NAME``), checked against what the model reads."""
    if (images is None) == (sentences is None):
        raise ValueError("give either images or sentences")
    if images is not None:
        if lm.inputs != "image":
            raise _wrong_kind(lm, "images")
        return ImageInputs(lm, load_images(images, limit=limit))
    if lm.inputs != "text":
        raise _wrong_kind(lm, "sentences")
    return SentenceInputs(lm, load_prompts(sentences, limit=limit))
