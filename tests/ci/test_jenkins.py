"""The Jenkins backend against a fake Jenkins over real HTTP (tests/ci/fake_jenkins.py):
trigger through the crumb, follow the queue item to the build and its result,
and every way Jenkins refuses or goes away. No broker needed."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from deploybus.daemons.ci_bridge.backend import (
    BACKENDS,
    BuildStatus,
    CiRefused,
    CiUnavailable,
    Trigger,
    backend_for,
)
from deploybus.daemons.ci_bridge.jenkins import JenkinsBackend
from tests.ci.fake_jenkins import WAITING, FakeJenkins

pytestmark = pytest.mark.unit

COMMIT = "3f786850e387550fdab836ed7e6dc881de23001b"
PARAMS = {"COMMIT": COMMIT, "REF": "refs/heads/main"}


@pytest.fixture
def fake() -> Iterator[FakeJenkins]:
    with FakeJenkins(user="deploybus") as jenkins:
        jenkins.add_job("app", {"COMMIT": "", "REF": "refs/heads/master", "DEPLOY": "no"})
        yield jenkins


@pytest.fixture
def creds(tmp_path: Path, fake: FakeJenkins) -> Path:
    path = tmp_path / "jenkins.creds"
    path.write_text(f"deploybus:{fake.token}\n")
    return path


def make(fake: FakeJenkins, creds: Path, **settings: Any) -> JenkinsBackend:
    return JenkinsBackend("main", {"type": "jenkins", "url": fake.url, "credentials": creds,
                                   "timeout": 2.0, "poll": 0.1, **settings})


@pytest.fixture
def backend(fake: FakeJenkins, creds: Path) -> Iterator[JenkinsBackend]:
    b = make(fake, creds)
    yield b
    b.close()


def trigger(backend: JenkinsBackend, job: str = "app", **params: str) -> dict[str, Any]:
    return backend.trigger(Trigger(project="app", ref="refs/heads/main", commit=COMMIT,
                                   job=job, parameters=params or dict(PARAMS)))


# -- the happy path ------------------------------------------------------------------


def test_registered_and_made_from_settings(fake: FakeJenkins, creds: Path) -> None:
    assert BACKENDS["jenkins"] is JenkinsBackend
    b = backend_for("main", {"type": "jenkins", "url": fake.url + "/", "credentials": creds})
    assert isinstance(b, JenkinsBackend) and b.url == fake.url


def test_trigger_sends_the_parameters_with_the_crumb(fake: FakeJenkins,
                                                     backend: JenkinsBackend) -> None:
    handle = trigger(backend)
    assert fake.triggers[-1]["job"] == "app"
    # what Jenkins kept: ours, and the default of the one we did not send
    assert fake.triggers[-1]["parameters"] == {**PARAMS, "DEPLOY": "no"}
    assert fake.crumb_refusals == 0
    qid = handle["queue_id"]
    assert handle == {"job": "app", "queue_id": qid, "queue_url": f"{fake.url}/queue/item/{qid}/"}
    assert json.loads(json.dumps(handle)) == handle


def test_fake_refuses_a_post_without_the_crumb(fake: FakeJenkins) -> None:
    r = requests.post(f"{fake.url}/job/app/buildWithParameters", data=PARAMS,
                      auth=("deploybus", fake.token), allow_redirects=False, timeout=5)
    assert r.status_code == 403 and "No valid crumb" in r.text
    assert fake.triggers == []


def test_follows_queued_blocked_started_finished(fake: FakeJenkins,
                                                 backend: JenkinsBackend) -> None:
    handle = trigger(backend)
    qid = handle["queue_id"]
    st = backend.poll(handle)
    assert (st.state, st.why, st.number) == ("queued", WAITING, None)
    fake.block(qid, "Build #7 is already in progress (ETA: 12 sec)")
    st = backend.poll(st.handle)
    assert (st.state, st.why) == ("queued", "Build #7 is already in progress (ETA: 12 sec)")
    build = fake.start(qid)
    st = backend.poll(st.handle)
    assert (st.state, st.number, st.result) == ("started", build.number, None)
    assert st.url == f"{fake.url}/job/app/{build.number}/"
    assert st.handle == {**handle, "number": build.number}
    log = [f"step {i}" for i in range(120)]
    fake.finish(qid, "SUCCESS", duration=12.5, console=log)
    st = backend.poll(st.handle)
    assert (st.state, st.result, st.number, st.duration) == ("finished", "SUCCESS",
                                                             build.number, 12.5)
    assert st.url == f"{fake.url}/job/app/{build.number}/"
    assert st.console_tail == log[-49:] + ["Finished: SUCCESS"]
    assert backend.poll(st.handle, tail=3).console_tail == ["step 118", "step 119",
                                                            "Finished: SUCCESS"]
    assert fake.build_of(qid).parameters == {**PARAMS, "DEPLOY": "no"}  # type: ignore[union-attr]


@pytest.mark.parametrize("result", ["FAILURE", "ABORTED", "UNSTABLE", "NOT_BUILT"])
def test_results_other_than_success(fake: FakeJenkins, backend: JenkinsBackend,
                                    result: str) -> None:
    handle = trigger(backend)
    fake.finish(handle["queue_id"], result, duration=0.25, console=["boom"])
    st = backend.poll(handle)
    assert (st.state, st.result, st.duration) == ("finished", result, 0.25)
    assert st.console_tail == ["Started by user deploybus", "boom", f"Finished: {result}"]


def test_identical_request_while_waiting_is_the_same_queue_item(
        fake: FakeJenkins, backend: JenkinsBackend) -> None:
    first = trigger(backend)
    assert trigger(backend) == first                       # Jenkins answers 303
    assert trigger(backend, COMMIT="0" * 40)["queue_id"] != first["queue_id"]


def test_folder_job_and_job_without_parameters(fake: FakeJenkins,
                                               backend: JenkinsBackend) -> None:
    fake.add_job("team/api", None)
    handle = backend.trigger(Trigger(project="api", ref="refs/heads/main", commit=COMMIT,
                                     job="team/api"))
    assert {k: v for k, v in fake.triggers[-1].items() if k != "at"} == \
        {"job": "team/api", "form": {}, "parameters": {}}
    fake.finish(handle["queue_id"], "SUCCESS")
    st = backend.poll(handle)
    assert (st.state, st.result, st.url) == ("finished", "SUCCESS",
                                             f"{fake.url}/job/team/job/api/1/")


def test_location_with_another_root_url(fake: FakeJenkins, backend: JenkinsBackend) -> None:
    """Jenkins behind a proxy names itself by its configured root URL; the
    handle keeps to ours (jenkinsapi's invoke() raised here, build queued)."""
    fake.location_root = "https://jenkins.internal:8443"
    handle = trigger(backend)
    assert handle["queue_url"].startswith(fake.url + "/queue/item/")
    assert backend.poll(handle).state == "queued"


# -- restarts and forgetful queues -----------------------------------------------------


def test_poll_after_a_restart_of_the_bridge(fake: FakeJenkins, creds: Path) -> None:
    first = make(fake, creds)
    stored = json.loads(json.dumps(first.trigger(Trigger("app", "refs/heads/main", COMMIT,
                                                         "app", dict(PARAMS)))))
    first.close()
    fake.start(stored["queue_id"])
    again = make(fake, creds)                 # a new process: only the handle is left
    st = again.poll(stored)
    assert st.state == "started"
    fake.finish(stored["queue_id"], "SUCCESS")
    st = make(fake, creds).poll(json.loads(json.dumps(st.handle)))
    assert (st.state, st.result) == ("finished", "SUCCESS")


def test_queue_item_forgotten_after_the_number_is_known(fake: FakeJenkins,
                                                        backend: JenkinsBackend) -> None:
    handle = trigger(backend)
    fake.start(handle["queue_id"])
    st = backend.poll(handle)
    fake.forget(handle["queue_id"])
    fake.finish(handle["queue_id"], "UNSTABLE")
    assert requests.get(f"{handle['queue_url']}api/json", auth=("deploybus", fake.token),
                        timeout=5).status_code == 404
    fake.requests.clear()
    st = backend.poll(st.handle)
    assert (st.state, st.result) == ("finished", "UNSTABLE")
    assert [path for _, path in fake.requests if "/queue/" in path] == []   # the build directly


def test_queue_item_forgotten_before_the_number_was_seen(fake: FakeJenkins,
                                                         backend: JenkinsBackend) -> None:
    """The bridge was away longer than Jenkins remembers queue items: the
    build is found by the queueId it records."""
    trigger(backend, COMMIT="1" * 40)          # another build of the job, first
    handle = trigger(backend)
    fake.start(handle["queue_id"] - 1)
    build = fake.finish(handle["queue_id"], "SUCCESS")
    fake.forget(handle["queue_id"])
    st = backend.poll(handle)
    assert (st.state, st.number, st.handle["number"]) == ("finished", build.number,
                                                          build.number)


def test_cancelled_queue_item_is_refused(fake: FakeJenkins, backend: JenkinsBackend) -> None:
    handle = trigger(backend)
    fake.cancel(handle["queue_id"])
    with pytest.raises(CiRefused, match="cancelled in the queue"):
        backend.poll(handle)
    fake.forget(handle["queue_id"])           # and once Jenkins forgot it too
    with pytest.raises(CiRefused, match="is gone"):
        backend.poll(handle)


# -- refusals ------------------------------------------------------------------------


def test_wrong_token_is_refused_without_showing_it(fake: FakeJenkins, creds: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "11d0a5c0ffee5ecret5ecret5ecret99"
    creds.write_text(f"deploybus:{wrong}\n")
    b = make(fake, creds)
    with pytest.raises(CiRefused, match="401") as exc:
        trigger(b)
    assert str(creds) in str(exc.value)
    handle = {"job": "app", "queue_id": 1, "queue_url": f"{fake.url}/queue/item/1/"}
    with pytest.raises(CiRefused, match="401") as exc2:
        b.poll(handle)
    for text in [str(exc.value), str(exc2.value), caplog.text]:
        assert wrong not in text and fake.token not in text
    creds.write_text(f"deploybus:{fake.token}\n")   # the token is fixed: read again
    assert trigger(b)["queue_id"] >= 100


def test_unknown_job_is_refused(backend: JenkinsBackend) -> None:
    with pytest.raises(CiRefused, match="404: no job 'nope'"):
        trigger(backend, job="nope")


def test_undeclared_parameter_is_refused_before_queueing(fake: FakeJenkins,
                                                         backend: JenkinsBackend) -> None:
    with pytest.raises(CiRefused, match="does not declare the parameter.*SHA"):
        trigger(backend, SHA=COMMIT)
    assert fake.triggers == []


def test_user_without_build_permission(fake: FakeJenkins, backend: JenkinsBackend) -> None:
    fake.readers.add("deploybus")
    with pytest.raises(CiRefused, match="403 'deploybus is missing the Job/Build permission'"):
        trigger(backend)


def test_missing_credentials_file(fake: FakeJenkins, tmp_path: Path) -> None:
    b = make(fake, tmp_path / "gone")
    with pytest.raises(CiRefused, match="cannot read the credentials file"):
        trigger(b)


def test_not_a_handle(backend: JenkinsBackend) -> None:
    with pytest.raises(CiRefused, match="not a Jenkins build handle"):
        backend.poll({"build": 3})


# -- Jenkins away --------------------------------------------------------------------


def test_server_stopped_then_back(fake: FakeJenkins, backend: JenkinsBackend) -> None:
    handle = trigger(backend)
    fake.stop()
    with pytest.raises(CiUnavailable, match="cannot connect"):
        backend.poll(handle)
    with pytest.raises(CiUnavailable, match="cannot connect"):
        trigger(backend)
    fake.start_server()                       # same port; its sessions, and crumbs, gone
    fake.start(handle["queue_id"])
    assert backend.poll(handle).state == "started"
    again = trigger(backend, COMMIT="2" * 40)  # a fresh crumb is fetched
    assert again["queue_id"] != handle["queue_id"]
    assert fake.crumb_refusals == 1


def test_503_is_unavailable(fake: FakeJenkins, backend: JenkinsBackend) -> None:
    handle = trigger(backend)
    fake.unavailable = True
    with pytest.raises(CiUnavailable, match="503 'Jenkins is getting ready to work'"):
        backend.poll(handle)
    with pytest.raises(CiUnavailable, match="503"):
        trigger(backend)
    fake.unavailable = False
    assert isinstance(backend.poll(handle), BuildStatus)


def test_timeout_is_unavailable(fake: FakeJenkins, creds: Path) -> None:
    handle = trigger(make(fake, creds))
    fake.delay = 0.6
    with pytest.raises(CiUnavailable, match="no answer within 0.2 s"):
        make(fake, creds, timeout=0.2).poll(handle)
