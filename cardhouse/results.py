"""One envelope for every result file cardhouse writes.

``{"tool": "cardhouse", "version", "command", "model", "settings", "results"}``: a script that
reads any of our JSON files finds who wrote it, with which settings, on which model, in the same
place. ``cardhouse/schemas/envelope.schema.json`` is the contract (tests validate every command's
output against it); a file kind may add its own schema for ``results``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from ._version import __version__
from ._files import write_json

SCHEMAS = Path(__file__).parent / "schemas"


def command_line() -> str | None:
    """The command as the user typed it; inside a command run otherwise (a test's ``CliRunner``), the
    command line that gives the same options; ``None`` when called from Python, not the CLI."""
    argv = sys.argv
    if argv and Path(argv[0]).name.startswith("cardhouse"):
        return shlex.join(["cardhouse", *argv[1:]])
    return _click_command()


def _click_command() -> str | None:
    try:  # typer >= 0.20 carries its own copy of click; older ones use click itself
        from typer._click import core as click
        from typer._click.globals import get_current_context
    except ImportError:
        import click
        from click import get_current_context

    ctx = get_current_context(silent=True)
    if ctx is None:
        return None
    words = ["cardhouse", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) != click.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if param.param_type_name == "argument":
            words += [str(v) for v in values]
        elif getattr(param, "is_flag", False):
            words.append(param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0])
        else:
            for v in values:
                words += [param.opts[0], str(v)]
    return shlex.join(words)


def envelope(results: Any, *, model: dict | list[dict] | None = None, settings: dict | None = None,
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
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def kinds() -> list[str]:
    """The file kinds that have a schema of their own (``defs`` holds the parts they share)."""
    return sorted(p.name.removesuffix(".schema.json") for p in SCHEMAS.glob("*.schema.json")
                  if p.name not in ("envelope.schema.json", "defs.schema.json"))


def validate(data: dict, name: str = "envelope") -> None:
    """Raise ``jsonschema.ValidationError`` if ``data`` breaks the envelope or the schema of kind ``name``."""
    import jsonschema
    from referencing import Registry, Resource

    schemas = [load_schema(p.name.removesuffix(".schema.json")) for p in SCHEMAS.glob("*.schema.json")]
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas)
    for schema in [load_schema("envelope")] + ([load_schema(name)] if name != "envelope" else []):
        jsonschema.Draft202012Validator(schema, registry=registry).validate(data)


def read_result(path: str | Path) -> dict:
    """A result file written by ``write_result`` (a clear error for anything else; the schemas are for tests,
    so reading needs no jsonschema)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("tool") != "cardhouse" or "results" not in data:
        raise ValueError(f"{path} is not a cardhouse result file (no envelope: tool, version, results)")
    return data
