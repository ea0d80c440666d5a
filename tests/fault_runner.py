"""Run the ``cardhouse`` command line in a subprocess that stops at a chosen point, so a test can interrupt it
there (SIGINT, kill -9) at a known moment instead of at a random one.

``CARDHOUSE_PAUSE=module:attribute:n`` wraps that function (``attribute`` may be ``Class.method``): its n-th
call touches ``CARDHOUSE_PAUSE_MARKER`` and sleeps, and the test then sends its signal. Usage:
``python tests/fault_runner.py scan -m FOLDER ...``.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time
from pathlib import Path


def install(spec: str, marker: Path) -> None:
    module_name, attribute, count = spec.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original, calls = getattr(owner, name), [0]

    @functools.wraps(original)
    def paused(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(count):
            marker.write_text("paused")
            time.sleep(120)  # the test interrupts us here
        return original(*args, **kwargs)

    setattr(owner, name, paused)


if __name__ == "__main__":
    if os.environ.get("CARDHOUSE_PAUSE"):
        install(os.environ["CARDHOUSE_PAUSE"], Path(os.environ["CARDHOUSE_PAUSE_MARKER"]))
    from cardhouse.cli import app

    app(sys.argv[1:], prog_name="cardhouse")
