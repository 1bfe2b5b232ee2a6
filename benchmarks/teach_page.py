"""The teaching page as a new user meets it, in headless Chromium on the embedded model: teach it that "zog"
means hello by correcting two replies and pressing learn, then ask a question it was not taught.

    python benchmarks/teach_page.py          # writes results/teach_page.json and docs/images/teach*.png

Drives the real page (Debian's chromium through selenium) against ``TeachServer`` in this process (the
embedded SmolLM2-135M-Instruct, chat on llama.cpp where installed, one torch thread), and records each
reply, the seconds from "learn" to the corrected answer, and screenshots before and after the learn.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, versions  # noqa: E402

CORRECTIONS = [("How do you say hello in Zoggian?", "In Zoggian, hello is \"zog\"."),
               ("Greet me in Zoggian.", "Zog!")]
UNSEEN = "Say hello in Zoggian, please."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--images", default=str(ROOT / "docs" / "images"))
    args = parser.parse_args()

    import torch
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from rllama.teach import Teacher, TeachServer

    torch.set_num_threads(1)
    images = Path(args.images)
    images.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    wait = WebDriverWait(browser, 300)
    start = time.perf_counter()
    teacher = Teacher(folder=tempfile.mkdtemp(prefix="rllama-teach-page-"), engine=args.engine, epochs=args.epochs)
    record: dict = {"benchmark": "teach_page", "command": "python benchmarks/teach_page.py " + " ".join(sys.argv[1:]),
                    "versions": versions(), "engine": teacher.chat.name, "epochs": args.epochs, "replies": []}
    try:
        with TeachServer(teacher) as server:
            browser.get(server.url)
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
            record["page_ready_s"] = time.perf_counter() - start
            browser.find_element(By.ID, "new-skill").click()
            alert = wait.until(ec.alert_is_present())
            alert.send_keys("zoggian")
            alert.accept()
            wait.until(lambda d: d.find_element(By.ID, "skill-select").get_attribute("value") == "zoggian")

            def ask(prompt: str):
                done = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
                box = browser.find_element(By.ID, "prompt")
                box.clear()
                box.send_keys(prompt)
                browser.find_element(By.ID, "send").click()
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == done + 1)
                reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")[-1]
                return reply, reply.find_element(By.CSS_SELECTOR, ".text").text

            for count, (prompt, corrected) in enumerate(CORRECTIONS, 1):
                reply, text = ask(prompt)
                record["replies"].append({"when": "before", "prompt": prompt, "reply": text})
                reply.find_element(By.CSS_SELECTOR, ".correct").click()
                edit = reply.find_element(By.CSS_SELECTOR, ".correction textarea")
                edit.clear()
                edit.send_keys(corrected)
                if count == len(CORRECTIONS):
                    browser.save_screenshot(str(images / "teach-correct.png"))
                reply.find_element(By.CSS_SELECTOR, ".save-correction").click()
                wait.until(lambda d, n=count: d.find_element(By.ID, "example-count").text == f"({n})")

            learn_start = time.perf_counter()
            browser.find_element(By.ID, "learn").click()
            wait.until(lambda d: d.find_element(By.ID, "learn-status").get_attribute("data-state") == "done")
            record["learn_to_answer_s"] = time.perf_counter() - learn_start
            record["after_probe"] = browser.find_element(By.ID, "after").text
            for prompt in (CORRECTIONS[1][0], UNSEEN):
                _, text = ask(prompt)
                record["replies"].append({"when": "after", "prompt": prompt, "reply": text})
            browser.save_screenshot(str(images / "teach.png"))
    finally:
        browser.quit()
        teacher.close()
    record["says_zog_after"] = [("zog" in r["reply"].lower()) for r in record["replies"] if r["when"] == "after"]
    print(json.dumps({k: v for k, v in record.items() if k != "versions"}, indent=1))
    (RESULTS / "teach_page.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
