"""What every command shares: the app, common options, clear errors and safe output files."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from .._install import InstallError
from ..models.adapters import UnsupportedModelError
from ..models.loading import BUNDLED, DEFAULT_MODEL, ModelLoadError

app = typer.Typer(help="Find, explain, attack and protect the massive activations and massive weights "
                       "of transformer models.", no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=False)
err = Console(stderr=True)

ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m",
                        help=f"bundled name ({', '.join(BUNDLED)}), local HF folder, GGUF file or hub id")
PromptsOpt = typer.Option("builtin", "--prompts", "-p",
                          help="'builtin' (real sentences), a text file (one prompt per line) or corpus:NAME")
BosOpt = typer.Option(None, "--bos/--no-bos", help="put the BOS token first (default: if the tokenizer has one)")
OutOpt = typer.Option(Path("cardhouse-out"), "--out", "-o", help="folder for the JSON and PNG outputs")


@contextmanager
def clear_errors():
    """Known failures end with one clear line and exit code 1, not a traceback."""
    try:
        yield
    except (ValueError, IndexError, FileNotFoundError, ModelLoadError, UnsupportedModelError, InstallError,
            PermissionError, OSError) as e:
        err.print(f"[bold red]error:[/bold red] {e}")
        raise typer.Exit(1)


def writable_folder(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create the output folder {path}: {e.strerror}") from e
    if not os.access(path, os.W_OK):
        raise PermissionError(f"the output folder {path} is not writable")
    return path


def check_writable_file(path: Path | None) -> None:
    if path is None:
        return
    writable_folder(path.parent if str(path.parent) else Path("."))
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{path} is not writable")


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    """``"1229,1487"`` -> ``[1229, 1487]`` (range and duplicate checks belong to the caller, who knows the sizes)."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None


def load(model: str, bos: bool | None):
    from ..models import load_model

    with err.status(f"loading {model}"):
        return load_model(model, bos=bos)
