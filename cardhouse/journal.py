"""Rows of a long run appended to a JSONL file as they are measured, tied to the settings they were
measured under, so that a rerun resumes only rows that mean the same thing (the sweep's resume sink).

The first line of the file is ``{"journal": "cardhouse", "settings": {...}}``; each later line is one
row. Reopening the file with other settings (another model or weights, corpus, token budget,
context, seed, tasks, limit, criterion, layer or cardhouse version) is refused with a message that
names every difference, instead of reporting the old rows under the new labels. A line cut by an
interruption is dropped (that row is measured again); the file is rewritten atomically before
appending, so a crash while it is rewritten loses nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from ._files import write_atomically

HEADER = "journal"


class SettingsMismatch(ValueError):
    """The file holds rows measured under other settings."""


def differences(saved: dict, now: dict, keys=None) -> list[str]:
    """``key: saved -> now`` for every setting that differs (over ``keys``, default all of both)."""
    keys = list(dict.fromkeys([*saved, *now])) if keys is None else keys
    return [f"{k}: {_short(saved.get(k))} (in the file) vs {_short(now.get(k))} (now)"
            for k in keys if saved.get(k) != now.get(k)]


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


class Journal:
    def __init__(self, path: str | Path, settings: dict):
        self.path, self.settings = Path(path), json.loads(json.dumps(settings, default=str))  # as stored
        self._opened = False

    def _read(self) -> tuple[dict | None, list[dict]]:
        if not self.path.exists():
            return None, []
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or HEADER not in header:
            raise SettingsMismatch(f"{self.path} does not say which settings its rows were measured under (written "
                                   "by an older cardhouse, or not a cardhouse journal); move it away or delete it "
                                   "to start over")
        rows = []
        for line in lines[1:]:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: that row is measured again
                break
        return header["settings"], rows

    def check(self, settings: dict | None = None) -> None:
        """Refuse the file if its settings differ from ``settings`` (a subset: e.g. all but the weights digest,
        before the model loads) or from the journal's own."""
        now = json.loads(json.dumps(settings, default=str)) if settings is not None else self.settings
        saved, _ = self._read()
        if saved is None:
            return
        diff = differences(saved, now, keys=list(now) if settings is not None else None)
        if diff:
            raise SettingsMismatch(f"{self.path} holds rows measured with other settings ({'; '.join(diff)}); "
                                   "give another output folder, or delete the file to measure again")

    def rows(self) -> list[dict]:
        """The rows measured so far under these settings ([] for a new file)."""
        self.check()
        return self._read()[1]

    def append(self, row: dict) -> None:
        """Add one row, on disk (flushed) before the next is measured. The first append of a run rewrites
        the file atomically as the header and the rows kept, dropping a line cut by an interruption."""
        if not self._opened:
            kept = self.rows()
            lines = [{HEADER: "cardhouse", "settings": self.settings}, *kept]
            text = "".join(json.dumps(line) + "\n" for line in lines)
            write_atomically(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            self._opened = True
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")
            out.flush()
