"""The web answers only to the host names it is configured with, and no page
or API answer carries a credential.

DNS rebinding: a hostile page makes a browser resolve its own name to the
deploybus web's address; the browser then sends the page's requests to the
web with ``Host: evil.example`` (and cookies it holds for that name). The
web must answer those with 400 and do nothing. Through Flask's test client,
with the app built as ``tests/browser/test_api.py`` builds it."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import text

from deploybus.errors import ConfigError
from deploybus.frontend.app import create_app
from deploybus.runner import Context
from tests.browser.test_api import Web

pytestmark = pytest.mark.unit

#: The secret every test here tries to leak.
TOKEN = "ghp_" + "S3cr3tT0k3n" * 3


def session_headers(web: Web, host: str) -> dict[str, str]:
    """What a browser holding the web's session sends with a page's request
    when it believes it talks to ``host``: the session cookie, the CSRF token
    read from the page, and that Host."""
    cookie = web.client.get_cookie("session")
    assert cookie is not None
    return {"Host": host, "Cookie": f"session={cookie.value}", "X-CSRF-Token": web.csrf}


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    w = Web(tmp_path)
    yield w
    w.bus.close()


def test_a_deploy_with_another_host_is_refused_and_nothing_is_sent(web: Web) -> None:
    browser = web.app.test_client(use_cookies=False)
    body = {"project": "app", "environment": "prod", "ref": "v1"}
    r = browser.post("/api/rollouts", json=body, headers=session_headers(web, "evil.example"))
    assert r.status_code == 400
    assert "does not answer to the host name 'evil.example'" in r.get_json()["error"]
    assert "web.allowed_hosts" in r.get_json()["error"]
    rid = web.rollout("running")
    r = browser.post(f"/api/rollouts/{rid}/control", json={"action": "abort"},
                     headers=session_headers(web, "evil.example:8080"))
    assert r.status_code == 400
    r = browser.post("/deploy", data={"csrf": web.csrf, **body},
                     headers=session_headers(web, "evil.example"))
    assert r.status_code == 400
    assert not web.rollouts.items and not web.controls.items
    # the very same request, by a name the web answers to, is a deploy: the
    # refusal above was the Host and nothing else
    r = browser.post("/api/rollouts", json=body, headers=session_headers(web, "127.0.0.1:8080"))
    assert r.status_code == 202, r.get_json()
    assert len(web.rollouts.wait()) == 1


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "localhost.evil.example",
                                  "127.0.0.1.nip.io", "10.0.0.1", "[::1]:8080", "0.0.0.0:8080"])
def test_pages_and_api_refuse_another_host(web: Web, host: str) -> None:
    r = web.client.get("/", headers={"Host": host})
    assert r.status_code == 400
    assert "web.allowed_hosts" in r.get_data(as_text=True)
    r = web.client.get("/api/hosts", headers={"Host": host})
    assert r.status_code == 400 and "web.allowed_hosts" in r.get_json()["error"]
    assert web.client.get("/healthz", headers={"Host": host}).status_code == 400


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1", "127.0.0.1:5000"])
def test_the_default_names_are_answered_on_any_port(web: Web, host: str) -> None:
    assert web.client.get("/", headers={"Host": host}).status_code == 200
    assert web.client.get("/api/rollouts", headers={"Host": host}).status_code == 200


def test_configured_names_replace_the_defaults(tmp_path: Path) -> None:
    w = Web(tmp_path, extra="web:\n  allowed_hosts: [deploy.example.com, 10.1.2.3]\n")
    try:
        assert w.config.web_allowed_hosts == ["deploy.example.com", "10.1.2.3"]
        for host in ("deploy.example.com", "deploy.example.com:8443", "10.1.2.3:8080"):
            assert w.client.get("/api/hosts", headers={"Host": host}).status_code == 200
        for host in ("localhost", "127.0.0.1:8080", "example.com", "x.deploy.example.com"):
            assert w.client.get("/api/hosts", headers={"Host": host}).status_code == 400
    finally:
        w.bus.close()


def test_an_empty_list_is_refused_not_read_as_any_host(web: Web) -> None:
    web.config.web_allowed_hosts = []
    ctx = Context(config=web.config, bus=web.bus, host="web1", signing_key=None)
    with pytest.raises(ConfigError, match="web.allowed_hosts"):
        create_app(ctx, web.store)


# -- no credential in any answer -------------------------------------------------------

def get_routes(app: Flask, rollout: str) -> list[str]:
    """Every GET route of the app, its parameters filled in."""
    values = {"rollout": rollout, "filename": "style.css"}
    return [re.sub(r"<(?:\w+:)?(\w+)>", lambda m: values[m[1]], rule.rule)
            for rule in app.url_map.iter_rules() if "GET" in (rule.methods or ())]


def test_no_page_or_api_answer_carries_a_credential(tmp_path: Path) -> None:
    git = f"https://ci:{TOKEN}@127.0.0.1:1/acme/app.git"
    w = Web(tmp_path, git=git)
    try:
        rid = w.rollout("failed", steps={"h1": "failed", "h2": "skipped"})
        reason = f"fatal: unable to access '{git}/': Failed to connect to 127.0.0.1 port 1"
        # as a database written before redaction (or by an older daemon) holds them
        with w.store.engine.begin() as conn:
            conn.execute(text("UPDATE rollouts SET reason = :r WHERE id = :id"),
                         {"r": reason, "id": rid})
            conn.execute(text("UPDATE host_steps SET message = :r WHERE rollout_id = :id"),
                         {"r": reason, "id": rid})
            conn.execute(text("INSERT INTO rollout_logs (rollout_id, host, step, at, text) "
                              "VALUES (:id, 'h1', 'fetch', CURRENT_TIMESTAMP, :r)"),
                         {"r": f"git fetch https://{TOKEN}@github.com/acme/app.git", "id": rid})
        w.store.record_presence("h1", {"interval": 5, "note": f"mirror of {git}"})
        paths = get_routes(w.app, rid)
        assert {"/", "/rollouts", f"/rollouts/{rid}", "/api/projects", "/api/rollouts",
                f"/api/rollouts/{rid}", "/api/hosts", "/healthz"} <= set(paths)
        seen: dict[str, Any] = {}
        for path in paths:
            r = w.client.get(path)
            assert r.status_code < 500, (path, r.status_code)
            body = r.get_data(as_text=True)
            assert TOKEN not in body, path
            seen[path] = body
        assert "https://ci:***@127.0.0.1:1/acme/app.git" in seen["/api/projects"]
        assert "fatal: unable to access &#39;https://ci:***@127.0.0.1:1" in seen[f"/rollouts/{rid}"]
        assert "git fetch https://***@github.com/acme/app.git" in seen[f"/api/rollouts/{rid}"]
        # and the failed deploy's form page
        r = w.client.post("/deploy", data={"csrf": w.csrf, "project": "app",
                                           "environment": "prod", "ref": ""})
        assert r.status_code == 400 and TOKEN not in r.get_data(as_text=True)
    finally:
        w.bus.close()


def test_the_projects_api_shows_git_urls_without_their_secret(tmp_path: Path) -> None:
    for git, shown in [(f"https://{TOKEN}@github.com/acme/app.git",
                        "https://***@github.com/acme/app.git"),
                       (f"https://oauth2:{TOKEN}@gitlab.example/acme/app.git",
                        "https://oauth2:***@gitlab.example/acme/app.git"),
                       ("git@github.com:acme/app.git", "git@github.com:acme/app.git")]:
        w = Web(tmp_path / uuid.uuid4().hex, git=git)
        try:
            projects = {p["name"]: p for p in w.client.get("/api/projects").get_json()}
            assert projects["app"]["git"] == shown
        finally:
            w.bus.close()
