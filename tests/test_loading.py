import pytest

from cardhouse.models import load_model
from cardhouse.models.loading import ModelLoadError


def test_unknown_name_lists_the_bundled_models():
    with pytest.raises(ModelLoadError, match="smollm2-135m, gemma3-270m"):
        load_model("no-such-model-anywhere")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(bad))


def test_folder_without_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load the model folder"):
        load_model(str(tmp_path))
