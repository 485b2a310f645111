"""The playground at `/` in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
installed by `make browser`; skipped, with the reason shown, where they are missing): it asks for
the API key, sends a prompt, streams the answer with coloured accepted-draft spans and draws the
tau chart. The screenshot is kept as a test artefact (the test's tmp folder; with
SELFSPEC_SCREENSHOTS=1 also docs/img/playground.png, then over the real smollm2-135m when it is
installed)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from selfspec.server.app import ServerSettings
from showkit import Alternating, LiveServer, word_model

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
KEY = "playground-key"
SCREENSHOTS = os.environ.get("SELFSPEC_SCREENSHOTS") == "1"
# For the README picture: a prompt that the answer quotes (`make run`'s), so that drafts pay.
DOC_PROMPT = ("Summarise in two sentences: The city council met on Tuesday to discuss the new park on the old "
              "railway depot. Residents asked for more trees, a playground and longer opening hours in summer. "
              "Shop owners worried about parking. The council agreed to plant forty trees, to build the "
              "playground first and to study parking before the next meeting in May.")


def _browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.skip(f"browser test skipped: {', '.join(missing)} not installed (run `make browser`: "
                    f"Debian's chromium and chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("browser test skipped: selenium is not installed (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,900", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _served(tmp_path):
    """(model, drafter, prompt): the tiny random model with a drafter that is right k times on
    every other round; for the README screenshot, the real SmolLM2 with the default drafter."""
    if SCREENSHOTS:
        from selfspec.models.registry import REGISTRY

        if REGISTRY["smollm2-135m"].installed:
            from selfspec.drafters.factory import build_drafter
            from selfspec.models.loading import load_model

            model = load_model("smollm2-135m", ctx_size=1024)
            return model, build_drafter("auto", model), DOC_PROMPT
    return word_model(tmp_path), Alternating(k=4), "hello playground"


def test_playground_streams_coloured_tokens_and_draws_tau(tmp_path):
    driver = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    model, drafter, prompt = _served(tmp_path)
    settings = ServerSettings(model_id=model.name, api_key=KEY, draft_choices=("none", "ngram"))
    wait = WebDriverWait(driver, 60)
    try:
        with LiveServer(model, drafter, settings) as live:
            driver.get(live.url + "/")  # the page itself needs no key
            key_input = wait.until(EC.visibility_of_element_located((By.ID, "api-key")))
            key_input.send_keys(KEY)
            driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
            wait.until(EC.text_to_be_present_in_element((By.ID, "model-info"), model.name))
            assert not driver.find_element(By.ID, "key-form").is_displayed()
            assert driver.execute_script("return localStorage.length") == 0  # the key stays in the tab
            options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#draft option")]
            assert options == [drafter.name, "none", "ngram"]
            driver.find_element(By.ID, "max_tokens").clear()
            driver.find_element(By.ID, "max_tokens").send_keys("120" if SCREENSHOTS else "40")
            driver.find_element(By.ID, "prompt").send_keys(prompt)
            driver.find_element(By.ID, "send").click()
            done = wait.until(EC.presence_of_element_located(
                (By.CSS_SELECTOR, ".msg.assistant[data-state=done], .msg.assistant[data-state=error]")))
            assert done.get_attribute("data-state") == "done", done.text
            drafts = done.find_elements(By.CSS_SELECTOR, ".tok.draft")
            targets = done.find_elements(By.CSS_SELECTOR, ".tok.target, .tok.bonus, .tok.correction")
            assert drafts and targets, "no coloured accepted-draft spans"
            draft_bg, target_bg = (el.value_of_css_property("background-color") for el in (drafts[0], targets[0]))
            assert draft_bg != target_bg
            assert int(driver.find_element(By.ID, "chart").get_attribute("data-rounds")) > 1
            assert driver.find_element(By.ID, "stat-tau").text not in ("", "–")
            # Offline by construction: every resource the page loaded came from this server.
            hosts = driver.execute_script(
                "return performance.getEntriesByType('resource').map(e => new URL(e.name).host)")
            assert set(hosts) <= {f"127.0.0.1:{live.port}"}, hosts
            shot = tmp_path / "playground.png"
            driver.save_screenshot(str(shot))
            print(f"screenshot: {shot}")
            if SCREENSHOTS:
                (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, ROOT / "docs" / "img" / "playground.png")
    finally:
        driver.quit()
