"""Text that Debian packages ship: Jane Austen's novels (the R package janeaustenr's data files) and the
King James Bible (the bible program's output)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

from cardhouse._install import InstallError, apt_install

from .text import PARAGRAPH_SEPARATOR, unwrap_paragraphs


def _debian_package_file(package: str, suffix: str) -> Path | None:
    if shutil.which("dpkg") is None:
        return None
    listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    if listing.returncode != 0:
        return None
    matches = [Path(line) for line in listing.stdout.splitlines() if line.endswith(suffix)]
    return matches[0] if matches else None


# --- Jane Austen: the R package janeaustenr, as Debian ships it -----------------------

AUSTEN_DEBIAN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_INDEX_SUFFIX = "janeaustenr/data/Rdata.rdx"
# Publication order, as janeaustenr::austen_books() lists them.
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


def _austen_index_file() -> Path:
    index = _debian_package_file(AUSTEN_DEBIAN_PACKAGE, AUSTEN_INDEX_SUFFIX)
    if index is None:
        apt_install(AUSTEN_DEBIAN_PACKAGE)
        index = _debian_package_file(AUSTEN_DEBIAN_PACKAGE, AUSTEN_INDEX_SUFFIX)
    if index is None:
        raise InstallError(f"{AUSTEN_DEBIAN_PACKAGE} is installed but has no {AUSTEN_INDEX_SUFFIX}")
    return index


def _read_r_lazyload_db(index_file: Path) -> dict[str, list[str]]:
    """Character vectors from an R lazy-load database (``.rdx`` index + ``.rdb`` blobs).

    Each blob is a 4-byte big-endian length followed by a zlib-compressed R
    serialization, which ``rdata`` parses.
    """
    import rdata

    index = rdata.read_rds(index_file)
    blobs = index_file.with_suffix(".rdb").read_bytes()
    vectors = {}
    for name, (offset, length) in index["variables"].items():
        blob = blobs[int(offset) : int(offset) + int(length)]
        (expected_size,) = struct.unpack(">I", blob[:4])
        serialized = zlib.decompress(blob[4:])
        if len(serialized) != expected_size:
            raise ValueError(f"{index_file}: {name} decompressed to {len(serialized)} bytes, not {expected_size}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": it is a bare serialization
            parsed = rdata.parser.parse_data(serialized)
        vectors[str(name)] = ["" if line is None else str(line) for line in rdata.conversion.convert(parsed)]
    return vectors


def austen_text() -> str:
    books = _read_r_lazyload_db(_austen_index_file())
    return PARAGRAPH_SEPARATOR.join(
        PARAGRAPH_SEPARATOR.join(unwrap_paragraphs(books[title])) for title in AUSTEN_BOOKS
    )


# --- The King James Bible -------------------------------------------------------------

# The bible-kjv program decodes the compressed text that bible-kjv-text ships
# (/usr/lib/bible.data, its own format), one verse per line.
KJV_DEBIAN_PACKAGE = "bible-kjv"  # depends on bible-kjv-text
KJV_WHOLE_TEXT = "gen1:1-rev22:21"
_KJV_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")  # "1Sa3:10 And the LORD came, ..."


def _kjv_verses() -> str:
    if shutil.which("bible") is None:
        apt_install(KJV_DEBIAN_PACKAGE)
    # -f turns pretty-printing off: one "Book1:1 text" line per verse; stdin closed, or it waits for commands
    result = subprocess.run(["bible", "-f", KJV_WHOLE_TEXT], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0 or not result.stdout.strip():
        raise InstallError(f"`bible -f {KJV_WHOLE_TEXT}` gave no text: {result.stderr[-500:]}")
    return result.stdout


def kjv_text() -> str:
    """One paragraph per chapter (1,189), verse numbers dropped."""
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in _kjv_verses().splitlines():
        match = _KJV_VERSE.match(line)
        if match is None:
            raise ValueError(f"not a verse line of the bible program: {line[:80]!r}")
        book, chapter, _, verse = match.groups()
        chapters.setdefault((book, chapter), []).append(verse.strip())
    return PARAGRAPH_SEPARATOR.join(" ".join(verses) for verses in chapters.values())
