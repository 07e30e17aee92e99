"""The chat page at `/`, driven in a real headless Chromium through selenium.

Needs Debian's `chromium` and `chromium-driver` (apt) and `selenium` (pip); the test skips,
saying why, when any of them is missing. Selenium gets the driver's path explicitly, so it never
tries to download one.
"""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi")

from gemmakit.inference.api import LLM  # noqa: E402
from gemmakit.inference.sampling import SamplingParams  # noqa: E402
from gemmakit.serving.app import create_app  # noqa: E402
from gemmakit.serving.config import ServerConfig  # noqa: E402
from gemmakit.serving.transport import serve_in_thread  # noqa: E402

NAME = "gemma-page-test"
TOKENS = 6
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _find(*names):
    return next((p for p in map(shutil.which, names) if p), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    chromium = _find("chromium", "chromium-browser")
    driver_path = _find("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server(bundled):
    llm = LLM(loaded=bundled)
    srv = serve_in_thread(create_app(llm, ServerConfig(served_model_name=NAME)))
    srv.llm = llm
    yield srv
    srv.stop()


def _wait(driver, condition, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))


def _text(driver, element) -> str:
    return driver.execute_script("return arguments[0].textContent", element)


def _assistant(driver, n: int):
    """The n-th (1-based) assistant bubble once its reply has finished streaming."""
    from selenium.webdriver.common.by import By

    def done(d):
        bubbles = d.find_elements(By.CSS_SELECTOR, ".message.assistant")
        if len(bubbles) >= n and bubbles[n - 1].get_attribute("data-state") in ("done", "error"):
            return bubbles[n - 1]
        return False

    bubble = _wait(driver, done)
    assert bubble.get_attribute("data-state") == "done", _text(driver, bubble)
    return bubble


def _say(driver, text: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)  # Enter sends; Shift+Enter would add a line


def test_chat_page_streams_a_multi_turn_conversation(browser, page_server):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(page_server.url + "/")
    _wait(d, lambda d: d.find_element(By.ID, "model").text == NAME, timeout=30)
    assert NAME in d.title

    # Greedy and short, so the page's replies can be checked against the Python API.
    d.find_element(By.CSS_SELECTOR, "#settings summary").click()
    for field, value in (("temperature", "0"), ("max-tokens", str(TOKENS))):
        box = d.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)

    greedy = SamplingParams(temperature=0, max_tokens=TOKENS)
    llm = page_server.llm

    _say(d, "Hello")
    first = _assistant(d, 1)
    reply = _text(d, first.find_element(By.CLASS_NAME, "text"))
    expected = llm.chat([{"role": "user", "content": "Hello"}], greedy)[0].outputs[0].text
    assert reply == expected and reply
    assert int(first.get_attribute("data-deltas")) >= 2  # it arrived in pieces, not at once
    assert "tokens/s" in first.find_element(By.CLASS_NAME, "stats").text  # usage chunk was read

    # The second turn carries the first exchange.
    _say(d, "Tell me more.")
    second = _assistant(d, 2)
    history = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Tell me more."},
    ]
    assert (
        _text(d, second.find_element(By.CLASS_NAME, "text")) == llm.chat(history, greedy)[0].outputs[0].text
    )

    # Clear empties the page and the history: the same first message gets the first reply.
    d.find_element(By.ID, "clear").click()
    assert d.find_elements(By.CSS_SELECTOR, ".message") == []
    _say(d, "Hello")
    assert _text(d, _assistant(d, 1).find_element(By.CLASS_NAME, "text")) == reply


def test_chat_page_asks_for_the_api_key(browser, bundled):
    from selenium.webdriver.common.by import By

    app = create_app(LLM(loaded=bundled), ServerConfig(served_model_name=NAME, api_key="k3y"))
    with serve_in_thread(app) as srv:
        browser.get(srv.url + "/")
        _wait(browser, lambda d: "API key" in d.find_element(By.ID, "status").text, timeout=30)
        assert browser.find_element(By.ID, "settings").get_attribute("open") is not None
        key = browser.find_element(By.ID, "api-key")
        key.send_keys("k3y")
        browser.find_element(By.ID, "max-tokens").click()  # leaving the field commits the key
        _wait(browser, lambda d: d.find_element(By.ID, "model").text == NAME, timeout=30)
