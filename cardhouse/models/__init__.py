from .adapters import ADAPTERS, Adapter, Blocks, UnsupportedModelError, adapter_for
from .loading import (BUNDLED, DEFAULT_MODEL, LoadedModel, ModelLoadError, available_models,
                      from_pretrained_objects, load_gguf, load_model)
