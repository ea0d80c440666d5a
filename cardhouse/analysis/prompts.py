"""Prompt sets for the analyses: built-in real sentences, a text file, or a bundled corpus."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..data.corpora import load_text

BUILTIN = "builtin"


def builtin_prompts() -> list[str]:
    text = resources.files("cardhouse").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_prompts(source: str = BUILTIN, *, limit: int | None = None) -> list[str]:
    """``builtin``, a path to a text file (one prompt per non-empty line), or ``corpus:NAME``
    (paragraphs of a bundled corpus, see ``cardhouse.data.corpora``)."""
    if source == BUILTIN:
        prompts = builtin_prompts()
    elif source.startswith("corpus:"):

        paragraphs = [p.strip() for p in load_text(source.split(":", 1)[1]).split("\n\n")]
        prompts = [p for p in paragraphs if len(p.split()) >= 8]
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {source} (or use 'builtin' or 'corpus:NAME')")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"the prompt file {source} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                             f"{e.start}); save it as UTF-8, one prompt per line") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"the prompt file {source} holds no non-empty line")
    return prompts[:limit] if limit else prompts
