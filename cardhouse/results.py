"""One envelope for every result file cardhouse writes.

``{"tool": "cardhouse", "version", "command", "model", "settings", "results"}``: a script that
reads any of our JSON files finds who wrote it, with which settings, on which model, in the same
place. ``cardhouse/schemas/envelope.schema.json`` is the contract (tests validate every command's
output against it); a file kind may add its own schema for ``results``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from . import __version__
from ._files import write_json

SCHEMAS = Path(__file__).parent / "schemas"


def command_line() -> str | None:
    """The command as the user typed it (``None`` when called from Python, not the CLI)."""
    argv = sys.argv
    if not argv or not Path(argv[0]).name.startswith("cardhouse"):
        return None
    return shlex.join(["cardhouse", *argv[1:]])


def envelope(results: Any, *, model: dict | str | None = None, settings: dict | None = None,
             command: str | None = None, **extra: Any) -> dict:
    """The result envelope; ``extra`` keys (e.g. ``complete``, ``plots``) sit beside ``results``."""
    return {"tool": "cardhouse", "version": __version__, "command": command or command_line(),
            "model": model, "settings": settings or {}, "results": results, **extra}


def write_result(path: Path, results: Any, **kwargs: Any) -> dict:
    """Write ``envelope(results, **kwargs)`` atomically to ``path`` and return it."""
    data = envelope(results, **kwargs)
    write_json(data, path)
    return data


def load_schema(name: str = "envelope") -> dict:
    import json

    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def validate(data: dict, name: str = "envelope") -> None:
    """Raise ``jsonschema.ValidationError`` if ``data`` breaks the schema ``name``."""
    import jsonschema

    jsonschema.validate(data, load_schema(name))
