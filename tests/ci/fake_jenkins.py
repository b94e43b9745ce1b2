"""A fake Jenkins: a real HTTP server (127.0.0.1, a free port, a thread) that
speaks the part of Jenkins's remote access API the Jenkins backend uses, so
its tests go over HTTP through jenkinsapi and requests, without a JVM.

Shapes and behaviour, and where they come from (jenkinsci/jenkins:
``hudson.model.Api``, ``Queue``, ``ParametersDefinitionProperty``;
joelee2012/api4jenkins ``tests/unit/tests_data``: ``jenkins/jenkins.json``,
``job/pipeline.json``, ``queue/{buildable,blocked,left}item.json``,
``run/freestylebuild.json``; CloudBees KB "CSRF protection explained"):

- Every ``.../api/json`` is also ``.../api/python`` (JSON with ``True``/
  ``False``/``None``, ``Api.doPython``): jenkinsapi 0.3.x reads that one.
- ``/api/json``: ``hudson.model.Hudson`` with ``jobs: [{_class, name, url,
  color}]``, ``useCrumbs``, ``useSecurity``.
- ``/crumbIssuer/api/json``: ``crumb``, ``crumbRequestField:
  Jenkins-Crumb``, bound to the web session it was issued in (a
  ``JSESSIONID.*`` cookie; Jenkins >= 2.176.2). A POST without a valid one:
  ``403 No valid crumb was included in the request``.
- ``/job/NAME/api/json`` (folders: ``/job/A/job/B/``): ``actions``,
  ``builds`` (newest first), ``firstBuild``, ``lastBuild``,
  ``nextBuildNumber``, ``inQueue``, ``property: [{_class:
  hudson.model.ParametersDefinitionProperty, parameterDefinitions}]``.
- ``POST /job/NAME/buildWithParameters`` keeps only declared parameters, a
  missing one takes its default; ``201`` and ``Location:
  <root>/queue/item/N/``, or ``303`` to the waiting item an identical request
  folds into (``Queue.schedule2``). ``POST .../build``: a job without them.
- ``/queue/item/N/api/json``: ``Queue$BuildableItem``/``$BlockedItem``
  (``why``, ``blocked``, ``buildable``, ``task``, ``actions``), then
  ``Queue$LeftItem`` with ``cancelled`` and ``executable: {number, url}``
  (null when cancelled); a 404 once forgotten (``Queue.leftItems``: 5 min).
- ``/job/NAME/N/api/json``: ``actions: [{_class: hudson.model.ParametersAction,
  parameters: [{name, value}]}, ...]``, ``building``, ``result`` (null while
  building), ``duration`` (ms), ``number``, ``queueId``, ``url``;
  ``/job/NAME/N/consoleText`` ends ``Finished: RESULT``.

Basic auth with ``user:token``: none is a 403 (anonymous may not read), a
wrong one a 401; an unknown job a 404. ``tree=`` is ignored: answers are the
full objects, a superset (job build lists carry ``queueId``).

Tests drive it by queue id (:meth:`~FakeJenkins.block`, ``start``,
``finish``, ``cancel``, ``forget``); ``unavailable = True`` answers 503,
``delay`` holds answers back; :meth:`~FakeJenkins.stop` and
:meth:`~FakeJenkins.start_server` take it down and bring it back on the same
port, its sessions (so its crumbs) gone.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

#: The results a finished build may have (hudson.model.Result).
RESULTS = ("SUCCESS", "FAILURE", "ABORTED", "UNSTABLE", "NOT_BUILT")
#: What Jenkins says of an item waiting for an executor.
WAITING = "Waiting for next available executor"
#: The crumb header, as the default crumb issuer names it.
CRUMB_FIELD = "Jenkins-Crumb"
#: The session cookie (Jetty names it JSESSIONID.<instance hash>).
SESSION_COOKIE = "JSESSIONID.fa4e1b2c"


@dataclass
class Build:
    """A build of a job, made when its queue item is started; running until
    it has a result."""

    job: str
    number: int
    queue_id: int
    parameters: dict[str, str]
    timestamp: int
    result: str | None = None
    duration_ms: int = 0
    console: list[str] = field(default_factory=list)


@dataclass
class Item:
    """A queue item, from the POST that made it until Jenkins forgets it."""

    id: int
    job: str
    parameters: dict[str, str]
    since: int
    why: str | None = WAITING
    blocked: bool = False
    cancelled: bool = False
    number: int | None = None
    forgotten: bool = False

    @property
    def left(self) -> bool:
        return self.cancelled or self.number is not None


@dataclass
class Job:
    name: str
    #: Declared parameters and their defaults; None: the job takes none.
    parameters: dict[str, str] | None
    next_number: int = 1
    builds: dict[int, Build] = field(default_factory=dict)


def _python(value: Any) -> str:
    """``value`` as Jenkins's Python API writes it (JSON, Python's constants)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_python(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_python(v) for v in value) + "]"
    return json.dumps(value)


class FakeJenkins:
    """The server and its state. ``users`` maps a user to its API token;
    users in ``readers`` may read but not build (a 403 on POST)."""

    def __init__(self, *, user: str = "deploybus", token: str | None = None) -> None:
        self.user, self.token = user, token or secrets.token_hex(16)
        self.users: dict[str, str] = {user: self.token}
        self.readers: set[str] = set()
        self.jobs: dict[str, Job] = {}
        self.queue: dict[int, Item] = {}
        #: Every accepted trigger: job, the raw form, the parameters Jenkins kept.
        self.triggers: list[dict[str, Any]] = []
        #: POSTs refused for want of a valid crumb.
        self.crumb_refusals = 0
        #: Every request: (method, path with query).
        self.requests: list[tuple[str, str]] = []
        self.unavailable = False
        self.delay = 0.0
        #: Root URL Jenkins puts in Location (its configured URL); None: the one asked.
        self.location_root: str | None = None
        self.lock = threading.RLock()
        self.sessions: dict[str, str] = {}  # session id -> its crumb
        self.next_queue_id = 100
        self.port = 0
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_server(self) -> FakeJenkins:
        """Listen (again) on 127.0.0.1, on the same port as before if there was one."""
        handler = type("Handler", (_Handler,), {"jenkins": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True, name=f"fake-jenkins-{self.port}").start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused until :meth:`start_server`.
        Web sessions die with the process, as Jenkins's do."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        with self.lock:
            self.sessions.clear()

    def __enter__(self) -> FakeJenkins:
        return self.start_server()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- what a test does -------------------------------------------------------------

    def add_job(self, name: str, parameters: dict[str, str] | None = None) -> None:
        """A job (``a/b``: job ``b`` in folder ``a``) with these declared string
        parameters and defaults (None: a job without parameters)."""
        with self.lock:
            self.jobs[name] = Job(name, parameters)

    def block(self, queue_id: int, why: str) -> None:
        with self.lock:
            self.queue[queue_id].blocked, self.queue[queue_id].why = True, why

    def cancel(self, queue_id: int) -> None:
        with self.lock:
            item = self.queue[queue_id]
            item.cancelled, item.blocked, item.why = True, False, None

    def start(self, queue_id: int) -> Build:
        """An executor takes the item: its build exists and runs."""
        with self.lock:
            item = self.queue[queue_id]
            job = self.jobs[item.job]
            build = Build(item.job, job.next_number, queue_id, item.parameters, int(time.time() * 1000),
                          console=[f"Started by user {self.user}"])
            job.builds[build.number] = build
            job.next_number += 1
            item.number, item.blocked, item.why = build.number, False, None
            return build

    def finish(self, queue_id: int, result: str, *, duration: float = 1.0,
               console: list[str] | None = None) -> Build:
        """The build of ``queue_id`` (started now if it was not) ends with
        ``result`` after ``duration`` seconds, having logged ``console``."""
        assert result in RESULTS, result
        with self.lock:
            build = self.build_of(queue_id) or self.start(queue_id)
            build.console += [*(console or []), f"Finished: {result}"]
            build.result, build.duration_ms = result, int(duration * 1000)
            return build

    def forget(self, queue_id: int) -> None:
        """Jenkins drops the item (5 minutes after it left the queue): 404 from now."""
        with self.lock:
            self.queue[queue_id].forgotten = True

    def build_of(self, queue_id: int) -> Build | None:
        with self.lock:
            item = self.queue[queue_id]
            return self.jobs[item.job].builds.get(item.number or 0)

    # -- JSON, as Jenkins writes it -----------------------------------------------------

    def job_url(self, name: str) -> str:
        return self.url + "".join(f"/job/{quote(p, safe='')}" for p in name.split("/")) + "/"

    def ref(self, b: Build) -> dict[str, Any]:
        return {"_class": "hudson.model.FreeStyleBuild", "number": b.number,
                "url": f"{self.job_url(b.job)}{b.number}/"}

    def actions(self, parameters: dict[str, str]) -> list[dict[str, Any]]:
        values = [{"_class": "hudson.model.StringParameterValue", "name": k, "value": v}
                  for k, v in parameters.items()]
        cause = {"_class": "hudson.model.Cause$UserIdCause", "userId": self.user,
                 "shortDescription": f"Started by user {self.user}", "userName": self.user}
        return [{"_class": "hudson.model.ParametersAction", "parameters": values},
                {"_class": "hudson.model.CauseAction", "causes": [cause]}]

    def root_json(self) -> dict[str, Any]:
        jobs = [{"_class": "hudson.model.FreeStyleProject", "name": j.name,
                 "url": self.job_url(j.name), "color": "blue"}
                for j in self.jobs.values() if "/" not in j.name]
        return {"_class": "hudson.model.Hudson", "mode": "NORMAL", "nodeName": "",
                "numExecutors": 2, "jobs": jobs, "quietingDown": False, "useCrumbs": True,
                "useSecurity": True, "primaryView": {"_class": "hudson.model.AllView",
                                                     "name": "all", "url": self.url + "/"}}

    def job_json(self, job: Job) -> dict[str, Any]:
        builds = sorted(job.builds.values(), key=lambda b: -b.number)
        done = [b for b in builds if b.result]
        defs = [{"_class": "hudson.model.StringParameterDefinition", "name": k,
                 "defaultParameterValue": {"_class": "hudson.model.StringParameterValue",
                                           "name": k, "value": v},
                 "description": "", "type": "StringParameterDefinition"}
                for k, v in (job.parameters or {}).items()]
        prop = {"_class": "hudson.model.ParametersDefinitionProperty",
                "parameterDefinitions": defs}
        short = job.name.rsplit("/", 1)[-1]
        return {"_class": "hudson.model.FreeStyleProject", "actions": [{}, {}],
                "description": "", "displayName": short, "fullName": job.name, "name": short,
                "url": self.job_url(job.name), "buildable": True,
                "builds": [{**self.ref(b), "queueId": b.queue_id} for b in builds],
                "color": "blue_anime" if builds and not builds[0].result else "blue",
                "firstBuild": self.ref(builds[-1]) if builds else None,
                "lastBuild": self.ref(builds[0]) if builds else None,
                "lastCompletedBuild": self.ref(done[0]) if done else None,
                "inQueue": any(i.job == job.name and not i.left for i in self.queue.values()),
                "keepDependencies": False, "nextBuildNumber": job.next_number,
                "property": [prop] if job.parameters is not None else [],
                "queueItem": None, "concurrentBuild": False, "disabled": False}

    def item_json(self, item: Item) -> dict[str, Any]:
        kind = "LeftItem" if item.left else "BlockedItem" if item.blocked else "BuildableItem"
        body: dict[str, Any] = {
            "_class": f"hudson.model.Queue${kind}", "actions": self.actions(item.parameters),
            "blocked": item.blocked, "buildable": kind == "BuildableItem", "id": item.id,
            "inQueueSince": item.since, "stuck": False, "url": f"queue/item/{item.id}/",
            "params": "".join(f"\n{k}={v}" for k, v in item.parameters.items()),
            "why": item.why, "task": {"_class": "hudson.model.FreeStyleProject",
                                      "name": item.job.rsplit("/", 1)[-1],
                                      "url": self.job_url(item.job), "color": "blue"}}
        if item.left:
            build = self.build_of(item.id)
            body.update(cancelled=item.cancelled, executable=self.ref(build) if build else None)
        else:
            body["buildableStartMilliseconds"] = item.since
            if kind == "BuildableItem":
                body["pending"] = False
        return body

    def build_json(self, b: Build) -> dict[str, Any]:
        return {**self.ref(b), "actions": [*self.actions(b.parameters), {}], "artifacts": [],
                "building": b.result is None, "displayName": f"#{b.number}",
                "duration": b.duration_ms, "executor": None if b.result else {},
                "fullDisplayName": f"{b.job} #{b.number}", "id": str(b.number),
                "queueId": b.queue_id, "result": b.result, "timestamp": b.timestamp}


class _Handler(BaseHTTPRequestHandler):
    """One request. HTTP/1.0: every answer closes its connection, so a stopped
    server leaves no kept-alive connection answering behind it."""

    jenkins: FakeJenkins
    server_version = "Jetty(12.0.x)"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet tests
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def _serve(self, method: str) -> None:
        fake = self.jenkins
        fake.requests.append((method, self.path))
        time.sleep(fake.delay)
        if fake.unavailable:
            return self._error(503, "Jenkins is getting ready to work")
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Basic "):
            return self._error(403, "Authentication required")
        user, _, token = base64.b64decode(auth[6:]).decode("utf-8", "replace").partition(":")
        if not token or fake.users.get(user) != token:
            return self._error(401, f"Invalid password/token for user: {user}")
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
        with fake.lock:
            if method == "POST":
                return self._post(user, parts, url.query)
            flavour = parts[-1] if parts[-2:-1] == ["api"] else None
            if flavour in ("json", "python"):
                return self._get(parts[:-2], flavour)
            if parts[-1:] == ["consoleText"]:
                return self._console(parts[:-1])
            return self._error(404, "Not Found")

    def _get(self, parts: list[str], flavour: str) -> None:
        fake = self.jenkins
        if not parts:
            return self._data(fake.root_json(), flavour)
        if parts == ["crumbIssuer"]:
            sid = self._session() or secrets.token_hex(8)
            crumb = fake.sessions.setdefault(sid, secrets.token_hex(16))
            return self._data({"_class": "hudson.security.csrf.DefaultCrumbIssuer",
                               "crumb": crumb, "crumbRequestField": CRUMB_FIELD}, flavour,
                              cookie=f"{SESSION_COOKIE}={sid}; Path=/; HttpOnly")
        if parts[:2] == ["queue", "item"] and len(parts) == 3 and parts[2].isdigit():
            item = fake.queue.get(int(parts[2]))
            if item is None or item.forgotten:
                return self._error(404, "Not Found")
            return self._data(fake.item_json(item), flavour)
        job, rest = self._job(parts)
        if job is not None and not rest:
            return self._data(fake.job_json(job), flavour)
        build = self._build(job, rest)
        if build is None:
            return self._error(404, "Not Found")
        return self._data(fake.build_json(build), flavour)

    def _console(self, parts: list[str]) -> None:
        build = self._build(*self._job(parts))
        if build is None:
            return self._error(404, "Not Found")
        text = "".join(line + "\n" for line in build.console)
        return self._send(200, text.encode(), "text/plain;charset=utf-8")

    def _post(self, user: str, parts: list[str], query: str) -> None:
        fake = self.jenkins
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode(), keep_blank_values=True)
        form.update(parse_qs(query, keep_blank_values=True))
        sid = self._session()  # the crumb filter comes before everything else
        if sid is None or fake.sessions[sid] != self.headers.get(CRUMB_FIELD):
            fake.crumb_refusals += 1
            return self._error(403, "No valid crumb was included in the request")
        job, rest = self._job(parts)
        if job is None or rest not in (["build"], ["buildWithParameters"]):
            return self._error(404, "Not Found")
        if user in fake.readers:
            return self._error(403, f"{user} is missing the Job/Build permission")
        if (rest == ["buildWithParameters"]) != (job.parameters is not None):
            return self._error(400, f"{job.name} is {'' if job.parameters else 'not '}"
                                    "parameterized")
        kept = {k: form[k][-1] if k in form else v for k, v in (job.parameters or {}).items()}
        fake.triggers.append({"job": job.name, "form": {k: v[-1] for k, v in form.items()},
                              "parameters": kept, "at": time.time()})
        same = [i for i in fake.queue.values()
                if i.job == job.name and not i.left and i.parameters == kept]
        status, item = 303, same[0] if same else None
        if item is None:
            status, item = 201, Item(fake.next_queue_id, job.name, kept, int(time.time() * 1000))
            fake.queue[item.id] = item
            fake.next_queue_id += 1
        root = fake.location_root or fake.url
        self._send(status, b"", None, location=f"{root}/queue/item/{item.id}/")

    def _job(self, parts: list[str]) -> tuple[Job | None, list[str]]:
        """The job a path names (``job/a/job/b/...``) and what follows it."""
        names: list[str] = []
        while len(parts) >= 2 and parts[0] == "job":
            names, parts = [*names, parts[1]], parts[2:]
        return self.jenkins.jobs.get("/".join(names)), parts

    @staticmethod
    def _build(job: Job | None, rest: list[str]) -> Build | None:
        if job is None or len(rest) != 1 or not rest[0].isdigit():
            return None
        return job.builds.get(int(rest[0]))

    def _session(self) -> str | None:
        for cookie in self.headers.get("Cookie", "").split(";"):
            name, _, value = cookie.strip().partition("=")
            if name == SESSION_COOKIE and value in self.jenkins.sessions:
                return value
        return None

    def _data(self, body: dict[str, Any], flavour: str, *, cookie: str | None = None) -> None:
        if flavour == "python":
            return self._send(200, _python(body).encode(), "text/x-python;charset=utf-8",
                              cookie=cookie)
        return self._send(200, json.dumps(body).encode(), "application/json;charset=utf-8",
                          cookie=cookie)

    def _error(self, status: int, message: str) -> None:
        page = (f"<html><head><title>Error {status} {message}</title></head><body>"
                f"<h2>HTTP ERROR {status} {message}</h2></body></html>")
        self._send(status, page.encode(), "text/html;charset=iso-8859-1")

    def _send(self, status: int, body: bytes, ctype: str | None, *, cookie: str | None = None,
              location: str | None = None) -> None:
        headers = {"X-Jenkins": "2.479.3", "Content-Type": ctype, "Set-Cookie": cookie,
                   "Location": location, "Content-Length": str(len(body)),
                   "WWW-Authenticate": 'Basic realm="Jenkins"' if status == 401 else None}
        try:
            self.send_response(status)
            for name, value in headers.items():
                if value is not None:
                    self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a test of timeouts)
