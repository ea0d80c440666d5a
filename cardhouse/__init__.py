"""cardhouse: find, explain, attack and protect the massive activations and massive weights of transformers."""

from ._version import __version__  # noqa: F401

from .analysis import (Criterion, MassiveWeights, MoEAnalysis, ScanResult, analyze_moe, find_massive_weights,
                       load_prompts, scan)
from .models import ADAPTERS, LoadedModel, available_models, from_pretrained_objects, load_model
