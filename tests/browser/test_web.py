"""The newcomer's path in a real browser: `deploybus up`, open the page, pick a
tag and a server, press Deploy, watch the rollout succeed, see the release on
the dashboard. Chromium from Debian, driven by Playwright."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("up")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deploybus.cli", "up", "--port", str(port),
                             "--data", str(data)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"deploybus up did not come up:\n{proc.stdout.read()}")
        time.sleep(0.3)
    yield base, data
    proc.terminate()
    assert proc.wait(30) == 0, "warm stop of deploybus up exits 0"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium "
                    "(apt-get install chromium)", pytrace=False)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_healthz_reports_ok(up) -> None:  # noqa: ANN001
    base, _ = up
    with urllib.request.urlopen(base + "/healthz") as r:
        body = json.loads(r.read())
    assert body["ok"] is True


def test_deploy_from_the_web_page_lands(up, browser, tmp_path: Path) -> None:  # noqa: ANN001
    base, data = up
    page = browser.new_page()
    page.goto(base + "/")
    # The tag picker offers the sample's tags with their commits.
    options = page.locator("datalist#tags option").evaluate_all("os => os.map(o => o.value)")
    assert {"v1.0.0", "v1.1.0"} <= set(options)
    page.select_option("#project", "sample")
    page.fill("#ref", "v1.0.0")
    page.select_option("#environment", "demo")
    page.check("input[name=hosts][value=local]")
    page.click("#deploy-button")
    page.wait_for_url("**/rollouts/*")
    page.wait_for_function("document.getElementById('state').textContent === 'succeeded'",
                           timeout=30000)
    assert page.locator("#steps tr[data-host=local] td").nth(1).inner_text() == "succeeded"
    log = page.locator("#log").inner_text()
    assert "preparing sample v1.0.0 for web" in log
    assert "looks complete" in log
    page.screenshot(path=str(tmp_path / "rollout.png"))
    current = data / "deploy" / "sample" / "current"
    assert (current / "VERSION").read_text() == "1.0.0\n"
    # Within a few heartbeats the dashboard shows what runs where.
    deadline = time.monotonic() + 20
    while True:
        page.goto(base + "/")
        row = page.locator("#hosts tr[data-host=local]")
        if "v1.0.0" in row.inner_text():
            break
        assert time.monotonic() < deadline, row.inner_text()
        time.sleep(1)
    assert row.locator("td").nth(2).inner_text() == "up"
    assert os.readlink(current).endswith(row.locator("td.release").inner_text())
    page.close()


def test_bad_ref_is_refused_with_a_clear_message(up, browser) -> None:  # noqa: ANN001
    base, _ = up
    page = browser.new_page()
    page.goto(base + "/")
    page.fill("#ref", "--upload-pack=touch /tmp/pwned")
    page.click("#deploy-button")
    assert "may not start with or contain" in page.locator(".error").inner_text()
    page.close()


def test_form_without_csrf_token_is_rejected(up) -> None:  # noqa: ANN001
    base, _ = up
    req = urllib.request.Request(base + "/deploy", data=b"project=sample&environment=demo&ref=v1.0.0",
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 400
