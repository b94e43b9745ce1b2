"""The health check of a new release, run before ``current`` is switched to it.

Either a command (run like a hook script: in the new release, as the
project's user, with the ``DEPLOYBUS_*`` environment) or an HTTP(S) URL
fetched with urllib; a 2xx answer (after redirects) is healthy. Up to
``retries`` attempts, ``interval`` seconds apart, each bounded by
``timeout``. It runs before the switch so that a release that fails it is
never served: the old release keeps serving. A URL check therefore looks at
whatever the post script started for the new release (a spare port, a
second instance); checks that only make sense once traffic reaches the new
release belong in the ``post_switch`` script, whose failure switches back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from deploybus.config import HealthConfig, OutputConfig
from deploybus.daemons.deploy_agent.scripts import OnStart, Progress, RunAs, run_script
from deploybus.errors import DeployError
from deploybus.gitutil import redact_text

STEP = "health"


def _probe_url(url: str, timeout: float) -> str:
    """One HTTP attempt; returns a description, raises DeployError if unhealthy.
    Both name the URL with any credentials in it redacted."""
    # Imported here: urllib and http.client cost an idle agent 2 MB.
    import http.client
    import urllib.error
    import urllib.request

    # urllib without proxies from the environment: the check is about this host.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, headers={"User-Agent": "deploybus-health/1"})
    try:
        with opener.open(req, timeout=timeout) as resp:
            status = resp.status
            resp.read(65536)
    except urllib.error.HTTPError as exc:
        raise DeployError(redact_text(f"GET {url} answered {exc.code} {exc.reason}")) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeployError(redact_text(f"GET {url} failed: {reason}")) from None
    if not 200 <= status < 300:
        raise DeployError(redact_text(f"GET {url} answered {status}"))
    return redact_text(f"GET {url} answered {status}")


def check(hc: HealthConfig, *, cwd: Path, env: dict[str, str], progress: Progress,
          output: OutputConfig | None = None, runas: RunAs | None = None,
          on_start: OnStart | None = None,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Run the check; raise DeployError naming the last failure if no attempt passed."""
    last = ""
    for attempt in range(1, hc.retries + 1):
        what = f"health check (attempt {attempt}/{hc.retries})"
        try:
            if hc.command is not None:
                run_script(STEP, hc.command, cwd=cwd, env=env, timeout=hc.timeout,
                           progress=progress, output=output, runas=runas, on_start=on_start,
                           what=what)
            else:
                assert hc.url is not None
                progress(STEP, f"{what}: {_probe_url(hc.url, hc.timeout)}", None)
            return
        except DeployError as exc:
            last = str(exc)
            if hc.url is not None:
                progress(STEP, f"{what}: {last}", None)
        if attempt < hc.retries:
            sleep(hc.interval)
    raise DeployError(f"health check failed after {hc.retries} attempt(s): {last}")
