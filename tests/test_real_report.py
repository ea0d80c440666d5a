"""`cardhouse report --quick` on the real SmolLM2-135M: the measured phenomenon is on the page, and the
page renders in headless Chromium with every number equal to results.json.

Measured on 2026-11-23 (quick mode: 32 built-in prompts; 510 Wikipedia tokens in two 256-token windows,
BOS first): dim 507 massive in layers 11-27 on the BOS token of all 32 prompts; layer 11, top-5
indices 1229, 1487, 874, 926, 1010; perplexity 24.08 original, 89.68 with the top-2 rows zeroed,
24.10 with 2 random rows zeroed; about 70 s on one core. The margins below are far from those values.
"""

import json

import pytest
from typer.testing import CliRunner

from cardhouse.cli import app
from cardhouse.reports.browser import parse_page
from test_report import check_in_browser, chromium  # noqa: F401  (a fixture)

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real-report") / "smollm2"
    # the README's main command, `cardhouse report` (quick by default), only with another output folder
    result = CliRunner().invoke(app, ["report", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    return folder, json.loads((folder / "results.json").read_text())["results"]


def sections(results):
    return {s["key"]: s for s in results["models"][0]["sections"]}


def test_quick_report_shows_the_massive_activation_and_its_weights(quick):
    folder, results = quick
    assert results["failures"] == []
    s = sections(results)
    scan = s["scan"]["data"]["scan"]
    assert [d["dim"] for d in scan["massive_dims"]] == [507]
    assert scan["first_layer"] == 11 and scan["vanish_layer"] == 28
    assert scan["roles"]["bos"] == {"prompts_with_massive": 32, "prompts_with_role": 32}
    mw = s["weights"]["data"]["massive_weights"]
    assert mw["layer"] == 11 and mw["dim"] == 507 and set(mw["indices"][:2]) == {1229, 1487}
    assert mw["super_weight"]["row"] == 507 and mw["super_weight"]["column"] == 1229  # Yu et al.'s definition
    assert mw["largest_down_entry"]["column"] == 1487
    # and the page says so, in the tables a reader sees
    page = parse_page((folder / "report.html").read_text())
    weights = dict(page.tables["m0-weights-t0"])
    assert weights["layer l"] == "11" and weights["hidden dim"] == "507"
    assert weights["top-k indices"].startswith(("1229, 1487", "1487, 1229"))
    assert weights["super weight (Yu et al.)"] == "W_down[507, 1229]"
    assert dict(page.tables["m0-activations-t0"])["layers"] == "11–27"


def test_quick_report_attack_and_random_control(quick):
    _, results = quick
    ppl = {r["variant"]: r["ppl_wikipedia"] for r in sections(results)["attacks"]["data"]["results"]}
    assert 15 < ppl["original"] < 40
    assert ppl["topk-zero k=2"] > 2.0 * ppl["original"]
    assert abs(ppl["random-zero k=2"] / ppl["original"] - 1) < 0.05
    assert ppl["random-retain k=2"] > 2.0 * ppl["topk-retain k=2"]

    # the page opens with it: dim 507 on BOS, written by layer 11, top-2 zeroing breaks the model, its control not
    opening = results["findings"]
    row = dict(zip(opening["tables"][0]["columns"], opening["tables"][0]["rows"][0]))
    assert row["massive dims"] == [507] and row["FFN layer l"] == 11 and row["carried by"].startswith("bos")
    assert "top-2 rows breaks the model" in opening["text"][0] and "the control, barely changes it" in opening["text"][0]


def test_quick_report_renders_in_chromium(quick, chromium):  # noqa: F811
    folder, _ = quick
    check_in_browser(folder, "report-smollm2-quick")
