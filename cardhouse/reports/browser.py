"""Headless Chromium (from Debian's packages) to render a report the way a reader sees it.

Used by the tests and by ``cardhouse download --browser``: ``ensure_chromium`` installs the
browser with apt when it is missing; ``dump_dom`` and ``screenshot`` drive it from the
command line (no webdriver: the two flags Chromium ships are all the tests need).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .._install import InstallError, apt_install

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
