"""Faults: Ctrl-C (SIGINT) and kill -9 during scan, sweep, report and finetune, a crash while a checkpoint
is saved, and a full disk for the outputs. Each command runs as a subprocess on a tiny saved model and is
stopped at a known point (``tests/fault_runner.py``). After each fault no file is left that a later run
would trust: result files are either the previous complete ones or absent, a resumed sweep or fine-tuning
goes on from complete rows and checkpoints only, and the rerun finishes with the same numbers as a run
that was never interrupted. (Damaged model caches: ``tests/test_cache_integrity.py``.)"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from saved_models import save_tiny

# subprocesses that import torch and transformers: minutes in all, so with the slow tests, not the fast loop
pytestmark = pytest.mark.real

RUNNER = Path(__file__).with_name("fault_runner.py")
ROOT = Path(__file__).resolve().parents[1]
BUDGET = ["--corpus", "wikipedia", "--max-tokens", "63", "--context", "64"]


def _env(tmp: Path, pause: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg", "CARDHOUSE_PAUSE": pause or "",
           "CARDHOUSE_PAUSE_MARKER": str(tmp / "paused")}
    return env


def run(tmp: Path, *args, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], env=_env(tmp), capture_output=True,
                          text=True, timeout=600, preexec_fn=preexec)


def interrupt(tmp: Path, pause: str, sig: int, *args) -> subprocess.CompletedProcess:
    """Run until the pause point, send ``sig`` there, and return how the process ended."""
    marker = tmp / "paused"
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(RUNNER), *map(str, args)], env=_env(tmp, pause),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
            proc.kill()
            pytest.fail(f"never reached the pause point {pause}: {proc.returncode}\n{out}\n{err}")
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("fault-model") / "llama", plant=True, positions=512)


def _visible(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.exists() else set()


def _interrupted_cleanly(result, sig):
    if sig == signal.SIGINT:  # one clear line and exit code 130, no traceback
        assert result.returncode == 130, result.stderr
        assert "interrupted" in result.stderr and "Traceback" not in result.stderr
    else:
        assert result.returncode == -signal.SIGKILL


# ---- scan: stopped during the work, and between writing its JSON and putting it in place --------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "kill-9"])
@pytest.mark.parametrize("pause", ["cardhouse.analysis:find_massive_weights:1", "os:replace:1"],
                         ids=["during-work", "during-write"])
def test_scan(model, tmp_path, sig, pause):
    out = tmp_path / "out"
    result = interrupt(tmp_path, pause, sig, "scan", "-m", model, "--limit", "4", "-o", out)
    _interrupted_cleanly(result, sig)
    assert "scan.json" not in _visible(out)  # never a half-written or half-placed result
    again = run(tmp_path, "scan", "-m", model, "--limit", "4", "-o", out)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "scan.json").read_text())["results"]["scan"]["massive_layers"]


# ---- sweep: rows resumed, never duplicated, the same numbers as an uninterrupted run --------------------------


@pytest.fixture(scope="module")
def reference_sweep(model, tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("sweep-reference")
    result = run(tmp, "sweep", "-m", model, "--ks", "1,2", *BUDGET, "-o", tmp / "out")
    assert result.returncode == 0, result.stderr
    return json.loads((tmp / "out" / "sweep.json").read_text())["results"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "kill-9"])
def test_sweep(model, reference_sweep, tmp_path, sig):
    from cardhouse.interventions.sweep import read_rows

    out = tmp_path / "out"
    result = interrupt(tmp_path, "cardhouse.journal:Journal.append:3", sig, "sweep", "-m", model, "--ks", "1,2",
                       *BUDGET, "-o", out)
    _interrupted_cleanly(result, sig)
    assert [r["variant"] for r in read_rows(out / "sweep.jsonl")] == [r["variant"] for r in reference_sweep[:2]]
    assert "sweep.json" not in _visible(out)
    again = run(tmp_path, "sweep", "-m", model, "--ks", "1,2", *BUDGET, "-o", out)
    assert again.returncode == 0, again.stderr
    rows = json.loads((out / "sweep.json").read_text())["results"]
    key = lambda r: (r["variant"], r["ppl_wikipedia"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, reference_sweep))  # each variant once, the same numbers


# ---- report: nothing a later run reads; the rerun needs --overwrite and succeeds ---------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "kill-9"])
def test_report(model, tmp_path, sig):
    out = tmp_path / "report"
    args = ["report", "-m", model, "--corpus", "wikipedia", "--max-tokens", "64", "--context", "64", "--ks", "1",
            "--attack-k", "1", "--out", out]
    result = interrupt(tmp_path, "cardhouse.interventions.sweep:sweep:1", sig, *args)
    _interrupted_cleanly(result, sig)
    assert not {"results.json", "report.html"} & _visible(out)
    again = run(tmp_path, *args, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "results.json").read_text())["results"]["failures"] == []


# ---- finetune: resumed from the last complete checkpoint only -------------------------------------------------


FINETUNE = ["--layer", "0", "--rows", "1,2", "--max-steps", "6", "--save-steps", "2", "--batch-size", "2",
            "--grad-accum", "1", "--max-length", "256", "--max-tokens", "0", "--records", "24"]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("records") / "records.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}"})
                              for i in range(24)))
    return path


@pytest.mark.parametrize("sig, pause", [
    (signal.SIGINT, "transformers:Trainer.training_step:4"),  # Ctrl-C during step 4
    (signal.SIGKILL, "transformers:Trainer._save_rng_state:2"),  # killed while checkpoint-4 is being saved
], ids=["SIGINT-in-a-step", "kill-9-while-saving"])
def test_finetune(model, records, tmp_path, sig, pause):
    from cardhouse.finetuning.train import last_complete_checkpoint

    out = tmp_path / "ft"
    args = ["finetune", "-m", model, "--data", records, *FINETUNE, "-o", out]
    result = interrupt(tmp_path, pause, sig, *args)
    _interrupted_cleanly(result, sig)
    checkpoints = out / "checkpoints"
    if sig == signal.SIGKILL:  # checkpoint-4 was cut short: it exists, but it is not trusted
        assert (checkpoints / "checkpoint-4").is_dir()
    assert last_complete_checkpoint(checkpoints).name == "checkpoint-2"
    assert not (out / "finetune.json").exists() and not (out / "results.json").exists()
    again = run(tmp_path, *args, "--resume")
    assert again.returncode == 0, again.stderr
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["results"]["steps"] == 6 and saved["settings"]["resume"] is True


# ---- a full disk (a file-size limit, as `ulimit -f` sets) -----------------------------------------------------


def test_a_full_disk_keeps_the_previous_results_and_leaves_no_partial_file(model, tmp_path):
    out = tmp_path / "out"
    first = run(tmp_path, "scan", "-m", model, "--limit", "4", "-o", out)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk():  # writes past 4 KiB fail with EFBIG (SIGXFSZ ignored, as a shell's `ulimit -f 4` would)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    second = run(tmp_path, "scan", "-m", model, "--limit", "4", "--k", "3", "-o", out, preexec=full_disk)
    assert second.returncode == 1, second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "File too large" in errors[0] and "Traceback" not in second.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # every file as the first run left it
