"""Encoders (vision transformers, BERT-style sentence encoders): their inputs and the analyses on them."""

from .images import BUILTIN, Photo, augmented, builtin_photos, load_images
from .inputs import ENCODER_ROLES, ImageInputs, SentenceInputs, encoder_inputs
