"""Writing files so that an interruption never leaves a half-written one behind.

A writer writes a hidden temporary beside the target (``.<name>.<pid>.tmp``) and renames it into
place. A process killed with kill -9 never reaches its cleanup, so the next write into that folder
sweeps the temporaries whose writer's pid is no longer alive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")


def temporary(path: Path) -> Path:
    """The hidden name this process writes ``path`` under before renaming it into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (outside POSIX, assumed: nothing is swept there)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate it on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale(folder: Path) -> list[Path]:
    """Remove the temporary files and folders in ``folder`` whose writer is gone; a live writer's are kept.
    Returns what was removed."""
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet: nothing to sweep
        return []
    removed = []
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or alive(int(match["pid"])):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed.append(Path(entry.path))
    return removed


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` a temporary file beside ``path``, then rename it into place (or remove it on error)."""
    sweep_stale(path.parent)
    tmp = temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(data, path: Path) -> None:
    """``data`` as indented JSON (numpy and torch scalars as floats), written atomically."""
    write_atomically(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=float)))
