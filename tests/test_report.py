"""The report on tiny random models: files, the page against results.json (also in headless Chromium),
determinism, the output folder rules, failed steps, and the CLI's errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cardhouse.cli import app
from cardhouse.reports.browser import parse_page, problems, render
from cardhouse.reports.html import SIG, Table, cell, format_cell, layer_ranges
from cardhouse.reports.report import STEPS, Settings, Step, build_report

# tiny models have 128 positions and 48 FFN rows: two 64-token windows, k in 1, 2, 5
TINY = Settings.quick(max_tokens=126, context=64)
FAMILIES = ["llama", "gemma3_text"]  # a plain and a sandwich-norm model, side by side
ARTIFACTS = Path(os.environ.get("CARDHOUSE_TEST_ARTIFACTS", Path(tempfile.gettempdir()) / "cardhouse-test-artifacts"))


@pytest.fixture(scope="module")
def report(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report") / "out"
    results = build_report([tiny(f) for f in FAMILIES], folder, TINY, progress=False)
    return folder, results


def read(folder: Path) -> tuple[dict, str]:
    return json.loads((folder / "results.json").read_text())["results"], (folder / "report.html").read_text()


# ---- the numbers and their formatting ----------------------------------------------------------


@pytest.mark.parametrize("value, text", [(24812.31, "24,810"), (24.0312, "24.03"), (0.0012345, "0.001234"),
                                         (3065.2, "3,065"), (9999.7, "10,000"), (-10.8234, "-10.82"), (0.0, "0"),
                                         (134515008, "134,515,008"), (1487, "1487"), (True, "yes"),
                                         ([1229, 1487], "1229, 1487"), ([], "none"), (None, "–")])
def test_cells_round_to_sig_digits_and_read_back(value, text):
    stored = cell(value)
    assert format_cell(stored) == text
    if isinstance(stored, (int, float)) and not isinstance(stored, bool):
        assert float(text.replace(",", "")) == stored
        assert math.isclose(stored, value, rel_tol=10 ** (1 - SIG))


def test_non_finite_numbers_are_stored_as_text_json_can_hold():
    table = Table("t", ["a", "b"], [[float("inf"), float("nan")]])
    assert table.rows == [["inf", "nan"]]
    json.dumps(table.rows, allow_nan=False)


def test_layer_ranges():
    assert layer_ranges([11, 12, 13, 27]) == "11–13, 27"
    assert layer_ranges([]) == "none"


# ---- one report of two tiny models ------------------------------------------------------------------


def test_the_sweep_plot_names_k_on_its_axis(tmp_path, monkeypatch):
    # regression: the log axis of k + 1 was labelled 2 x 10^0, 3 x 10^0, 6 x 10^0 for k = 1, 2, 5
    from cardhouse.reports import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figures.append(fig) or Path(path))
    curves = {"topk-zero": [(0, 24.0), (1, 26.0), (2, 90.0), (5, 86.0)], "topk-retain": [(1, 28.0), (5, 27.0)]}
    plots.plot_sweep({"ppl_wikipedia": curves}, tmp_path / "sweep.png")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "5"]
    assert [t.get_text() for t in ax.get_xticklabels(minor=True)] == []


def test_findings_do_not_say_one_ffn_writes_what_was_massive_before_it():
    # regression: Gemma-3-270M's page said "The FFN of layer 8 writes them" of dim 163, massive from layer 3
    from cardhouse.reports.findings import findings

    def model(first: int) -> dict:
        scan = {"massive_layers": list(range(first, 14)), "layers": [{"top-1": 9e4, "median": 100.0}],
                "roles": {"bos": {"prompts_with_massive": 4}}, "prompts": 4,
                "massive_dims": [{"dim": 163, "layers": list(range(first, 14))}]}
        weights = {"layer": 8, "dim": 163, "indices": [188, 248], "massive": True}
        return {"name": "m", "sections": [{"key": "scan", "status": "ok", "data": {"scan": scan}},
                                          {"key": "weights", "status": "ok", "data": {"massive_weights": weights}}]}

    gradual, one = (findings([model(first)], 2).text[0] for first in (3, 8))
    assert "massive from layer 3 and grows over several layers" in gradual and "writes them" not in gradual
    assert "The FFN of layer 8 writes them, through rows 188, 248" in one


def test_report_folder_holds_the_page_the_json_and_every_figure(report):
    folder, results = report
    assert json.loads((folder / "results.json").read_text())["results"] == results
    assert results["failures"] == []
    assert [m["name"] for m in results["models"]] == [f"tiny-{f}" for f in FAMILIES]
    for model in results["models"]:
        assert [s["key"] for s in model["sections"]] == [step.key for step in STEPS if step.key != "moe"]  # dense
        assert all(s["status"] == "ok" for s in model["sections"])
        figures = [f["file"] for s in model["sections"] for f in s["figures"]]
        assert len(figures) == 3 and all((folder / f).read_bytes().startswith(b"\x89PNG") for f in figures)


def test_every_number_on_the_page_equals_results_json(report):
    folder, _ = report
    results, page_text = read(folder)
    page = parse_page(page_text)
    assert problems(page, results) == []
    shown = sum(1 for t in page.tables.values() for row in t for _ in row)
    assert shown > 300  # the check above compared many cells, not none


def test_page_shows_the_model_facts_and_the_attack_rows(report):
    folder, results = report
    page = parse_page(read(folder)[1])
    for i, model in enumerate(results["models"]):
        facts = dict(page.tables[f"m{i}-model-t0"])
        assert facts["name"] == model["name"] and facts["layers"] == "2" and facts["hidden size"] == "32"
        attack_rows = [row[0] for row in page.tables[f"m{i}-attacks-t0"]]
        assert attack_rows == ["original", "topk-zero k=2", "random-zero k=2", "topk-retain k=2",
                               "random-retain k=2", "super-weight", "largest-down-entry", "random-weight"]


def test_the_page_opens_with_its_findings(report):
    folder, results = report
    opening = results["findings"]
    table = opening["tables"][0]
    assert [row[0] for row in table["rows"]] == [m["name"] for m in results["models"]]
    assert [t.split(":")[0] for t in opening["text"]] == [m["name"] for m in results["models"]]
    assert all("Zeroing those top-2 rows" in t for t in opening["text"])
    # in words, not row keys (regression: the sentence said "(ppl_wikipedia)" and "the bos token")
    assert not any("ppl_" in t or "the bos token" in t for t in opening["text"])
    # and the attack tables' headers name the metric in words too (they were the row keys)
    attacks = [next(s for s in m["sections"] if s["key"] == "attacks")["tables"] for m in results["models"]]
    headers = [c for tables in attacks for table in tables for c in [table["caption"], *table["columns"]]]
    assert any(c.startswith("perplexity (") for c in headers) and not any("ppl_" in c for c in headers)
    for i, model in enumerate(results["models"]):
        attacks = next(s for s in model["sections"] if s["key"] == "attacks")["tables"][0]["rows"]
        by_name = {row[0]: row for row in attacks}
        row = dict(zip(table["columns"], table["rows"][i]))
        # the same numbers as the attack table: original, top-2 zeroed, its random control
        assert [row["perplexity"], row["top-2 zeroed"], row["2 random rows zeroed"]] == \
            [by_name["original"][2], by_name["topk-zero k=2"][2], by_name["random-zero k=2"][2]]
    page = read(folder)[1]
    assert page.index('id="findings"') < page.index('id="model"')  # before the detailed sections


def test_page_is_self_contained_and_needs_no_javascript(report):
    folder, _ = report
    text = read(folder)[1]
    page = parse_page(text)
    assert page.scripts == 0 and page.external == []
    assert len(page.images) == 6 and all(i["src"].startswith("data:image/png;base64,") for i in page.images)
    assert "http://" not in text and "https://" not in text


def test_same_seed_same_numbers(report, tiny, tmp_path):
    _, first = report
    again = build_report([tiny(f) for f in FAMILIES], tmp_path / "again", TINY, progress=False)
    assert again["models"] == first["models"]


def test_another_seed_changes_only_the_random_controls(tiny, tmp_path):
    steps = [s for s in STEPS if s.key in ("model", "weights", "attacks")]
    a = build_report([tiny("llama")], tmp_path / "a", TINY, progress=False, steps=steps)
    b = build_report([tiny("llama")], tmp_path / "b", Settings.quick(max_tokens=126, context=64, seed=1),
                     progress=False, steps=steps)
    rows = lambda r: {row[0]: row for row in r["models"][0]["sections"][2]["tables"][0]["rows"]}  # noqa: E731
    ra, rb = rows(a), rows(b)
    assert ra["topk-zero k=2"] == rb["topk-zero k=2"] and ra["original"] == rb["original"]
    assert ra["random-zero k=2"][1] != rb["random-zero k=2"][1]  # other random rows


def test_the_progress_bar_ends_on_done_not_on_a_skipped_steps_title(tiny, tmp_path, monkeypatch):
    """Regression: a dense model's report ended with the bar reading "...: Mixture of Experts: router collapse"
    (the MoE step, skipped, was the last one named)."""
    import cardhouse.reports.report as report_module

    seen = []

    class Recording:
        def __init__(self, enabled, total):
            pass

        def __enter__(self):
            return lambda description, n: seen.append(description)

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(report_module, "_progress", Recording)
    steps = [s for s in STEPS if s.key in ("model", "moe")]
    build_report([tiny("llama")], tmp_path / "out", TINY, steps=steps)
    assert any(d.endswith("does not apply") and "Mixture of Experts" in d for d in seen), seen
    assert seen[-1].endswith("every step done"), seen


def test_a_language_model_report_lists_no_encoder_settings(report):
    _, results = report
    listed = {row[0] for row in results["run"]["tables"][0]["rows"]}
    assert {"context", "corpora", "seed"} <= listed
    assert not listed & set(Settings.ENCODER_ONLY), listed & set(Settings.ENCODER_ONLY)


# ---- the output folder -------------------------------------------------------------------------------


def test_existing_folder_is_refused_and_left_alone(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_report([tiny("llama")], tmp_path, TINY, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileExistsError, match="exists"):  # an existing folder, even empty, is the user's
        build_report([tiny("llama")], tmp_path / "empty", TINY, progress=False)
    with pytest.raises(FileExistsError, match="not a folder"):
        build_report([tiny("llama")], tmp_path / "notes.txt", TINY, progress=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not any((tmp_path / "empty").iterdir())


def test_overwrite_replaces_only_the_reports_files(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "report.html").write_text("old")
    steps = [s for s in STEPS if s.key in ("model", "scan")]
    build_report([tiny("llama")], tmp_path, TINY, progress=False, overwrite=True, steps=steps)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "report.html", "results.json",
                                                          "tiny-llama_top_magnitudes.png"]


def test_bad_settings_fail_before_anything_is_written(tiny, tmp_path):
    for settings, message in ((Settings.quick(corpora=("nosuch",)), "unknown corpus"),
                              (Settings.quick(max_tokens=10, context=64), "at least one window"),
                              (Settings.quick(extras=("nosuch",)), "unknown extra section"),
                              (Settings.quick(prompts=str(tmp_path / "missing.txt")), "prompt file not found")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            build_report([tiny("llama")], tmp_path / "out", settings, progress=False)
        assert not (tmp_path / "out").exists()


# ---- a step that fails -----------------------------------------------------------------------------


def test_a_failed_step_is_on_the_page_and_the_other_sections_are_written(tiny, tmp_path):
    def broken(ctx):
        raise RuntimeError("the search broke")

    steps = [Step(s.key, s.title, broken) if s.key == "weights" else s for s in STEPS]
    results = build_report([tiny("llama")], tmp_path / "out", TINY, progress=False, steps=steps)
    status = {s["key"]: s for s in results["models"][0]["sections"]}
    assert status["weights"]["error"] == "RuntimeError: the search broke"
    assert "needs the 'weights' step" in status["attacks"]["error"]  # it depends on it
    assert all(status[k]["status"] == "ok" for k in ("model", "inputs", "scan", "activations"))
    assert [f["step"] for f in results["failures"]] == ["weights", "attacks"]
    page = parse_page((tmp_path / "out" / "report.html").read_text())
    assert page.failed_steps == ["weights", "attacks"]
    assert "the search broke" in (tmp_path / "out" / "report.html").read_text()
    assert problems(page, results) == []  # the rest of the page is whole


def test_a_model_that_does_not_load_fails_its_steps_only(tiny, tmp_path):
    from transformers import AutoConfig

    broken = tmp_path / "config-only"  # its config passes the checks; its weights are missing
    AutoConfig.for_model("llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=128).save_pretrained(broken)
    steps = [s for s in STEPS if s.key in ("model", "scan")]
    results = build_report([tiny("llama"), str(broken)], tmp_path / "out", TINY, progress=False, steps=steps)
    ok, bad = results["models"]
    assert all(s["status"] == "ok" for s in ok["sections"])
    assert "could not load the model folder" in bad["sections"][0]["error"]
    assert "needs the 'model' step" in bad["sections"][1]["error"]


def test_a_model_path_that_does_not_exist_stops_the_report_before_anything_runs(tiny, tmp_path):
    from cardhouse.models.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="model path not found"):
        build_report([tiny("llama"), str(tmp_path / "no-such-model.gguf")], tmp_path / "out", TINY, progress=False)
    assert not (tmp_path / "out").exists()


# ---- the command line --------------------------------------------------------------------------------


def test_cli_refuses_an_existing_folder_with_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["report", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "error:" in result.output and "--overwrite" in result.output and "Traceback" not in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("args, message", [(["--corpus", "nosuch"], "unknown corpus"),
                                           (["--ks", "1,x"], "--ks must be"),
                                           (["--with", "nosuch"], "unknown extra section")])
def test_cli_bad_input_is_one_clear_error(tmp_path, args, message):
    result = CliRunner().invoke(app, ["report", "--quick", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 1 and message in result.output
    assert not (tmp_path / "out").exists()


# ---- in a real browser ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium():
    from cardhouse._install import InstallError
    from cardhouse.reports.browser import ensure_chromium

    try:
        return ensure_chromium()
    except InstallError as e:
        pytest.skip(f"headless Chromium cannot be installed here: {e}")


def check_in_browser(folder: Path, name: str) -> None:
    """Render report.html in Chromium, compare the DOM with results.json, keep a screenshot."""
    from cardhouse.reports.browser import render, screenshot

    results = json.loads((folder / "results.json").read_text())["results"]
    page = render(folder / "report.html")
    assert problems(page, results) == []
    assert page.sections == ["findings"] + [s["key"] for s in results["models"][0]["sections"]] + ["run"]
    n_figures = sum(len(s["figures"]) for m in results["models"] for s in m["sections"])
    assert len(page.images) == n_figures > 0
    assert all(int(img["data-natural-width"]) > 0 for img in page.images)  # every image decoded
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = screenshot(folder / "report.html", ARTIFACTS / f"{name}.png")
    assert png.stat().st_size > 10_000
    shutil.copy(folder / "report.html", ARTIFACTS / f"{name}.html")
    print(f"\nscreenshot of the rendered report: {png}")


def test_report_renders_in_chromium(report, chromium):
    folder, _ = report
    check_in_browser(folder, "report-tiny-side-by-side")


# ---- optional sections ------------------------------------------------------------------------------


def test_attention_section_on_request(tiny, tmp_path):
    from cardhouse.reports.report import OPTIONAL_STEPS
    from cardhouse.results import write_result

    steps = [s for s in STEPS if s.key == "model"] + [OPTIONAL_STEPS["attention"]]
    results = build_report([tiny("llama")], tmp_path / "out", Settings.quick(max_tokens=126, context=64,
                           extras=("attention",)), progress=False, steps=steps)
    section = results["models"][0]["sections"][1]
    assert section["key"] == "attention" and section["status"] == "ok"
    layers = section["tables"][1]["rows"]
    assert [row[0] for row in layers] == [0, 1]  # one row per layer of the tiny model
    # the split layer is named (it read "up to l", which the weights section uses for another layer)
    assert section["tables"][0]["caption"].startswith("Layers up to the last (the first whose output carries")
    assert all(0 <= row[1] <= 1 for row in layers)  # attention shares
    assert (tmp_path / "out" / section["figures"][0]["file"]).is_file()
    assert problems(parse_page((tmp_path / "out" / "report.html").read_text()), results) == []


def test_macdrop_section_reads_a_finished_comparison(tiny, tmp_path):
    """A real (tiny) `finetune-compare` run through the fine-tuning API, saved as the CLI saves it."""
    from conftest import build

    from cardhouse.evaluation.measure import Budget
    from cardhouse.finetuning import FinetuneConfig, MacDropConfig, compare
    from cardhouse.reports.report import OPTIONAL_STEPS
    from cardhouse.results import write_result

    words = ["red", "green", "blue", "cyan", "gold", "pink", "gray", "teal"]
    data = tmp_path / "records.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Name colour {i}.", "input": "",
                                          "output": f"{words[i % 8]} {words[(i + 3) % 8]}"}) for i in range(48)))
    config = FinetuneConfig(data=str(data), batch_size=4, grad_accum=2, max_steps=2, max_length=200, lr=1e-2,
                            save_steps=2, logging_steps=1, rank=4, lora_alpha=8)
    drop = MacDropConfig(layer=0, rows=[1, 2, 3])
    rows = compare(lambda: build("llama"), config, drop, methods=("lora",), schedules=("step",),
                   out=tmp_path / "cmp", budget=Budget(corpora=["wikipedia"], max_tokens=126, context=64),
                   progress=False)
    write_result(tmp_path / "cmp" / "compare.json", rows, model={"name": "tiny-llama"},
                 settings={"config": config.to_dict(), "macdrop": drop.to_dict()})

    steps = [s for s in STEPS if s.key == "model"] + [OPTIONAL_STEPS["macdrop"]]
    settings = Settings.quick(max_tokens=126, context=64, extras=("macdrop",), macdrop=str(tmp_path / "cmp"))
    results = build_report([tiny("llama"), tiny("qwen2")], tmp_path / "out", settings, progress=False, steps=steps)
    mine, other = (m["sections"][1] for m in results["models"])
    assert mine["status"] == other["status"] == "ok"
    table = mine["tables"][0]
    assert [row[0] for row in table["rows"]] == ["lora", "lora+macdrop-step"]
    assert table["rows"][0][4] == cell(rows[0]["val_loss"])  # the comparison's own numbers
    assert other["tables"] == [] and "none was given for this model" in other["text"][0]
    assert problems(parse_page((tmp_path / "out" / "report.html").read_text()), results) == []


def test_macdrop_section_needs_a_comparison(tmp_path):
    with pytest.raises(ValueError, match="--macdrop-compare FOLDER"):
        Settings.quick(extras=("macdrop",)).check()
    result = CliRunner().invoke(app, ["report", "--quick", "--out", str(tmp_path / "out"),
                                      "--macdrop-compare", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no MacDrop comparison" in result.output


def test_full_mode_sweeps_k_up_to_the_whole_layer(tiny, tmp_path):
    from cardhouse.interventions.sweep import default_ks

    steps = [s for s in STEPS if s.key in ("model", "weights", "attacks")]
    settings = Settings.full(corpora=("wikipedia",), max_tokens=126, context=64, attack_k=4)
    results = build_report([tiny("llama")], tmp_path / "out", settings, progress=False, steps=steps)
    attacks = results["models"][0]["sections"][2]
    assert [row[0] for row in attacks["tables"][1]["rows"]] == sorted({*default_ks(48), 4})  # 0 .. 48
    assert attacks["tables"][0]["rows"][1][0] == "topk-zero k=4"


# ---- encoders -----------------------------------------------------------------------------------------


def test_encoder_report_shows_the_norm_map_of_real_photographs(tiny, tmp_path, chromium):
    """A tiny DINOv2 with registers on two real photographs beside a tiny BERT: each gets the encoder
    sections, the image model's norm map is on the page and decodes in Chromium."""
    from cardhouse.reports.report import ENCODER_STEPS

    settings = Settings.quick(prompt_limit=2, pairs=12)
    results = build_report([tiny("dinov2_with_registers"), tiny("bert")], tmp_path / "out", settings, progress=False)
    assert results["failures"] == []
    for model in results["models"]:
        assert [s["key"] for s in model["sections"]] == [s.key for s in ENCODER_STEPS]
    image, text = (m["sections"][1] for m in results["models"])
    assert [f["file"] for f in image["figures"]] == ["tiny-dinov2-with-registers_norm_map.png",
                                                    "tiny-dinov2-with-registers_carrier.png",
                                                    "tiny-dinov2-with-registers_scan.png"]
    assert image["data"]["encoder"]["inputs"]["names"] == ["astronaut", "chelsea"]  # real photographs
    assert "norm_maps" not in text["data"]["encoder"] and len(text["figures"]) == 2
    check_in_browser(tmp_path / "out", "report-tiny-encoders")
    page = render(tmp_path / "out" / "report.html")
    norm_map = [img for img in page.images if img["data-file"].endswith("norm_map.png")]
    assert len(norm_map) == 1 and int(norm_map[0]["data-natural-width"]) > 300
