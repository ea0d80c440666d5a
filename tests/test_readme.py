"""What the README names exists: its set-up commands are the ones CI and pyproject.toml run, every Python
name and import it shows resolves, and every test, benchmark and doc it cites for a claim is there."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BASH = re.findall(r"```bash\n(.*?)```", README, re.S)
PYTHON = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(b.strip() for b in BASH if "pytest" in b)
    assert test_command in ci.splitlines()


def test_the_set_up_commands_install_what_they_use():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    main_job = BASH[0].strip()
    assert main_job == 'pip install "torch==2.13.0" -e . && cardhouse report'
    assert project["scripts"]["cardhouse"] == "cardhouse.cli:app"
    assert "test" in project["optional-dependencies"]  # the test command's ".[test]"


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def test_every_import_in_the_python_examples_works():
    lines = [line.split("#")[0].strip() for block in PYTHON for line in block.splitlines()]
    imports = [line for line in lines if line.startswith(("from cardhouse", "import cardhouse"))]
    assert len(imports) > 5
    for line in imports:
        exec(line, {})  # noqa: S102  an ImportError names the line


@pytest.mark.parametrize("name", sorted(set(re.findall(r"`(cardhouse(?:\.\w+)+)(?:::(\w+))?", README))))
def test_every_named_object_exists(name):
    dotted, attr = name
    assert _resolve(dotted + (f".{attr}" if attr else "")) is not None


@pytest.mark.parametrize("path", sorted(set(re.findall(r"\b((?:tests|benchmarks|docs|cardhouse)/[\w/.-]+\.(?:py|md|json))",
                                                       README))))
def test_every_cited_file_exists(path):
    assert (ROOT / path).is_file()


def test_every_result_file_kind_is_named():
    kinds = [p.name.removesuffix(".schema.json") for p in (ROOT / "cardhouse" / "schemas").glob("*.schema.json")]
    missing = [k for k in kinds if k not in ("envelope", "defs") and f"`{k}`" not in README]
    assert not missing, f"README's result files section does not name: {missing}"


def test_every_command_is_in_the_commands_table():
    from cardhouse.cli import app

    table = README[README.index("## Commands"):README.index("## Models")]
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert [n for n in names if f"`{n}`" not in table and f"`cardhouse {n}" not in table] == []


def test_the_python_examples_are_python():
    # regression: "Trainer(model=peft_model, ..., callbacks=[macdrop])" made the pasted block a SyntaxError
    for block in PYTHON:
        compile(block, "README.md", "exec")


def _command_lines(text: str) -> list[str]:
    """Every ``cardhouse ...`` command line shown in ``text``: inline code and lines of shell blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose) if span.startswith("cardhouse ")]
    for language, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if language not in ("bash", "sh", ""):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            lines += [part.strip() for part in re.split(r"&&|\|", line.split("#")[0])
                      if part.strip().startswith("cardhouse ")]
    return lines


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))])
def test_every_command_line_shown_uses_options_the_command_has(doc):
    # options were renamed (--limit -> --task-limit, --records, --map-layer): an example must not keep an old name
    import typer.main

    from cardhouse.cli import app

    commands = typer.main.get_command(app).commands
    stale = []
    for line in _command_lines((ROOT / doc).read_text(encoding="utf-8")):
        words = line.split()
        command = commands.get(words[1])
        if command is None:
            stale.append(line)
            continue
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        stale += [f"{word} in: {line}" for word in words[2:]
                  if word.startswith("--") and word.split("=")[0] not in known]
    assert stale == []
