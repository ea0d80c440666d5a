"""Checksums of the dequantized-model cache, so that bytes damaged in place are never used.

The cache folder is sealed when it is written: its ``COMPLETE`` marker holds the size and
sha256 of every file in it. A load checks the seal first; a file of another size, another
digest, a missing file or an old marker without checksums means the copy is not trusted
and is rebuilt from the GGUF file. sha256 runs at about 1.5 GB/s where the CPU has SHA
instructions (``benchmarks/cache.py`` times a verified load against an unverified one).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MARKER = "COMPLETE"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def seal(folder: Path) -> dict:
    """Write the marker that lists every file of ``folder`` with its size and sha256; returns it."""
    files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    manifest = {"files": files}
    (folder / MARKER).write_text(json.dumps(manifest, indent=1))
    return manifest


def broken(folder: Path) -> str | None:
    """Why ``folder`` cannot be trusted, or ``None`` when every file matches its seal."""
    marker = folder / MARKER
    if not marker.is_file():
        return "it is incomplete (no COMPLETE marker)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "it has no checksums (written by an older cardhouse, or its marker is damaged)"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} has {size:,} bytes, not the {want['size']:,} written"
        if file_sha256(path) != want["sha256"]:
            return f"the checksum of {name} does not match the one recorded when it was written"
    return None
