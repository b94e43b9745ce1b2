"""The newcomer's path in a real browser: `deploybus up`, open the page, pick a
tag and a server, press Deploy, watch the rollout succeed, see the release on
the dashboard; the same pages on a phone; errors that name the field.
Chromium from Debian, driven by Playwright."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.browser.harness import PHONE, api_post, fits_the_width, screenshot, serve
from tests.conftest import free_port

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("up")
    port = free_port()
    server = serve([sys.executable, "-m", "deploybus.cli", "up", "--port", str(port),
                    "--data", str(data)], port)
    yield next(server), data
    next(server, None)


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
    # the verdict of `deploybus hosts`, with the daemons it rests on
    assert row.locator("td.verdict span").inner_text() == "up"
    assert row.locator("td.verdict small.detail").inner_text().startswith("agent ")
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


def test_empty_form_names_the_field(up, browser) -> None:  # noqa: ANN001
    base, _ = up
    page = browser.new_page()
    page.goto(base + "/")
    with page.expect_navigation():
        page.click("#deploy-button")
    assert page.locator(".error").inner_text() == "Tag or ref: enter a tag (like v1.2.3) or a ref"
    assert page.locator("#ref-error").is_visible()
    assert page.get_attribute("#ref", "aria-invalid") == "true"
    assert "1-200 characters" not in page.content()
    page.close()


def test_pages_fit_a_phone(up, browser, tmp_path: Path) -> None:  # noqa: ANN001
    """At 375 px the page never scrolls sideways (wide tables scroll in their
    card), the navigation leads back, and the deploy form is usable."""
    base, _ = up
    context = browser.new_context(viewport=PHONE)
    page = context.new_page()
    page.goto(base + "/")
    status, body = api_post(page, "/api/rollouts", {"project": "sample", "environment": "demo",
                                                   "ref": "v1.0.0"})
    assert status == 202, body
    page.goto(base + f"/rollouts/{body['rollout']}")
    page.wait_for_function("document.getElementById('state').textContent === 'succeeded'",
                           timeout=30000)
    assert page.locator("#progress").inner_text() == "1 of 1 host succeeded"
    assert page.locator("#log").inner_text()  # long lines wrap inside the card
    assert fits_the_width(page), "the rollout page scrolls sideways at 375 px"
    screenshot(page, tmp_path / "phone-rollout.png")

    page.click(".back a")
    page.wait_for_url(base + "/rollouts")
    row = page.locator(f"tr[data-rollout='{body['rollout']}']")
    assert row.locator(".state").inner_text() == "succeeded"
    assert fits_the_width(page), "the recent-rollouts page scrolls sideways at 375 px"

    page.click("header nav >> text=Dashboard")
    page.wait_for_url(base + "/")
    assert fits_the_width(page), "the dashboard scrolls sideways at 375 px"
    # the deploy form fits: every field and the button are inside the screen
    for sel in ("#project", "#ref", "#environment", "#deploy-button"):
        box = page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], sel
    screenshot(page, tmp_path / "phone-dashboard.png")
    context.close()


def test_refused_rollout_shows_its_reason_in_red(up, browser) -> None:  # noqa: ANN001
    base, _ = up
    page = browser.new_page()
    page.goto(base + "/")
    status, body = api_post(page, "/api/rollouts", {"project": "sample", "environment": "demo",
                                                   "ref": "v9.9.9"})
    assert status == 202, body
    page.goto(base + f"/rollouts/{body['rollout']}")
    # the orchestrator resolves the ref on the git server before it asks any
    # host: a tag that is not there refuses the rollout
    page.wait_for_function("document.getElementById('state').textContent === 'refused'",
                           timeout=30000)
    assert page.get_attribute("#state", "class") == "state state-refused"
    reason = page.locator("#reason")
    assert reason.is_visible() and reason.get_attribute("class") == "notice notice-error"
    assert "no tag or branch v9.9.9 in" in reason.inner_text()
    assert page.locator("#controls").is_hidden()
    page.close()


def test_rollouts_limit_that_is_not_a_number_is_400(up) -> None:  # noqa: ANN001
    base, _ = up
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/api/rollouts?limit=abc")
    assert err.value.code == 400
    assert "limit must be a whole number" in json.loads(err.value.read())["error"]
