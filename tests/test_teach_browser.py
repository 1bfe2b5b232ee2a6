"""The teaching page in a real browser (Debian's headless chromium, driven by selenium): type a prompt, get
a streamed reply, correct it, learn, and see the corrected answer come back, on a tiny model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the ui extra is not installed (pip install 'rllama[ui]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")

from tests.test_teach import new_teacher  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="no chromium and chromedriver on PATH (Debian: apt-get install chromium "
                                       "chromium-driver; .ci/run installs them)")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,860"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_correct_two_replies_learn_and_get_the_corrected_answer(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from rllama.teach import TeachServer

    teacher = new_teacher(tmp_path / "skills")
    wait = WebDriverWait(browser, 60)
    try:
        with TeachServer(teacher) as server:
            browser.get(server.url)
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
            browser.find_element(By.ID, "new-skill").click()
            alert = wait.until(ec.alert_is_present())
            alert.send_keys("zoggian")
            alert.accept()
            wait.until(lambda d: d.find_element(By.ID, "skill-select").get_attribute("value") == "zoggian")

            def ask(prompt: str) -> object:
                done = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
                box = browser.find_element(By.ID, "prompt")
                box.clear()
                box.send_keys(prompt)
                browser.find_element(By.ID, "send").click()
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == done + 1)
                return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")[-1]

            for count, prompt in enumerate(("hi", "hello"), 1):
                reply = ask(prompt)
                assert reply.find_element(By.CSS_SELECTOR, ".text").text not in ("", "zog")
                reply.find_element(By.CSS_SELECTOR, ".correct").click()
                edit = reply.find_element(By.CSS_SELECTOR, ".correction textarea")
                edit.clear()
                edit.send_keys("zog")
                reply.find_element(By.CSS_SELECTOR, ".save-correction").click()
                wait.until(lambda d, n=count: d.find_element(By.ID, "example-count").text == f"({n})")
            assert teacher.examples("zoggian") == [{"prompt": "hi", "response": "zog"},
                                                   {"prompt": "hello", "response": "zog"}]

            browser.find_element(By.ID, "learn").click()
            wait.until(lambda d: d.find_element(By.ID, "learn-status").get_attribute("data-state") == "done")
            assert browser.find_element(By.ID, "after").text == "zog"  # the probe: the last prompt, "hello"
            assert browser.find_element(By.ID, "error").text == ""
            reply = ask("hi")
            assert reply.find_element(By.CSS_SELECTOR, ".text").text == "zog"
            shot = os.environ.get("RLLAMA_TEACH_SCREENSHOT")
            if shot:
                browser.save_screenshot(str(Path(shot)))
    finally:
        teacher.close()
