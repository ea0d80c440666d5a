"""The result envelope every result file shares, and its JSON Schema."""

import json

import jsonschema
import pytest

from cardhouse import __version__
from cardhouse.results import envelope, validate, write_result


def test_envelope_written_atomically_validates(tmp_path):
    path = tmp_path / "r.json"
    data = write_result(path, [{"variant": "original", "ppl": 1.0}], model={"name": "m"}, settings={"k": 2},
                        complete=True)
    on_disk = json.loads(path.read_text())
    assert on_disk == data
    assert on_disk["tool"] == "cardhouse" and on_disk["version"] == __version__
    assert on_disk["complete"] is True
    validate(on_disk)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("broken", [{"tool": "other"}, {"settings": []}, {"model": 3}])
def test_schema_refuses_broken_envelopes(broken):
    data = {**envelope({}, model=None), **broken}
    with pytest.raises(jsonschema.ValidationError):
        validate(data)


def test_missing_key_refused():
    data = envelope({})
    del data["results"]
    with pytest.raises(jsonschema.ValidationError):
        validate(data)
