"""The ``cardhouse`` command line: a thin layer over the Python API, one module per group of commands."""

from . import attacks, emergence, mechanism, report, scan  # noqa: F401  (each module registers its commands on the app)
from . import finetune  # noqa: F401
from .common import app

__all__ = ["app"]
