"""The inspection report: the diff on a hand-written graph (golden), the files it writes, and
the pages in a real browser (headless Chromium, driven by Selenium; CI installs both)."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from lowbit import zoo
from lowbit.api import build
from lowbit.errors import LowbitError
from lowbit.ir.parser import parse_graph
from lowbit.passes import PassContext
from lowbit.passes.lower import FuseQuantizedLinear
from lowbit.report import Report
from lowbit.report import snapshot as snap

GRAPH = """
graph @main(%x: f32[2,4]) {
  %wq = core.constant() {name="wq"} : i8[3,4]
  %s = core.constant() {name="s"} : f32[3]
  %dq = quant.dequantize(%wq, %s, none) {axis=0} : f32[3,4]  @proj
  %lin = core.linear(%x, %dq, none) : f32[2,3]  @proj
  %act = core.relu(%lin) : f32[2,3]  @act
  %keep = core.relu(%x) : f32[2,4]  @other
  return %act, %keep
}
"""


def test_diff_marks_exactly_what_a_pass_added_removed_and_changed():
    g = parse_graph(GRAPH)
    g.tensors["wq"] = torch.randint(-8, 8, (3, 4), dtype=torch.int8)
    g.tensors["s"] = torch.rand(3)
    before = snap.take(g, 0, "input")
    assert FuseQuantizedLinear().run(g, PassContext())
    after = snap.take(g, 1, "fuse-quantized-linear")
    d = snap.diff(before, after)
    assert d.removed == ("dq", "lin")
    assert len(d.added) == 1 and after.nodes[d.added[0]].op == "quant.linear"
    assert d.changed == ("act",)  # its operand is now the fused linear; %keep and the constants are untouched


@pytest.fixture(scope="module")
def llama_report(tmp_path_factory):
    spec = zoo.tiny_llama()
    report = Report()
    start = time.perf_counter()
    traced, records = build(spec.model, spec.example_inputs, recipe="w4a8-rot", calibration=[spec.example_inputs],
                            dynamic_shapes=spec.dynamic_shapes, progress=False, observer=report.observer)
    folder = report.write(tmp_path_factory.mktemp("r") / "report", "tiny-llama w4a8-rot", traced.notes)
    return folder, records, time.perf_counter() - start


def test_report_files_and_summary_schema(llama_report):
    folder, records, seconds = llama_report
    assert seconds < 30
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["schema"] == 1 and len(summary["passes"]) == len(records)
    by_name = {p["name"].split("{")[0]: p for p in summary["passes"]}
    rot = by_name["rotate-residual"]
    assert rot["moved"] and all(m["relative change"] > 0 for m in rot["moved"] if m["relative change"] is not None)
    qdq = by_name["insert-qdq"]
    assert qdq["added"] and any(r["kind"] == "weight" and r["dtype"] == "i4" and r["rel error"] > 0 for r in qdq["quantized"])
    assert any(r["kind"] == "activation" and r["granularity"] == "token" for r in qdq["quantized"])
    for p in summary["passes"]:
        assert (folder / p["ir"]).read_text().startswith("graph @") and (folder / p["page"]).is_file()
        assert p["nodes_after"] == sum(p["ops"].values())


def test_report_refuses_a_folder_that_is_not_a_report(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(LowbitError, match="does not hold a lowbit report"):
        Report().write(tmp_path, "x")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# ---- in a real browser ---------------------------------------------------------------------

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=opts)
    yield driver
    driver.quit()


def _errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_report_in_headless_chromium(browser, llama_report, tmp_path):
    from selenium.webdriver.common.by import By

    folder, records, _ = llama_report
    browser.get((folder / "index.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "table.pipeline tr")
    assert len(rows) == len(records) + 1
    browser.find_element(By.PARTIAL_LINK_TEXT, "rotate-residual").click()
    assert "rotate-residual" in browser.find_element(By.TAG_NAME, "h1").text
    assert browser.find_elements(By.CSS_SELECTOR, "table.moved tr")
    group = browser.find_element(By.CSS_SELECTOR, "details.group[data-group='model.layers.0']")
    svg = group.find_element(By.CSS_SELECTOR, "svg.graph")
    assert not svg.is_displayed()
    group.find_element(By.TAG_NAME, "summary").click()
    assert group.get_attribute("open") is not None and svg.is_displayed()
    assert group.find_elements(By.CSS_SELECTOR, "rect.node.changed")  # the rotated linears
    browser.save_screenshot(str(tmp_path / "pass.png"))
    assert (tmp_path / "pass.png").stat().st_size > 10_000
    assert _errors(browser) == []


def test_32_layer_report_renders_fast(browser, tmp_path):
    spec = zoo.tiny_llama(layers=32, hidden=64)
    report = Report()
    traced, records = build(spec.model, spec.example_inputs, pipeline="fuse-norms,rotate-residual",
                            dynamic_shapes=spec.dynamic_shapes, progress=False, observer=report.observer)
    folder = report.write(tmp_path / "report", "32 layers", traced.notes)
    page = max(folder.glob("pass-*.html"), key=lambda p: p.stat().st_size)
    browser.get(page.as_uri())
    ms = browser.execute_script(
        "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime;")
    groups = browser.find_elements("css selector", "details.group")
    assert len(groups) >= 32 and _errors(browser) == []
    assert ms < 5000, f"{page.name} took {ms:.0f} ms to load"
