"""The cardhouse lm-eval backend on a model dispatched by accelerate (some blocks on the CPU, the rest
offloaded to disk) scores what it scores on the ordinary load of the same checkpoint; a streamed model
(``--stream``) is refused with the alternative named."""

from __future__ import annotations

import pytest
import torch

from test_lm_backend import TASKS, assert_same, backends, build_instances, long_lm
from test_placement import split_map

from cardhouse.evaluation import ZeroShot
from cardhouse.models import load_model

DISPATCH_TOLERANCE = 1e-5  # nats per request: the same float32 arithmetic, only where the weights live


@pytest.fixture(scope="module")
def instances():
    return build_instances(TASKS, limit=2)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2_moe"])
def test_a_model_offloaded_to_cpu_and_disk_gives_the_ordinary_loads_loglikelihoods(family, tmp_path, instances):
    lm = long_lm(family)
    lm.model.save_pretrained(tmp_path / "ckpt")
    lm.tokenizer.save_pretrained(tmp_path / "ckpt")
    ordinary = load_model(str(tmp_path / "ckpt"), bos=True)
    dispatched = load_model(str(tmp_path / "ckpt"), bos=True, device_map=split_map(ordinary),
                            offload_folder=tmp_path / "off")
    assert set(dispatched.model.hf_device_map.values()) == {"cpu", "disk"}
    hflm, expected = backends(ordinary)
    _, ours = backends(dispatched)
    for task in TASKS:
        requests = instances[task]
        reference = expected.loglikelihood(requests, disable_tqdm=True)
        got = ours.loglikelihood(requests, disable_tqdm=True)
        assert_same(requests, reference, got, tolerance=DISPATCH_TOLERANCE)
        assert_same(requests, hflm.loglikelihood(requests, disable_tqdm=True), got)


def test_zero_shot_of_a_dispatched_model_equals_the_ordinary_load(tmp_path):
    lm = long_lm("llama")
    lm.model.save_pretrained(tmp_path / "ckpt")
    lm.tokenizer.save_pretrained(tmp_path / "ckpt")
    ordinary = load_model(str(tmp_path / "ckpt"), bos=True)
    dispatched = load_model(str(tmp_path / "ckpt"), bos=True, device_map=split_map(ordinary),
                            offload_folder=tmp_path / "off")
    tasks = ["arc_easy", "piqa"]
    expected = ZeroShot(ordinary.model, ordinary.tokenizer, tasks, limit=4)()
    got = ZeroShot(dispatched.model, dispatched.tokenizer, tasks, limit=4)()
    for task in tasks:
        assert got[task] == expected[task]


def test_a_streamed_model_is_refused_with_the_alternative_named(tmp_path):
    from cardhouse.evaluation.lm_backend import CardhouseLM
    from cardhouse.models.streaming import stream_skeleton

    lm = long_lm("llama")
    lm.model.save_pretrained(tmp_path / "ckpt")
    streamer = stream_skeleton(tmp_path / "ckpt", torch.float32)
    with pytest.raises(ValueError, match="streamed.*device_map"):
        CardhouseLM(pretrained=streamer.model, tokenizer=lm.tokenizer, batch_size=4)
    with pytest.raises(ValueError, match="streamed.*device_map"):
        ZeroShot(streamer.model, lm.tokenizer, ["arc_easy"], limit=1)
