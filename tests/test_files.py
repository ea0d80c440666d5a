"""Writing result files: an error while writing leaves the previous file as it was."""

from __future__ import annotations

import json

import pytest

from cardhouse._files import write_json


def test_write_json_writes_numbers_as_floats(tmp_path):
    import numpy as np

    write_json({"ratio": np.float32(2.5), "rows": [1, 2]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"ratio": 2.5, "rows": [1, 2]}


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "emergence.json"
    write_json({"step": 100}, path)
    with pytest.raises(TypeError):
        write_json({"step": 200, "model": object()}, path)  # not serializable: fails half-way
    assert json.loads(path.read_text()) == {"step": 100}
    assert [p.name for p in tmp_path.iterdir()] == ["emergence.json"]
