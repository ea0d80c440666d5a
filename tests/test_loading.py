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
    with pytest.raises(ModelLoadError, match="has no config.json"):  # was five lines about tokenizers
        load_model(str(tmp_path))


def test_folder_with_a_config_but_no_weights(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="could not load the model folder"):
        load_model(str(tmp_path))


def test_cached_sdist_is_only_reused_for_its_own_requirement(tmp_path):  # regression: any tar.gz was returned
    from cardhouse._install import pip_download_sdist

    for name in ["other-1.0.tar.gz", "llamafactory-0.9.4.tar.gz", "llamafactory-0.9.5.tar.gz"]:
        (tmp_path / name).write_text("")
    assert pip_download_sdist("llamafactory==0.9.5", tmp_path).name == "llamafactory-0.9.5.tar.gz"
    assert pip_download_sdist("other", tmp_path).name == "other-1.0.tar.gz"


@pytest.mark.parametrize("stream", [False, True])
def test_a_folder_under_home_given_with_a_tilde(tmp_path, monkeypatch, stream):
    """Regression: the config was read from the expanded path but the weights from '~/...' taken for a hub id.
    load_model now loads whatever the spec found."""
    from conftest import build, save_folder

    save_folder(build("llama"), tmp_path / "tiny")
    monkeypatch.setenv("HOME", str(tmp_path))
    lm = load_model("~/tiny", stream=stream)
    assert lm.family == "llama" and lm.name == "~/tiny"
