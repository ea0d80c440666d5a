"""``python -m cardhouse``: the command line (the same as the ``cardhouse`` script)."""

from .cli import app

if __name__ == "__main__":
    app(prog_name="cardhouse")
