"""Writing result files: an error while writing leaves the previous file as it was, and a writer killed
mid-write leaves a temporary that the next write into the folder removes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cardhouse._files import sweep_stale, temporary, write_json


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


# A writer that stops half-way through its temporary file (the test kills it there with kill -9). It loads
# cardhouse/_files.py by path: the package's import (torch) is not needed to write a file.
WRITER = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("_files", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)

def write(tmp):
    tmp.write_text('{"step": ')
    Path(sys.argv[3]).touch()
    time.sleep(600)

files.write_atomically(Path(sys.argv[2]), write)
"""


def test_a_temporary_left_by_a_killed_writer_is_swept_by_the_next_write(tmp_path):
    # regression: kill -9 during an atomic write left a hidden .<name>.<pid>.tmp behind for good
    import cardhouse._files

    folder, marker = tmp_path / "out", tmp_path / "writing"
    folder.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, cardhouse._files.__file__, str(folder / "results.json"),
                               str(marker)])
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start writing"
        time.sleep(0.05)
    writer.kill()  # SIGKILL: no finally clause runs
    writer.wait()
    assert [p.name for p in folder.iterdir()] == [f".results.json.{writer.pid}.tmp"]
    live = folder / f".other.json.{os.getpid()}.tmp"  # a writer that is still running (this process)
    live.write_text("in progress")
    write_json({"ok": True}, folder / "summary.json")  # the next write into the folder
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, "summary.json"])


def test_sweep_stale_removes_only_temporaries_of_gone_processes(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = int(gone.stdout)
    (tmp_path / f".a.json.{dead}.tmp").write_text("half")
    (tmp_path / f".cache-folder.{dead}.tmp").mkdir()  # the model cache writes a folder
    (tmp_path / f".cache-folder.{dead}.tmp" / "model.safetensors").write_bytes(bytes(10))
    kept = [f".b.json.{os.getpid()}.tmp", ".c.json.tmp", f"d.json.{dead}.tmp", "e.json"]  # live, or not ours
    for name in kept:
        (tmp_path / name).write_text("x")
    removed = sweep_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".a.json.{dead}.tmp", f".cache-folder.{dead}.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert temporary(tmp_path / "f.json").name == f".f.json.{os.getpid()}.tmp"
    assert sweep_stale(tmp_path / "missing") == []
