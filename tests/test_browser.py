"""The web console in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium with the system's driver; nothing is
downloaded) against two real agents. Log in by the one-time link, see a pairing
request arrive without reloading, accept it, see the other site's write appear,
end a conflict by choosing a version; every page is screenshot (at a desktop and
a phone's width) into ``test-output/screenshots/``.

``scripts/test`` installs the browser and its driver (as root, with apt); where
they cannot be had the test is skipped, saying why."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agents import SpawnedAgent, cli, wait_for
from tests.httpclient import Api

pytestmark = pytest.mark.process

SHOTS = Path(__file__).parent.parent / "test-output" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

webdriver: Any
try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - scripts/test installs it
    webdriver = None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if webdriver is None:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install "
                    "chromium chromium-driver; scripts/test does it as root)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for downloads
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",  # nothing but the agent under test
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--window-size=1280,1000",
        f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}",
    ):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    except WebDriverException as exc:
        pytest.skip(f"headless chromium does not start here: {exc.msg}")
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver: Any, name: str) -> None:
    """A screenshot at a desktop's width, and one at a phone's."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    size = driver.get_window_size()
    driver.set_window_size(390, 844)
    try:
        driver.save_screenshot(str(SHOTS / f"{name}-phone.png"))
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth > window.innerWidth + 1"
        )
        assert not overflow, f"{name}: the page is wider than a phone's screen"
    finally:
        driver.set_window_size(size["width"], size["height"])


def until(driver: Any, condition: Any, timeout: float = 20) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except Exception:
        SHOTS.mkdir(parents=True, exist_ok=True)  # what the browser showed instead
        driver.save_screenshot(str(SHOTS / "failed.png"))
        (SHOTS / "failed.html").write_text(driver.page_source)
        raise


def labelled(driver: Any) -> None:
    """Every field a person fills in has a label (accessibility)."""
    for field in driver.find_elements(By.CSS_SELECTOR, "input, select, textarea"):
        if field.get_attribute("type") in ("hidden", "submit"):
            continue
        ident = field.get_attribute("id")
        assert ident and driver.find_elements(By.CSS_SELECTOR, f"label[for='{ident}']"), (
            f"a field without a label: {field.get_attribute('outerHTML')[:120]}"
        )


def test_the_console_in_a_browser(tmp_path: Path, browser: Any) -> None:
    hq = SpawnedAgent(tmp_path / "hq", "Head office").init()
    branch = SpawnedAgent(tmp_path / "branch", "Branch North").init()
    try:
        hq.start("--http", "127.0.0.1:0")
        branch.start()
        assert hq.http_url is not None
        api = Api.of(hq.http_url, hq.home)

        # log in with the one-time link `p2psync console` prints
        browser.get(f"{hq.http_url}/console/login")
        shoot(browser, "login")
        labelled(browser)
        browser.get(cli(hq.home, "console").strip())
        until(browser, seen.title_contains("Overview"))
        assert "Nothing: every peer is as it should be." in browser.page_source
        shoot(browser, "overview-empty")

        # a pairing request arrives while the page is open: it shows without a reload
        browser.get(f"{hq.http_url}/console/requests")
        until(browser, lambda d: "Live" in d.find_element(By.ID, "live-status").text)
        marker = browser.execute_script("window.notReloaded = true; return true")
        assert marker
        branch.pair(hq)
        request = until(browser, seen.presence_of_element_located((By.CSS_SELECTOR, ".request")))
        assert "Branch North asks" in request.text
        assert browser.execute_script("return window.notReloaded === true")
        labelled(browser)
        shoot(browser, "requests")

        # accept it, narrowed to stock, from the keyboard (a field with the focus is
        # never swapped away by a live update)
        collections = browser.find_element(By.CSS_SELECTOR, ".request input[name=collections]")
        collections.click()
        collections.send_keys("stock*")
        collections.send_keys(Keys.ENTER)  # submits the accept form
        notice = until(browser, seen.presence_of_element_located((By.CSS_SELECTOR, ".notice")))
        assert "paired with" in notice.text and "stock*" in notice.text
        wait_for(lambda: api.ok("GET", "/peers")["peers"][0]["connected"], timeout=20)

        # the other site writes: the record appears on the records page by itself
        api.ok("PUT", "/records/stock/S-0", {"qty": 0})
        browser.get(f"{hq.http_url}/console/records?collection=stock")
        until(browser, lambda d: "Live" in d.find_element(By.ID, "live-status").text)
        cli(branch.home, "put", "stock", "S-1", '{"qty": 7, "bin": "A-3"}')
        row = until(
            browser, seen.presence_of_element_located((By.CSS_SELECTOR, "[data-key='S-1']"))
        )
        assert '"qty": 7' in row.text
        shoot(browser, "records")

        browser.get(f"{hq.http_url}/console/peers")
        row = until(
            browser,
            seen.presence_of_element_located(
                (By.CSS_SELECTOR, f"[data-peer='{branch.device_id}']")
            ),
        )
        assert "Branch North" in row.text and "directly" in row.text
        shoot(browser, "peers")
        browser.get(f"{hq.http_url}/console/rules")
        labelled(browser)
        assert "stock*" in browser.page_source
        shoot(browser, "rules")

        # a conflict: both sites change S-2 while apart; keep the branch's version
        branch.stop()
        api.ok("PUT", "/records/stock/S-2", "head office's")
        cli(branch.home, "put", "stock", "S-2", '"branch\'s"')
        browser.get(f"{hq.http_url}/console/conflicts")
        until(browser, lambda d: "Live" in d.find_element(By.ID, "live-status").text)
        assert "No record is in conflict" in browser.page_source
        branch.start()
        section = until(
            browser,
            seen.presence_of_element_located((By.CSS_SELECTOR, "[data-record='stock/S-2']")),
        )
        labelled(browser)
        shoot(browser, "conflicts")
        versions = section.find_elements(By.CSS_SELECTOR, ".version")
        assert len(versions) == 2
        theirs = next(v for v in versions if "branch's" in v.text)
        theirs.find_element(By.CSS_SELECTOR, "button.keep").click()
        notice = until(browser, seen.presence_of_element_located((By.CSS_SELECTOR, ".notice")))
        assert "kept the version of Branch North" in notice.text
        assert "No record is in conflict" in browser.page_source
        assert api.ok("GET", "/records/stock/S-2")["value"] == "branch's"
        wait_for(lambda: branch.db().get("stock", "S-2") == "branch's", timeout=20)

        browser.get(f"{hq.http_url}/console/")
        until(browser, seen.title_contains("Overview"))
        shoot(browser, "overview")
        # the page never asked anything of another origin
        origins = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert all(name.startswith(hq.http_url) for name in origins), origins
    finally:
        branch.stop()
        hq.stop()
