"""The ``cardhouse`` command line: a thin layer over the Python API, one module per group of commands."""

# each module registers its commands on the app
from . import attacks, emergence, evaluate, finetune, mechanism, memory, moe, report, scan  # noqa: F401
from . import precision  # noqa: F401
from . import super_weight  # noqa: F401
from . import encoder  # noqa: F401
from .common import app

__all__ = ["app"]
