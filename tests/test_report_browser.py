"""report.html in headless Chromium (Selenium 4): no console error, nothing fetched from outside the
sweep's folder, one tile per job, a divider that moves, a zoom, a table that sorts, a page that is
not blank. One browser, so one test (pytest-xdist would start a browser per worker for several),
which runs a check function per behaviour; skipped where Chromium or chromedriver is not installed.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
from PIL import Image

from merger.report.html_report import write_html_report
from tests.test_html_report import sweep_summary

pytestmark = pytest.mark.slow  # starts a browser

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
BROWSER_OWN = frozenset({"chrome", "chrome-untrusted", "devtools", "about"})
MISSING = "headless Chromium not found: apt-get install chromium chromium-driver (see README)"

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
except ImportError:
    pytest.skip(MISSING + " (and pip install selenium)", allow_module_level=True)
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(MISSING, allow_module_level=True)


class Report:
    def __init__(self, driver: Any, page: Path, summary: dict[str, Any]) -> None:
        self.driver, self.page, self.summary = driver, page, summary

    def load(self) -> None:
        self.driver.get(self.page.as_uri())
        self.driver.execute_script("return document.readyState")

    def style(self, element_id: str, prop: str) -> str:
        script = "return getComputedStyle(document.getElementById(arguments[0]))[arguments[1]]"
        return str(self.driver.execute_script(script, element_id, prop))

    def first_column(self) -> list[str]:
        return [td.text for td in self.driver.find_elements(By.CSS_SELECTOR, "#metrics-table tbody td:first-child")]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Report]:
    root = tmp_path_factory.mktemp("browser")
    summary = sweep_summary(root, count=6, two_objectives=True)
    page = write_html_report(root / "sweep", summary, title="browser test")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,1400", f"--user-data-dir={root / 'profile'}",
    ):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(20)
        opened = Report(driver, page, summary)
        opened.load()
        yield opened
    finally:
        driver.quit()


def check_no_console_error_and_nothing_fetched_from_outside(report: Report) -> None:
    report.load()
    errors = [entry for entry in report.driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
    folder = report.page.parent.resolve()
    urls = []
    for entry in report.driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    assert any(url.endswith(".png") for url in urls)
    for url in urls:
        parsed = urlparse(url)
        if parsed.scheme in BROWSER_OWN or parsed.scheme == "data":  # the browser's new-tab page, inline images
            continue
        assert parsed.scheme == "file" and parsed.netloc == "", url
        assert Path(unquote(parsed.path)).resolve().is_relative_to(folder), url


def check_grid_compare_and_zoom(report: Report) -> None:
    driver = report.driver
    report.load()
    tiles = driver.find_elements(By.CSS_SELECTOR, "#grid .tile[data-job]")
    assert [t.get_attribute("data-job") for t in tiles] == [job["job"] for job in report.summary["jobs"]]
    assert len(driver.find_elements(By.CSS_SELECTOR, "#grid .tile.best .badge.best")) == 1
    assert len(driver.find_elements(By.CSS_SELECTOR, "#grid .tile.pareto")) == len(report.summary["pareto"])
    frame = driver.find_element(By.ID, "compare-frame")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", frame)
    assert driver.execute_script("return document.getElementById('compare-a-img').naturalWidth") > 0
    before = (report.style("compare-top", "clipPath"), report.style("divider", "left"))
    divider = driver.find_element(By.ID, "divider")
    ActionChains(driver).click_and_hold(divider).move_by_offset(-90, 0).release().perform()
    after = (report.style("compare-top", "clipPath"), report.style("divider", "left"))
    assert before[0].startswith("inset(") and after[0] != before[0] and after[1] != before[1]
    assert float(after[1].removesuffix("px")) < float(before[1].removesuffix("px"))
    ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(frame, 40, 0), 0, -400).perform()
    transforms = {report.style("compare-a-img", "transform"), report.style("compare-b-img", "transform")}
    assert len(transforms) == 1 and transforms != {"none"}  # one transform for both
    assert report.style("compare-a-img", "imageRendering") == "pixelated"
    select = driver.find_element(By.ID, "compare-image")
    values = [o.get_attribute("value") for o in select.find_elements(By.TAG_NAME, "option")]
    assert len(values) == 2
    options = [o.text for o in driver.find_elements(By.CSS_SELECTOR, "#compare-a option")]
    assert options[:2] == ["input, upscaled (bicubic)", "input, upscaled (nearest)"] and len(options) == 2 + 6


def check_metrics_table_sorts_on_a_header_click(report: Report) -> None:
    driver = report.driver
    report.load()
    jobs = report.summary["jobs"]
    assert report.first_column() == [job["job"] for job in jobs]
    header = driver.find_element(By.XPATH, "//table[@id='metrics-table']//th[.//button[text()='blend.ssim']]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", header)
    header.click()
    by_ssim = sorted(jobs[1:], key=lambda job: job["metrics"]["blend"]["ssim"])
    assert report.first_column() == [job["job"] for job in by_ssim] + [jobs[0]["job"]]  # None last
    header.click()
    assert report.first_column() == [job["job"] for job in reversed(by_ssim)] + [jobs[0]["job"]]
    assert header.get_attribute("aria-sort") == "descending"


def check_screenshot_is_not_blank(report: Report, tmp_path: Path) -> None:
    report.load()
    png = report.driver.get_screenshot_as_png()
    (tmp_path / "report.png").write_bytes(png)
    with Image.open(io.BytesIO(png)) as shot:
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20


def test_report_in_headless_chromium(report: Report, tmp_path: Path) -> None:
    check_no_console_error_and_nothing_fetched_from_outside(report)
    check_grid_compare_and_zoom(report)
    check_metrics_table_sorts_on_a_header_click(report)
    check_screenshot_is_not_blank(report, tmp_path)
    check_no_console_error_and_nothing_fetched_from_outside(report)  # after the interactions too
