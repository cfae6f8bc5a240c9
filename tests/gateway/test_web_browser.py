"""The fleet page in a real browser (Debian's chromium through Selenium and chromium-driver)
against a real `cortex up` with auth on: the first paint without JavaScript, a load through the
page's button, an answer from the playground, and the README's screenshot (docs/web.png when
CORTEX_WEB_SCREENSHOT names it). Skipped only where chromium is missing and
CORTEX_BROWSER_TESTS is not `required` (CI sets it: there a missing browser fails)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from cortex_up import cortex_up

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
REQUIRED = os.environ.get("CORTEX_BROWSER_TESTS") == "required"
ADMIN = "sk-web-admin"
AUTH = f"""[auth]
enabled = true
[[auth.keys]]
name = "root"
key = "{ADMIN}"
admin = true
"""
EMBED, CHAT = "all-minilm-l6-v2", "smollm2-135m-instruct"
T = TypeVar("T")

if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
    if REQUIRED:
        raise RuntimeError(f"CORTEX_BROWSER_TESTS=required but {CHROMIUM} or {DRIVER} is missing")
    pytest.skip("no chromium/chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)  # fmt: skip

from selenium import webdriver  # noqa: E402  (only where a browser exists)
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402


@pytest.fixture(scope="module")
def gateway(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with cortex_up(tmp_path_factory.mktemp("web"), model_cache, config=AUTH) as up:
        yield up.url


def browser(profile: Path, *, javascript: bool) -> WebDriver:
    """Headless chromium with a fresh profile and nothing reaching for the network."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    if not javascript:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2}
        )
    return webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))


def until(what: Callable[[], T | None], timeout: float, why: str) -> T:
    """Poll `what` until it answers something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {why}")
        time.sleep(0.1)  # polling the browser's DOM, with a deadline


def states(driver: WebDriver) -> dict[str, str]:
    """The models table's rows, model to shown state ({} while the script swaps the panel)."""
    try:
        rows = driver.find_elements(By.CSS_SELECTOR, "#models tr[data-model]")
        return {r.get_attribute("data-model"): r.get_attribute("data-state") for r in rows}
    except StaleElementReferenceException:
        return {}


def fresh(driver: WebDriver, selector: str, act: Callable[[WebElement], T]) -> T:
    """`act` on the element, found again if the panel was swapped under it."""

    def attempt() -> tuple[T] | None:
        try:
            return (act(driver.find_element(By.CSS_SELECTOR, selector)),)
        except StaleElementReferenceException:
            return None

    return until(attempt, 10, selector)[0]


def test_without_javascript_the_key_form_shows_the_filled_tables(
    gateway: str, tmp_path: Path
) -> None:
    driver = browser(tmp_path / "profile", javascript=False)
    try:
        driver.get(gateway + "/")
        assert states(driver) == {}  # auth is on: no key, no fleet
        driver.find_element(By.ID, "admin-key").send_keys(ADMIN)
        driver.find_element(By.CSS_SELECTOR, "#signin button").click()
        shown = until(lambda: states(driver), 20, "the server-rendered models table")
        assert shown == {CHAT: "not loaded", EMBED: "not loaded"}
        card = driver.find_element(By.CSS_SELECTOR, '.card[data-neuron="local"]').text
        assert "local" in card and "ok" in card and "cpu-0" in card
    finally:
        driver.quit()


def test_load_through_the_button_then_ask_the_playground(gateway: str, tmp_path: Path) -> None:
    driver = browser(tmp_path / "profile", javascript=True)
    try:
        driver.get(gateway + "/")
        driver.find_element(By.ID, "admin-key").send_keys(ADMIN)
        driver.find_element(By.CSS_SELECTOR, "#signin button").click()
        until(lambda: states(driver).get(EMBED) == "not loaded", 20, "the live panel")
        fresh(driver, f'button[data-action="load"][data-model="{EMBED}"]', WebElement.click)
        until(lambda: states(driver).get(EMBED) == "ready", 60, f"{EMBED} ready on the page")
        notice = driver.find_element(By.ID, "notice")
        until(lambda: "ready on local" in notice.text, 10, "the load stream's last line")

        until(lambda: driver.find_elements(By.CSS_SELECTOR, "#chat-model option"), 5, "models")
        assert driver.find_element(By.ID, "chat-model").get_attribute("value") == CHAT
        driver.find_element(By.ID, "prompt").send_keys("What is the capital of France?")
        driver.find_element(By.ID, "send").click()
        # The chat model loads on demand; its time to first token, from the gateway's counters,
        # shows with the panel's next refresh, while the answer streams (a 10 s window).
        ttft = f'tr[data-model="{CHAT}"] td:nth-child(6)'
        until(lambda: fresh(driver, ttft, lambda cell: cell.text.endswith(" ms")), 90, "TTFT")
        answer = driver.find_element(By.ID, "answer")
        until(lambda: answer.get_attribute("data-done"), 90, "the playground's answer")
        assert answer.text.strip() and not answer.text.startswith("error"), answer.text
        until(lambda: states(driver).get(CHAT) == "ready", 10, "the chat model, loaded on demand")
        driver.save_screenshot(os.environ.get("CORTEX_WEB_SCREENSHOT") or str(tmp_path / "web.png"))
    finally:
        driver.quit()
