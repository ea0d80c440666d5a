"""Writing files so that an interruption never leaves a half-written one behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` a temporary file beside ``path``, then rename it into place (or remove it on error)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(data, path: Path) -> None:
    """``data`` as indented JSON (numpy and torch scalars as floats), written atomically."""
    write_atomically(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=float)))
