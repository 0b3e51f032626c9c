"""The page in a real browser: Debian's Chromium driven headless by Selenium through Debian's chromedriver.

The browser must start: when it cannot, the test fails (scripts/test installs ``chromium`` and
``chromium-driver`` with apt).
"""

from __future__ import annotations

import shutil

import httpx2 as httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from reconad.serve import create_app
from reconad.serve.live import background_server

from .serve_fakes import FakePredictor, real_run

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_CANDIDATES = ("chromedriver", "chromium-driver")


def _which(names) -> str:
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if shutil.which(f"/usr/bin/{name}") else None)
        if path:
            return path
    pytest.fail(f"none of {names} is installed: apt-get install -y chromium chromium-driver (scripts/test does)")


def start_chromium(download_dir: str | None = None) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = _which(CHROMIUM_CANDIDATES)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    if download_dir:
        options.add_experimental_option("prefs", {"download.default_directory": download_dir,
                                                  "download.prompt_for_download": False})
    return webdriver.Chrome(options=options, service=Service(executable_path=_which(DRIVER_CANDIDATES)))


@pytest.fixture
def browser(tmp_path):
    driver = start_chromium(str(tmp_path / "downloads"))
    try:
        yield driver
    finally:
        driver.quit()


def write_images(folder, n: int = 4):
    """Images of rising redness: the fake model's score is their red maximum, so they sort and flip predictably."""
    folder.mkdir()
    paths = []
    for i in range(n):
        array = np.full((40, 48, 3), 30, np.uint8)
        array[10:20, 12:30, 0] = 60 + 50 * i
        path = folder / f"part{i}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def page_cards(driver) -> list[dict]:
    return [{"name": c.get_attribute("data-filename"),
             "score": float(c.find_element(By.CSS_SELECTOR, ".score").get_attribute("data-score")),
             "label": c.find_element(By.CSS_SELECTOR, ".label").text}
            for c in driver.find_elements(By.CSS_SELECTOR, "#gallery .card")]


def upload_and_wait(driver, base: str, paths) -> list[dict]:
    driver.get(base + "/")
    WebDriverWait(driver, 20).until(lambda d: "px" in d.find_element(By.ID, "model").text)
    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))
    WebDriverWait(driver, 30).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card.ready")) == len(paths))
    return page_cards(driver)


def test_page_uploads_shows_overlays_and_the_slider_flips_labels(browser, tmp_path):
    paths = write_images(tmp_path / "images")
    with background_server(create_app(FakePredictor())) as base:
        cards = upload_and_wait(browser, base, paths)
        api = httpx.post(base + "/predict", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths])
        api_by_name = {r["filename"]: r for r in api.json()["results"]}
        # the page shows the API's numbers and decisions, sorted by score (highest first)
        assert [c["score"] for c in cards] == sorted((r["score"] for r in api_by_name.values()), reverse=True)
        for card in cards:
            assert card["score"] == api_by_name[card["name"]]["score"]
            assert card["label"] == api_by_name[card["name"]]["label"]
        labels = {c["label"] for c in cards}
        assert labels == {"normal", "anomalous"}, labels  # the threshold 0.5 splits these images
        for img in browser.find_elements(By.CSS_SELECTOR, "#gallery img.overlay"):
            assert browser.execute_script("return arguments[0].naturalWidth", img) == 16
        assert browser.find_elements(By.CSS_SELECTOR, "#gallery img.region")  # the predicted region is drawn
        assert "linear-gradient" in browser.find_element(By.ID, "colorbar").value_of_css_property("background-image")
        browser.save_screenshot(str(tmp_path / "page_calibrated.png"))

        slider = browser.find_element(By.ID, "threshold")
        slider.send_keys(Keys.HOME)  # lowest threshold: every image above it
        assert {c["label"] for c in page_cards(browser)} == {"anomalous"}
        assert browser.find_element(By.ID, "counts").text.startswith(f"{len(paths)} of {len(paths)} anomalous")
        slider.send_keys(Keys.END)  # highest threshold: none
        assert {c["label"] for c in page_cards(browser)} == {"normal"}
        for _ in range(3):
            slider.send_keys(Keys.ARROW_LEFT)
        browser.find_element(By.ID, "reset-threshold").click()
        assert [c["label"] for c in page_cards(browser)] == [c["label"] for c in cards]
        browser.save_screenshot(str(tmp_path / "page_after_slider.png"))

        browser.find_element(By.ID, "download").click()
        csv_path = tmp_path / "downloads" / "reconad_results.csv"
        WebDriverWait(browser, 10).until(lambda _: csv_path.is_file() and csv_path.stat().st_size > 0)
        lines = csv_path.read_text().splitlines()
        assert lines[0] == "filename,score,normalised_score,threshold_normalised,label,calibrated_label"
        assert len(lines) == 1 + len(paths)
        assert float(lines[1].split(",")[1]) == cards[0]["score"]
    assert (tmp_path / "page_calibrated.png").stat().st_size > 10_000


def test_page_without_calibration_shows_no_decisions(browser, tmp_path):
    paths = write_images(tmp_path / "images", 2)
    with background_server(create_app(FakePredictor(calibrated=False))) as base:
        cards = upload_and_wait(browser, base, paths)
        assert {c["label"] for c in cards} == {"no decision (no calibration)"}
        assert "no calibration" in browser.find_element(By.ID, "calibration-note").text
        assert not browser.find_element(By.ID, "threshold").is_enabled()


def test_page_reports_a_rejected_file(browser, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not a png at all")
    with background_server(create_app(FakePredictor())) as base:
        browser.get(base + "/")
        WebDriverWait(browser, 20).until(lambda d: "px" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "files").send_keys(str(bad))
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#errors li"))
        text = browser.find_element(By.CSS_SELECTOR, "#errors li").text
        assert "notes.png" in text and "not an image" in text and "HTTP 400" in text


def test_page_on_a_real_calibrated_run_matches_the_api(browser, tmp_path_factory, tmp_path):
    from reconad.serve import app_for_path

    real = real_run(tmp_path_factory.mktemp("serve_real"))
    paths = sorted(real["test"].glob("*/*.png"))
    with background_server(app_for_path(real["run"])) as base:
        cards = upload_and_wait(browser, base, paths)
        api = httpx.post(base + "/predict", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths])
        want = sorted(((r["score"], r["label"]) for r in api.json()["results"]), reverse=True)
        assert [(c["score"], c["label"]) for c in cards] == want
        slider = browser.find_element(By.ID, "threshold")
        slider.send_keys(Keys.HOME)
        assert {c["label"] for c in page_cards(browser)} == {"anomalous"}
        slider.send_keys(Keys.END)
        assert {c["label"] for c in page_cards(browser)} == {"normal"}
        browser.find_element(By.ID, "reset-threshold").click()
        assert [c["label"] for c in page_cards(browser)] == [label for _, label in want]
        browser.save_screenshot(str(tmp_path / "page_real_run.png"))
        browser.get(base + "/results")
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "section.run img"))
        assert "image_auroc" in browser.find_element(By.ID, "tables").text
        browser.save_screenshot(str(tmp_path / "results_page.png"))
