"""Headless Chromium (from Debian's packages) to render a report the way a reader sees it.

Used by the tests and by ``cardhouse download --browser``: ``ensure_chromium`` installs the
browser with apt when it is missing; ``dump_dom`` and ``screenshot`` drive it from the
command line (no webdriver: the two flags Chromium ships are all the tests need); ``render``
reads a rendered page back (sections, tables, images and whether each one decoded).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from .._install import InstallError, apt_install
from .html import format_cell

EXECUTABLES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEBIAN_PACKAGE = "chromium"


def find_chromium() -> str | None:
    for name in EXECUTABLES:
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium() -> str:
    """The path of a Chromium executable, installing Debian's ``chromium`` package if there is none."""
    path = find_chromium()
    if path is None:
        apt_install(DEBIAN_PACKAGE)
        path = find_chromium()
    if path is None:
        raise InstallError(f"the Debian package {DEBIAN_PACKAGE} was installed but no {' or '.join(EXECUTABLES)} "
                           "is on the PATH")
    return path


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    # A throwaway profile: no state leaks between runs, and concurrent runs do not lock each other out.
    # --no-sandbox: Chromium will not start as root with its sandbox (CI runs as root); it opens only our file.
    with tempfile.TemporaryDirectory(prefix="cardhouse-chromium-") as profile:
        cmd = [ensure_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-1500:]}")
    return result


def dump_dom(html: str | Path, *, timeout: float = 120) -> str:
    """The DOM after the page has loaded (scripts run), serialized as HTML."""
    url = Path(html).resolve().as_uri()
    return _run(["--virtual-time-budget=10000", "--dump-dom", url], timeout).stdout


def screenshot(html: str | Path, png: str | Path, *, width: int = 1280, height: int = 6000,
               timeout: float = 120) -> Path:
    """A PNG of the page as rendered at ``width`` x ``height`` pixels."""
    png = Path(png).resolve()
    url = Path(html).resolve().as_uri()
    _run(["--virtual-time-budget=10000", f"--window-size={width},{height}", f"--screenshot={png}", url], timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {png}")
    return png


# ---- reading a page back: what a reader's browser shows ------------------------------------------

# Appended to a copy of the page before rendering (the report itself has no script): after the
# load event, every image says whether it decoded (naturalWidth > 0 only for a loaded image).
_PROBE = ("<script>addEventListener('load', () => { for (const img of document.images) "
          "img.setAttribute('data-natural-width', img.naturalWidth); });</script>")


@dataclass
class Page:
    """The parts of a report page the checks look at."""

    sections: list[str] = field(default_factory=list)  # data-section of each <section>, in order
    articles: dict[str, list[str]] = field(default_factory=dict)  # section -> data-model of its articles
    tables: dict[str, list[list[str]]] = field(default_factory=dict)  # table id -> rows of cell texts
    images: list[dict] = field(default_factory=list)  # attributes of each <img>
    failed_steps: list[str] = field(default_factory=list)
    scripts: int = 0
    external: list[str] = field(default_factory=list)  # src/href that would load something from elsewhere


class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.page, self.section, self.table, self.row, self.cell = Page(), None, None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name in ("src", "href"):
            value = a.get(name) or ""
            if value and not value.startswith(("data:", "#")):
                self.page.external.append(value)
        if tag == "section":
            self.section = a.get("data-section")
            self.page.sections.append(self.section)
            self.page.articles[self.section] = []
        elif tag == "article" and self.section is not None:
            self.page.articles[self.section].append(a.get("data-model"))
        elif tag == "table":
            self.table = self.page.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self.table is not None and self.cell is None:
            self.row = []
        elif tag == "td" and self.table is not None:
            self.cell = []
        elif tag == "img":
            self.page.images.append(a)
        elif tag == "script":
            self.page.scripts += 1
        if "data-failed-step" in a:
            self.page.failed_steps.append(a["data-failed-step"])

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.row.append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr" and self.table is not None and self.row:
            self.table.append(self.row)
            self.row = []
        elif tag == "table":
            self.table = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def parse_page(text: str) -> Page:
    parser = _PageParser()
    parser.feed(text)
    parser.close()
    return parser.page


def render(html: str | Path, *, timeout: float = 120) -> Page:
    """Render the page in headless Chromium and read back the DOM, images marked with their decoded width."""
    html = Path(html)
    with tempfile.TemporaryDirectory(prefix="cardhouse-page-") as tmp:
        probe = Path(tmp) / html.name
        probe.write_text(html.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
        page = parse_page(dump_dom(probe, timeout=timeout))
    page.scripts -= 1  # the probe
    return page


def _cell_problem(text: str, value) -> str | None:

    if text != format_cell(value):
        return f"shows {text!r}, results.json holds {value!r}"
    # and read back as a number, it is the number itself (not only the same formatting)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(text.replace(",", "")) != value:
        return f"reads as {float(text.replace(',', ''))!r}, results.json holds {value!r}"
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        if [int(v) for v in text.split(", ")] != value:
            return f"reads as {text!r}, results.json holds {value!r}"
    return None


def problems(page: Page, results: dict) -> list[str]:
    """Everything in which the page differs from results.json, or would not show as it should."""
    found = []
    sections = [(i, s) for i, model in enumerate(results["models"]) for s in model["sections"]]
    opening = [(0, results["findings"])] if "findings" in results else []
    for i, s in sections + opening + [(0, results["run"])]:
        where = f"model {i}, section {s['key']}"
        if s["key"] not in page.sections:
            found.append(f"{where}: no such section on the page")
            continue
        if s["key"] not in ("run", "findings") and str(i) not in page.articles[s["key"]]:
            found.append(f"{where}: the model's column is missing")
        if s["error"] and s["key"] not in page.failed_steps:
            found.append(f"{where}: the step failed but the page does not say so")
        for j, table in enumerate(s["tables"]):
            shown = page.tables.get(f"m{i}-{s['key']}-t{j}")
            if shown is None or len(shown) != len(table["rows"]):
                found.append(f"{where}, table {j}: {len(shown or [])} rows shown, {len(table['rows'])} in results.json")
                continue
            for r, (texts, values) in enumerate(zip(shown, table["rows"])):
                if len(texts) != len(values):
                    found.append(f"{where}, table {j}, row {r}: {len(texts)} cells shown, {len(values)} stored")
                    continue
                for c, (text, value) in enumerate(zip(texts, values)):
                    problem = _cell_problem(text, value)
                    if problem:
                        found.append(f"{where}, table {j}, row {r}, column {c}: {problem}")
    figures = [f["file"] for _, s in sections for f in s["figures"]]
    shown = [img.get("data-file") for img in page.images]
    if sorted(shown) != sorted(figures):
        found.append(f"images shown {sorted(shown)}, figures in results.json {sorted(figures)}")
    for img in page.images:
        if not img.get("src", "").startswith("data:image/png;base64,"):
            found.append(f"image {img.get('data-file')} is not inlined")
        if "data-natural-width" in img and int(img["data-natural-width"]) <= 0:
            found.append(f"image {img.get('data-file')} did not load")
    if page.scripts:
        found.append(f"the page has {page.scripts} script(s); it must read without JavaScript")
    if page.external:
        found.append(f"the page loads from elsewhere: {page.external}")
    return found
