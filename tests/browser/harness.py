"""Helpers of the browser tests: start a `deploybus up`-like process and wait
until its web answers; check a page fits a phone; screenshots; the JSON API
from inside a page."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

#: A phone: the width the pages must fit without scrolling sideways.
PHONE = {"width": 375, "height": 740}


def serve(args: list[str], port: int) -> Iterator[str]:
    """Run ``args`` (a process serving the web on ``port``) until the
    generator is closed; yields the base URL once ``/healthz`` answers 200.
    Closing stops it warmly and checks it exited 0."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy())
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
            assert proc.stdout is not None
            pytest.fail(f"{' '.join(args)} did not come up:\n{proc.stdout.read()}")
        time.sleep(0.3)
    yield base
    proc.terminate()
    assert proc.wait(30) == 0, "a warm stop exits 0"


def fits_the_width(page: Any) -> bool:
    """The page does not scroll sideways."""
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def screenshot(page: Any, path: Path) -> Path:
    """A full-page screenshot at ``path``, checked written."""
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    print(f"screenshot: {path}")
    return path


def api_post(page: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST JSON from inside ``page`` (its session and CSRF token), as a script would."""
    result = page.evaluate("""async ([path, body]) => {
        const csrf = (await (await fetch("/api/csrf")).json()).csrf;
        const resp = await fetch(path, {method: "POST", headers: {"Content-Type":
            "application/json", "X-CSRF-Token": csrf}, body: JSON.stringify(body)});
        return [resp.status, await resp.json()];
    }""", [path, body])
    return result[0], result[1]
