"""The station's page in a real browser (Debian's headless Chromium via selenium) against the real server:
log in by typing the key, drop an image, see the decision and the heatmap, teach a good part, see the
version change and the image's score drop, undo, see it restored; the guard asks before learning a
defect; a wrong key shows a clear message."""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image
from test_station import AUTH, OPERATOR_KEY, _app, _fresh_model, _wait_station, setup  # noqa: F401

from patchcore.deploy.inference import Predictor

pytestmark = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")), reason="no chromium"
)


def _driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_station_page_login_feedback_and_undo_in_headless_chromium(setup, tmp_path):  # noqa: F811
    from _deploy import running_server
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    model = _fresh_model(setup, tmp_path)
    good, bad = setup["images"]["good"][0], setup["images"]["bad"][0]
    expected = Predictor.load(model, device="cpu").predict([good, bad])
    with running_server(_app(setup, model, tmp_path / "station")) as url:
        _wait_station(url)
        driver = _driver()
        wait = WebDriverWait(driver, 60)
        text = lambda element_id: driver.find_element(By.ID, element_id).text  # noqa: E731
        try:
            driver.get(f"{url}/")
            wait.until(ec.visibility_of_element_located((By.ID, "login-box")))
            assert not driver.find_element(By.ID, "station").is_displayed()

            # A wrong key: a clear message, still logged out, nothing kept.
            driver.find_element(By.ID, "key").send_keys("not-the-key-at-all-12345")
            driver.find_element(By.ID, "login").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "login-error"), "Wrong key"))
            assert not driver.find_element(By.ID, "station").is_displayed()
            assert driver.execute_script("return sessionStorage.length") == 0

            # The right key: the station, the model's version; the key only in this tab's session storage.
            driver.find_element(By.ID, "key").send_keys(OPERATOR_KEY)
            driver.find_element(By.ID, "login").click()
            wait.until(ec.visibility_of_element_located((By.ID, "station")))
            wait.until(lambda d: text("version") == "0")
            assert OPERATOR_KEY not in driver.current_url
            assert driver.execute_script("return localStorage.length") == 0
            assert OPERATOR_KEY in driver.execute_script("return Object.values(sessionStorage)")

            # Drop an image (the file input): decision, score, heatmap, and the recent list.
            driver.find_element(By.ID, "file").send_keys(str(good))
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "scored"))
            assert text("decision") == ("ANOMALOUS" if expected[0].anomalous else "GOOD")
            first = float(text("score"))
            assert first == pytest.approx(expected[0].score, rel=1e-3)
            heat = driver.find_element(By.ID, "heatmap")
            assert heat.get_attribute("src").startswith("data:image/png;base64,")
            assert driver.execute_script("return arguments[0].naturalWidth", heat) == 48
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#recent tr")) == 1)

            # "Good part": the model learns it, the version changes, the image scores lower.
            driver.find_element(By.ID, "good").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "now version 1"))
            wait.until(lambda d: text("version") == "1")
            assert "version 1" in text("rescored")
            lower = float(text("rescored").split()[2])
            assert lower < first
            # Undo: back to version 0, the image scores as before.
            driver.find_element(By.ID, "undo").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "undone"))
            wait.until(lambda d: text("version") == "0")
            restored = float(text("rescored").split()[2])
            assert restored == pytest.approx(first, rel=1e-3)

            # A defect taught as good: the guard asks the operator first.
            driver.find_element(By.ID, "file").send_keys(str(bad))
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), f"{bad.name} scored"))
            assert text("decision") == "ANOMALOUS"
            driver.find_element(By.ID, "good").click()
            wait.until(ec.alert_is_present())
            alert = driver.switch_to.alert
            assert "refused" in alert.text
            alert.dismiss()
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "not added"))
            assert text("version") == "0"

            # Filter: anomalous only.
            driver.find_element(By.ID, "only-anomalous").click()
            wait.until(
                lambda d: all("ANOMALOUS" in r.text for r in d.find_elements(By.CSS_SELECTOR, "#recent tr"))
            )
            assert driver.find_element(By.ID, "drift-plot").find_elements(By.TAG_NAME, "circle")
            shot = tmp_path / "station.png"
            driver.save_screenshot(str(shot))
            keep = os.environ.get("PATCHCORE_SCREENSHOT")
            if keep:
                shutil.copy(shot, keep)
            assert Image.open(shot).size[0] > 0

            # Log out: the key is gone, the login form is back.
            driver.find_element(By.ID, "logout").click()
            wait.until(ec.visibility_of_element_located((By.ID, "login-box")))
            assert driver.execute_script("return sessionStorage.length") == 0
        finally:
            driver.quit()
