"""Paragraphs out of plain text: every corpus is paragraphs (or documents) separated by one blank line."""

from __future__ import annotations

PARAGRAPH_SEPARATOR = "\n\n"


def unwrap_paragraphs(lines: list[str]) -> list[str]:
    """Join hard-wrapped lines into paragraphs; blank lines separate paragraphs."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def unwrap_greedy(lines: list[str], width: int) -> list[str]:
    """Paragraphs of text wrapped greedily at ``width`` columns without blank lines between them.

    A line ends its paragraph when the next line's first word would have fit on it.
    """
    paragraphs, current = [], []
    for line, following in zip(lines, lines[1:] + [""]):
        current.append(line.strip())
        next_word = following.split()[0] if following.split() else ""
        if not next_word or len(line.rstrip()) + 1 + len(next_word) <= width:
            paragraphs.append(" ".join(current))
            current = []
    return [p for p in paragraphs if p]
