"""Fix 3 of issue 14: bytes corrupted in place in the cached dequantized model were used silently (zero a
span of model.safetensors, same size, and the scan reported other massive weights). The cache is now
sealed with the sha256 of every file when it is written and checked on load; a mismatch, a truncated
file, a missing file or an old unsealed cache is rebuilt from the GGUF file, with a warning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import build

from cardhouse._files import temporary
from cardhouse.models import loading
from cardhouse.models.integrity import broken


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file whose 'dequantization' builds the tiny llama (and counts how often it runs)."""
    monkeypatch.setenv("CARDHOUSE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    real = loading._load_auto
    calls = []

    def load_auto(where, dtype, *args, **kwargs):
        if "gguf_file" in kwargs:
            calls.append(kwargs["gguf_file"])
            lm = build("llama")
            return lm.model, lm.tokenizer
        return real(where, dtype, *args, **kwargs)  # the cache folder: the real loader

    monkeypatch.setattr(loading, "_load_auto", load_auto)
    return path, calls


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cache_is_sealed_and_reused(gguf):
    gguf, calls = gguf
    model, _ = loading.load_gguf(gguf)
    folder = loading.gguf_cache_folder(gguf)
    assert broken(folder) is None and len(calls) == 1
    again, _ = loading.load_gguf(gguf)
    assert len(calls) == 1 and _same(_state(model), _state(again))


def _zero_span(path):
    data = bytearray(path.read_bytes())
    data[-200:-100] = bytes(100)  # inside the last tensor's data: same size, other numbers
    path.write_bytes(bytes(data))


def _flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) - 50] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-1000])


def _old_marker(folder):
    (folder / "COMPLETE").write_text("ok")  # what cardhouse wrote before it kept checksums


@pytest.mark.parametrize("damage, file, why", [
    (_zero_span, "model.safetensors", "checksum of model.safetensors does not match"),
    (_flip_bit, "model.safetensors", "checksum of model.safetensors does not match"),
    (_truncate, "model.safetensors", "bytes, not the"),
    (_flip_bit, "tokenizer.json", "checksum of tokenizer.json"),
    (lambda path: path.unlink(), "config.json", "config.json is missing"),
    (lambda path: _old_marker(path.parent), "model.safetensors", "no checksums"),
])
def test_a_damaged_cache_is_rebuilt_with_a_warning(gguf, damage, file, why):
    gguf, calls = gguf
    original = _state(loading.load_gguf(gguf)[0])
    folder = loading.gguf_cache_folder(gguf)
    damage(folder / file)
    assert why in broken(folder)
    with pytest.warns(UserWarning, match=why):
        model, _ = loading.load_gguf(gguf)
    assert len(calls) == 2  # dequantized again
    assert _same(_state(model), original)  # the damaged numbers were not used
    assert broken(folder) is None  # and the new copy is sealed


def test_a_zeroed_span_is_caught_although_safetensors_reads_it(gguf):
    """The issue's reproduction: the zeroed span leaves a file safetensors loads without complaint."""
    gguf, _ = gguf
    from safetensors.torch import load_file

    loading.load_gguf(gguf)
    folder = loading.gguf_cache_folder(gguf)
    _zero_span(folder / "model.safetensors")
    load_file(folder / "model.safetensors")  # readable: only the checksum can tell
    assert "checksum" in broken(folder)


def test_a_killed_dequantization_leaves_no_folder_behind(gguf, monkeypatch):
    # regression: a process killed with kill -9 while it wrote the cache left its hidden temporary folder (a
    # model's size on disk) for good; the next cache write into the folder now sweeps it
    gguf, calls = gguf
    folder = loading.gguf_cache_folder(gguf)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: int(gone.stdout))
        stale = temporary(folder)  # the name that process wrote under
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(bytes(1000))  # cut off mid-write
    loading.load_gguf(gguf)
    assert not stale.exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    assert broken(folder) is None and len(calls) == 1
