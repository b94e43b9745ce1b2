"""Steering a rollout from its page in a real browser: a canary that waits
for promote, a pause, an abort.

A canary pauses only when a later phase follows it, so these tests run
`deploybus up` with a second host in environment ``demo`` (it starts the
daemons of every host its config names: two real agents). Project
``slow`` (the sample repository, a pre script that sleeps 5 s) keeps a
rollout running long enough to pause it between its hosts.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.sync_api import expect

from deploybus.cli import allinone
from deploybus.signing import SigningKey
from tests.browser.harness import PHONE, api_post, fits_the_width, screenshot, serve
from tests.conftest import free_port

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def two_host_config() -> str:
    """`deploybus up`'s config with a second host in demo and project slow."""
    cfg = yaml.safe_load(allinone.CONFIG)
    cfg["hosts"]["second"] = {"root": "deploy-second", "state_dir": "state/second",
                              "heartbeat": 3, "signing": "keys/second.key"}
    cfg["keys"]["trusted"]["second"] = {"key": "keys/second.pub", "role": "host"}
    cfg["projects"]["slow"] = {"git": "git/sample.git", "scripts": {"pre": "sleep 5"}}
    cfg["environments"]["demo"]["hosts"] = ["local", "second"]
    return yaml.safe_dump(cfg, sort_keys=False)


@pytest.fixture(scope="module")
def up2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    data = tmp_path_factory.mktemp("up2")
    SigningKey.generate("second").save(data / "keys")  # the second host's own key
    (data / "deploybus.yaml").write_text(two_host_config())
    port = free_port()
    server = serve([sys.executable, "-m", "deploybus.cli", "up", "--port", str(port),
                    "--data", str(data)], port)
    yield next(server), data
    next(server, None)


def start(page: Any, base: str, **body: Any) -> str:
    """Start a rollout through the JSON API and open its page; returns its id."""
    page.goto(base + "/")
    status, answer = api_post(page, "/api/rollouts", {"environment": "demo", **body})
    assert status == 202, answer
    page.goto(base + f"/rollouts/{answer['rollout']}")
    return str(answer["rollout"])


def wait_state(page: Any, state: str, timeout: float = 30000) -> None:
    page.wait_for_function(f"document.getElementById('state').textContent === {state!r}",
                           timeout=timeout)


def visible_controls(page: Any) -> list[str]:
    return [b for b in ("promote", "resume", "pause", "abort")
            if page.locator(f"#{b}-button").is_visible()]


def test_paused_canary_is_promoted_from_its_page(up2, browser, tmp_path: Path) -> None:  # noqa: ANN001
    base, data = up2
    context = browser.new_context(viewport=PHONE, permissions=["clipboard-read",
                                                               "clipboard-write"])
    page = context.new_page()
    rid = start(page, base, project="sample", ref="v1.1.0",
                strategy={"canary": 1, "pause": "promote"})
    wait_state(page, "paused")
    reason = page.locator("#reason")
    assert reason.inner_text() == "canary done; promote to continue, abort to stop"
    assert reason.get_attribute("class") == "notice notice-info", "a pause is not an error"
    assert page.locator(".error").count() == 0
    assert page.get_attribute("#state", "class") == "state state-paused"
    assert page.locator("#progress").inner_text() == "1 of 2 hosts succeeded"
    assert visible_controls(page) == ["promote", "abort"]
    promote = page.locator(".command[data-action=promote]")
    assert promote.locator("input").input_value() == f"deploybus promote {rid}"
    assert page.locator(".command[data-action=abort] input").input_value() == \
        f"deploybus abort {rid}"
    assert page.locator(".command[data-action=resume]").is_hidden()
    promote.locator("button.copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == f"deploybus promote {rid}"
    assert fits_the_width(page), "the paused rollout page scrolls sideways at 375 px"
    screenshot(page, tmp_path / "phone-paused.png")

    page.click("#promote-button")
    expect(page.locator("#control-sent")).to_contain_text("promote sent to the orchestrator")
    wait_state(page, "succeeded")
    assert page.locator("#progress").inner_text() == "2 of 2 hosts succeeded"
    assert "control: promote by web: promoted" in page.locator("#log").inner_text()
    assert page.locator("#controls").is_hidden() and reason.is_hidden()
    for root in ("deploy", "deploy-second"):
        assert (data / root / "sample" / "current" / "VERSION").read_text() == "1.1.0\n"
    context.close()


def test_running_rollout_is_paused_then_aborted(up2, browser, tmp_path: Path) -> None:  # noqa: ANN001
    base, _ = up2
    page = browser.new_page()
    rid = start(page, base, project="slow", ref="v1.0.0")
    # the first host sleeps in its pre script; the second waits its turn
    page.locator("#pause-button").wait_for(state="visible", timeout=30000)
    assert visible_controls(page) == ["pause", "abort"]
    assert page.locator(".command[data-action=pause] input").input_value() == \
        f"deploybus pause {rid}"
    page.click("#pause-button")
    wait_state(page, "paused")
    assert page.get_attribute("#reason", "class") == "notice notice-info"
    assert "resume" in page.locator("#reason").inner_text()
    assert visible_controls(page) == ["resume", "abort"]
    assert page.locator(".command[data-action=resume] input").input_value() == \
        f"deploybus resume {rid}"

    page.click("#abort-button")
    wait_state(page, "aborted")
    assert page.get_attribute("#state", "class") == "state state-aborted"
    assert page.get_attribute("#reason", "class") == "notice notice-neutral"
    assert page.locator("#reason").inner_text() == "aborted by web"
    assert page.locator("#progress").inner_text() == "1 of 2 hosts succeeded"
    assert page.locator("#steps tr[data-host=second] td").nth(1).inner_text() == "skipped"
    log = page.locator("#log").inner_text()
    assert "control: pause by web" in log and "control: abort by web" in log
    # aborted is final: the page stops asking
    asked: list[str] = []
    page.on("request", lambda req: asked.append(req.url) if "/api/rollouts/" in req.url
            else None)
    time.sleep(2)
    assert asked == []
    screenshot(page, tmp_path / "aborted.png")
    page.close()

    # A final rollout cannot be steered: 409, and no button on its page.
    page = browser.new_page()
    page.goto(base + f"/rollouts/{rid}")
    status, answer = api_post(page, f"/api/rollouts/{rid}/control", {"action": "resume"})
    assert status == 409 and "aborted" in answer["error"]
    assert page.locator("#controls").is_hidden()
    page.close()
