"""The web page at / in a real headless browser (Debian's Chromium driven by Selenium through its ChromeDriver,
installed by scripts/setup.sh --test): it loads with no external asset, translates what is typed, translates an
uploaded file, and shows the server's error for bad input. PYENGINE_SCREENSHOT=path saves a screenshot (the
README's)."""
from __future__ import annotations

import os
import shutil
import urllib.request

import pytest

import pyengine
from benchmarks.load import ServerProcess

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):  # setup.sh --test installs both; say so plainly where they are missing
    pytest.fail("the browser test needs Debian's chromium and chromium-driver (scripts/setup.sh --test installs "
                "them)", pytrace=False)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server():
    with ServerProcess() as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,760", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_page_translates_typed_text(server, browser):
    engine = pyengine.Engine.load("default")
    text = "The directory could not be created. Close the window."
    want = engine.translate([text], split_sentences=True)[0]
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "target")).options) > 0)
    assert Select(browser.find_element(By.ID, "target")).first_selected_option.get_attribute("value") == "de"
    sources = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "source")).options]
    assert sources == ["auto", "en"]
    browser.find_element(By.ID, "text").send_keys(text)
    browser.find_element(By.ID, "translate").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "result"), want[:10]))
    assert browser.find_element(By.ID, "result").text == want
    assert browser.find_element(By.ID, "detected").text.startswith("Detected: en")
    if os.environ.get("PYENGINE_SCREENSHOT"):
        browser.save_screenshot(os.environ["PYENGINE_SCREENSHOT"])
    # every resource the page loaded came from the server itself
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(server.url) for u in urls)


def test_page_translates_a_file_and_shows_errors(server, browser, tmp_path):
    engine = pyengine.Engine.load("default")
    path = tmp_path / "notes.txt"
    path.write_text("Open the file.\nSave the changes!\n", encoding="utf-8")
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "target")).options) > 0)
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "file-translate").click()
    wait.until(lambda d: d.find_element(By.ID, "file-result").is_displayed())
    url = browser.find_element(By.ID, "file-result").get_attribute("href")
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.read().decode() == "\n".join(engine.translate(["Open the file.", "Save the changes!"])) + "\n"
    browser.find_element(By.ID, "html").click()
    browser.find_element(By.ID, "text").send_keys("<p>a <b>b</i></p>")
    browser.find_element(By.ID, "translate").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "error"), "bad HTML"))
    assert "</i> at line 1, column 10 has no open <i>" in browser.find_element(By.ID, "error").text
