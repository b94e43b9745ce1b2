"""The Buildbot backend against a real Buildbot master and worker.

One master and worker serve the module (tests/ci/buildbot_harness.py); the
builds check out real commits of a repository made here, whose own ``ci.sh``
passes or fails. What is checked: a build followed from the force to its
result (number, www URL, duration, the script's output in the console
tail), a failing commit, a poll with only the stored handle from a new
backend (as after a restart of the bridge), a request cancelled in the queue
and a build stopped while it runs, a refused force (no such scheduler or
builder), a login (right, wrong and missing credentials), and a master that
is down (and back: polls go on with the same handle).
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploybus.daemons.ci_bridge.backend import (
    Backend,
    BuildStatus,
    CiRefused,
    CiUnavailable,
    Trigger,
    backend_for,
)
from deploybus.daemons.ci_bridge.buildbot import BuildbotBackend
from tests.ci.buildbot_harness import Buildbot, commit, make_repo

pytestmark = pytest.mark.e2e

#: Seconds a build of the test repository may take to finish.
BUILD_TIMEOUT = 60


class Commits:
    """The test repository and its commits."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.ok = commit(repo, {"ci.sh": 'echo "ci says hello from $(git rev-parse --short HEAD)"\n'
                                         'echo "a warning on stderr" >&2\n'}, "passes")
        self.bad = commit(repo, {"ci.sh": 'echo "ci says no"\nexit 1\n'}, "fails")
        self.slow = commit(repo, {"ci.sh": 'echo "ci is slow"\nsleep 60\n'}, "hangs")


@pytest.fixture(scope="module")
def commits(tmp_path_factory: pytest.TempPathFactory) -> Commits:
    return Commits(make_repo(tmp_path_factory.mktemp("repo")))


@pytest.fixture(scope="module")
def buildbot(tmp_path_factory: pytest.TempPathFactory, commits: Commits) -> Iterator[Buildbot]:
    with Buildbot(tmp_path_factory.mktemp("buildbot"), jobs=["app", "slow"],
                  repo=commits.repo) as bb:
        print(f"Buildbot started in {bb.start_seconds:.1f}s")
        yield bb


@pytest.fixture
def backend(buildbot: Buildbot) -> Iterator[Backend]:
    b = backend_for("bb", buildbot.settings())
    yield b
    b.close()


def trigger(backend: Backend, sha: str, job: str = "app", **parameters: str) -> dict[str, Any]:
    return backend.trigger(Trigger(project="app", ref="refs/heads/main", commit=sha, job=job,
                                   parameters=parameters))


def wait(backend: Backend, handle: dict[str, Any], until: tuple[str, ...] = ("finished",
         "cancelled"), timeout: float = BUILD_TIMEOUT) -> tuple[BuildStatus, list[str]]:
    """Poll until the state is one of ``until``; the last status and every
    state seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        st = backend.poll(handle)
        seen.append(st.state)
        if st.state in until:
            return st, seen
        assert time.monotonic() < deadline, f"still {st.state} after {timeout}s: {st}"
        handle = st.handle
        time.sleep(0.1)


def test_registered() -> None:
    assert backend_for("x", {"type": "buildbot", "url": "http://127.0.0.1:1"}).type == "buildbot"


def test_build_of_a_commit_that_passes(backend: Backend, buildbot: Buildbot,
                                       commits: Commits) -> None:
    handle = trigger(backend, commits.ok)
    assert set(handle) >= {"buildsetid", "builderid"}
    assert json.loads(json.dumps(handle)) == handle  # the bridge stores it as JSON
    st, seen = wait(backend, handle)
    assert set(seen) <= {"queued", "started", "finished"}
    assert (st.state, st.result) == ("finished", "SUCCESS")
    assert isinstance(st.number, int) and st.number >= 1
    assert st.url == f"{buildbot.url}/#/builders/{handle['builderid']}/builds/{st.number}"
    assert st.duration is not None and 0 <= st.duration < BUILD_TIMEOUT
    assert f"ci says hello from {commits.ok[:7]}" in st.console_tail  # the commit's own ci.sh
    assert "a warning on stderr" in st.console_tail
    assert st.console_tail[-1] == "program finished with exit code 0"
    assert not any("argv" in line for line in st.console_tail)  # the worker's header is left out
    # Buildbot's own record agrees
    build = buildbot.api(f"builds/{st.handle['buildid']}")["builds"][0]
    assert (build["number"], build["results"]) == (st.number, 0)
    props = buildbot.api(f"builds/{st.handle['buildid']}/properties")["properties"][0]
    assert (props["revision"][0], props["branch"][0]) == (commits.ok, "main")
    # any tail is the end of the whole console (read from the end back)
    full = backend.poll(st.handle, tail=1000).console_tail
    assert full[0].startswith("=== checkout") and len(full) < 50
    for n in range(len(full) + 2):
        assert backend.poll(st.handle, tail=n).console_tail == (full[-n:] if n else [])


def test_build_of_a_commit_that_fails(backend: Backend, commits: Commits) -> None:
    st, _ = wait(backend, trigger(backend, commits.bad))
    assert (st.state, st.result) == ("finished", "FAILURE")
    assert "ci says no" in st.console_tail
    assert st.console_tail[-1] == "program finished with exit code 1"
    assert st.why and "failed" in st.why


def test_poll_with_the_stored_handle_from_a_new_backend(buildbot: Buildbot,
                                                         commits: Commits) -> None:
    """As after a restart of the bridge: only the stored handle is left."""
    settings = buildbot.settings()
    first = backend_for("bb", settings)
    stored = json.dumps(first.trigger(Trigger(project="app", ref="refs/heads/main",
                                              commit=commits.ok, job="app")))
    first.close()
    second = backend_for("bb", settings)
    st, _ = wait(second, json.loads(stored))
    assert (st.state, st.result) == ("finished", "SUCCESS")
    # a handle with only the buildset (no request id yet) is found too
    again = second.poll({k: v for k, v in json.loads(stored).items()
                         if k in ("buildsetid", "builderid")})
    assert (again.state, again.result, again.number) == ("finished", "SUCCESS", st.number)
    second.close()


def said(buildbot: Buildbot, buildid: int, text: str, timeout: float) -> bool:
    """Whether a step log of build ``buildid`` shows ``text`` within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for step in buildbot.api(f"builds/{buildid}/steps")["steps"]:
            for log in buildbot.api(f"steps/{step['stepid']}/logs")["logs"]:
                chunks = buildbot.api(f"logs/{log['logid']}/contents")["logchunks"]
                if any(text in c["content"] for c in chunks):
                    return True
        time.sleep(0.2)
    return False


def test_cancelled_in_the_queue_and_stopped_while_running(backend: Backend, buildbot: Buildbot,
                                                         commits: Commits) -> None:
    """A request taken out of the queue is ``cancelled``; a build stopped
    while it runs finishes ABORTED (Buildbot's CANCELLED)."""
    running = trigger(backend, commits.slow, job="slow")
    st, _ = wait(backend, running, until=("started",))
    queued = trigger(backend, commits.ok, job="slow")  # one build per builder: it waits
    assert backend.poll(queued).state == "queued"
    buildbot.control(f"buildrequests/{queued['buildrequestid']}", "cancel", reason="test")
    gone, _ = wait(backend, queued)
    assert (gone.state, gone.result, gone.number) == ("cancelled", None, None)
    assert gone.why == f"Buildbot build request {queued['buildrequestid']}"
    # stop it in its slow step (not while the checkout still runs)
    assert said(buildbot, st.handle["buildid"], "ci is slow", 60), buildbot.logs()
    buildbot.control(f"builds/{st.handle['buildid']}", "stop", reason="test")
    stopped, _ = wait(backend, st.handle)
    assert (stopped.state, stopped.result) == ("finished", "ABORTED")
    assert "ci is slow" in stopped.console_tail


def test_the_trigger_parameters_reach_the_build(backend: Backend, commits: Commits) -> None:
    """Parameters go to the force scheduler's fields by name (here the
    harness's ``ci_command``, which replaces ``sh ./ci.sh``)."""
    st, _ = wait(backend, trigger(backend, commits.bad, ci_command="echo overridden"))
    assert (st.result, st.console_tail[-2]) == ("SUCCESS", "overridden")


def test_no_such_force_scheduler_or_builder(backend: Backend, commits: Commits) -> None:
    with pytest.raises(CiRefused, match=r"no force scheduler 'nope' \(HTTP 404\)"):
        trigger(backend, commits.ok, job="nope")
    with pytest.raises(CiRefused, match="does not start builder 'slow'"):
        trigger(backend, commits.ok, job="app/slow")
    with pytest.raises(CiRefused, match="no force scheduler"):
        trigger(backend, commits.ok, job="../builds")  # not a name: never a path
    with pytest.raises(CiRefused, match="no build request 999999"):
        backend.poll({"buildsetid": 1, "builderid": 1, "buildrequestid": 999999})


def test_login(tmp_path: Path, commits: Commits) -> None:
    """A master that needs a login: right credentials build; wrong or none
    are refused, and no message carries the password."""
    password = "s3cret-Pw"
    wrong = tmp_path / "wrong"
    wrong.write_text("deployer:not-it\n")
    with Buildbot(tmp_path / "bb", jobs=["app"], repo=commits.repo,
                  auth=("deployer", password)) as bb:
        good = bb.write_credentials(tmp_path / "good")
        ok = backend_for("bb", bb.settings(credentials=good))
        st, _ = wait(ok, trigger(ok, commits.ok))
        assert st.result == "SUCCESS" and st.console_tail
        ok.close()
        for creds, match in ((wrong, "login: HTTP 401"), (None, "HTTP 403.*set credentials")):
            b = BuildbotBackend("bb", {"url": bb.url, "credentials": creds, "timeout": 5})
            with pytest.raises(CiRefused, match=match) as e:
                trigger(b, commits.ok)
            assert password not in str(e.value) and "not-it" not in str(e.value)
        missing = BuildbotBackend("bb", {"url": bb.url, "credentials": tmp_path / "none"})
        with pytest.raises(CiRefused, match="cannot read the credentials file"):
            trigger(missing, commits.ok)


def test_master_down_then_back(backend: Backend, buildbot: Buildbot, commits: Commits) -> None:
    """A stopped master is CiUnavailable (the bridge retries); once it is
    back, the same handle polls on."""
    st, _ = wait(backend, trigger(backend, commits.ok))
    buildbot.stop()
    try:
        with pytest.raises(CiUnavailable, match="Connection refused"):
            backend.poll(st.handle)
        with pytest.raises(CiUnavailable, match="Connection refused"):
            trigger(backend, commits.ok)
    finally:
        buildbot.start()
        print(f"Buildbot restarted in {buildbot.start_seconds:.1f}s")
    again = backend.poll(st.handle)
    assert (again.state, again.result, again.number) == ("finished", "SUCCESS", st.number)


class _Answer(http.server.BaseHTTPRequestHandler):
    status, body, content_type = 503, b"maintenance", "text/plain"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("status", "body", "error", "match"), [
    (503, b"maintenance", CiUnavailable, "HTTP 503"),
    (502, b"<html>bad gateway</html>", CiUnavailable, "HTTP 502"),
    (200, b"<html>not buildbot</html>", CiRefused, "not JSON"),
])
def test_what_a_server_answers(status: int, body: bytes, error: type[Exception],
                               match: str) -> None:
    """5xx may pass (CiUnavailable); a page that is not Buildbot's will not."""
    handler = type("H", (_Answer,), {"status": status, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        b = BuildbotBackend("bb", {"url": f"http://127.0.0.1:{server.server_port}"})
        with pytest.raises(error, match=match):
            b.poll({"buildsetid": 1, "buildrequestid": 1})
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_does_not_answer_times_out() -> None:
    with socket.socket() as s:  # listens, never accepts: the request hangs
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"http://user:hunter2@127.0.0.1:{s.getsockname()[1]}"
        b = BuildbotBackend("bb", {"url": url, "timeout": 0.5})
        t0 = time.monotonic()
        with pytest.raises(CiUnavailable, match=r"no answer within 0.5s") as e:
            b.poll({"buildsetid": 1})
        assert time.monotonic() - t0 < 5
        assert "hunter2" not in str(e.value)
