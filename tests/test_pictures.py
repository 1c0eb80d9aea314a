"""The report's pictures and report.html, made from a tiny run, and the HTML checked in a real
headless browser (Chromium through Selenium; skipped with the reason where there is none)."""

from __future__ import annotations

import shutil

import pytest

from bench.cli import main
from tests.test_run import QUICK

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PICTURES = ("waterfall.png", "predicted_vs_measured.png", "pareto.png", "rounds.png")


@pytest.fixture(scope="module")
def tiny_run(tiny_cache, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    quick = list(QUICK)
    quick[quick.index("--transforms") + 1] = "fused_qkv,vision_sleep"
    args = ["run", *quick, "--cache-dir", str(tiny_cache), "--eval-examples", "20"]
    assert main([*args, "--results-dir", str(results), "--run-id", "pictures"]) == 0
    return results / "pictures"


def test_every_picture_is_drawn_and_inlined_in_the_html(tiny_run):
    for name in PICTURES:
        assert (tiny_run / name).read_bytes().startswith(PNG_MAGIC), name
    html = (tiny_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(PICTURES)
    assert '<table id="verdict">' in html and "fused_qkv+vision_sleep" in html
    assert "<script" not in html and "http" not in html  # opens offline


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no Chromium here (Debian: apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=driver), options=options
    )


def test_the_html_report_loads_in_a_headless_browser(tiny_run):
    from selenium.webdriver.common.by import By

    browser = _browser()
    try:
        browser.get((tiny_run / "report.html").as_uri())
        verdict = browser.find_element(By.ID, "verdict")
        assert verdict.is_displayed() and "latency" in verdict.text
        loaded = browser.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"
        )
        assert loaded == [True] * len(PICTURES)
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
    finally:
        browser.quit()
