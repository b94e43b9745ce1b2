"""Buildbot behind the CI backend interface, over its REST API (data API v2).

Settings (the config's ``ci.<name>``, :class:`deploybus.config.CiServer`):
``url``, the master's www base URL (``http://ci.example:8010``);
``credentials``, a file holding ``user:password`` (optional; read when a
login is needed, never logged); ``timeout``, seconds one HTTP call may take.
``poll`` is the bridge's business.

**Jobs.** A project's ``ci.job`` names a *force scheduler*, the only
scheduler Buildbot lets a client start a build with; ``scheduler/builder``
picks one builder when the scheduler starts several (a bare name must then
start exactly one: one trigger, one build to follow).

**Trigger.** A JSON-RPC POST to ``/api/v2/forceschedulers/<scheduler>``
(``buildbot/www/rest.py``, ``V2RootResource.renderJsonRpc``) with method
``force`` and params ``builderNames``, ``revision`` (the commit), ``branch``
(``main`` for ``refs/heads/main``; any other ref as it is), ``project``, a
``reason``, and the trigger's parameters beside them: Buildbot reads each
field of the scheduler by its name from the params and ignores the rest
(``ForceSchedulersEndpoint.control`` in ``buildbot/data/forceschedulers.py``
calls ``ForceScheduler.force(owner, builderNames, builderid, **kwargs)`` in
``buildbot/schedulers/forcesched.py``). The answer is ``[buildsetid,
{builderid: buildrequestid}]``. The scheduler is read first (``GET
/api/v2/forceschedulers/<name>``: 404 when there is none) because a force on
a missing scheduler, or naming a builder it does not start, is an internal
error (HTTP 500) to Buildbot, which would read as "retry later" here. The
handle: ``{"buildsetid": N, "builderid": M, "buildrequestid": R}``; a poll
that finds the build adds ``buildid`` and ``number``.

**Poll.** The build request (``/api/v2/buildrequests/R``; by buildset,
``/api/v2/buildrequests?buildsetid=N``, with an older handle), then its
builds (``/api/v2/buildrequests/R/builds``; a build that ended in RETRY is
followed by another for the same request, so the newest counts). A
request not yet taken is ``queued``; one that completed without a build
(cancelled in the queue) is ``cancelled``; a build running is ``started``;
a build complete with its request is ``finished``, with the result mapped
onto the interface's (Jenkins's) words (:data:`BUILDBOT_RESULTS`), the build's
``state_string`` as ``why``, the duration from ``started_at`` and
``complete_at`` (Buildbot keeps whole seconds), its www URL
(``<url>/#/builders/<builderid>/builds/<number>``, as Buildbot's own
reporters make it: ``getURLForBuild`` in ``buildbot/reporters/utils.py``),
and the last lines of its console: the text logs of its steps, walked from
the last step back, each read from ``/api/v2/logs/L/contents?offset=&limit=``
(from its end, only the lines still needed; ``buildbot/data/logchunks.py``);
of a stdio log its stdout and stderr and how the command ended, not the
worker's header (argv, and with ``logEnviron`` the environment: it may hold
secrets); each step's lines after a ``=== <step>: <state>`` line.

**Login.** With ``credentials``, the backend logs in once per session at
``/auth/login`` with basic auth (Buildbot then keeps the login in a session
cookie: ``buildbot/www/auth.py``) and sends the same basic auth with every
call (for a master behind a proxy that asks for it). A master without
authentication answers the login 501, and the backend goes on anonymous. A
401 or 403 later logs in again once, then is a refusal.

**Errors.** Connection refused or reset, a timeout, HTTP 5xx, 408 or 429:
:class:`CiUnavailable`. 401, 403, 404 (no such scheduler, builder, build
request), 400 (Buildbot refused the force's parameters), any other 4xx, and
an answer that is not the JSON of a Buildbot: :class:`CiRefused`. Messages
name the server, the call and the URL without credentials; never the
credentials file's content.

HTTP goes through ``requests`` (a dependency of jenkinsapi, which the
Jenkins backend uses): a session keeps the login cookie and the connection
between the calls of one poll (three to five), and its errors tell a timeout
from a refused connection; urllib would need a cookie jar, a basic-auth
handler and a new connection per call for the same.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from deploybus import redact

from .backend import BACKENDS, Backend, BuildStatus, CiRefused, CiUnavailable, Trigger

__all__ = ["BUILDBOT_RESULTS", "BuildbotBackend"]

#: Buildbot's result codes (``buildbot/process/results.py``) in the
#: interface's words. WARNINGS is a build that passed with complaints, as
#: Jenkins's UNSTABLE; SKIPPED never ran, NOT_BUILT; EXCEPTION is a build the
#: master or worker broke (a lost worker, a bad step), FAILURE, since the
#: commit was not shown good; CANCELLED is a build someone stopped, ABORTED;
#: RETRY, when it is final (the request completed with it), FAILURE.
BUILDBOT_RESULTS: dict[int, str] = {
    0: "SUCCESS",    # SUCCESS
    1: "UNSTABLE",   # WARNINGS
    2: "FAILURE",    # FAILURE
    3: "NOT_BUILT",  # SKIPPED
    4: "FAILURE",    # EXCEPTION
    5: "FAILURE",    # RETRY
    6: "ABORTED",    # CANCELLED
}

#: Buildbot's CANCELLED result code: a request with it and no build was
#: taken out of the queue.
CANCELLED = 6

#: HTTP answers that may pass by themselves (besides every 5xx).
_TRANSIENT = frozenset({408, 429})

#: Log types whose lines go into the console tail: stdio and text (not html).
_TEXT_LOGS = frozenset({"s", "t"})

#: Header lines of a stdio log that say how its command ended (written by
#: ``buildbot/process/remotecommand.py`` and ``buildbot_worker/runprocess.py``).
_ENDED = re.compile(r"program finished with exit code|command timed out|process killed")

#: Longest server message quoted in an error.
_QUOTE = 300


class BuildbotBackend(Backend):
    """A Buildbot master, reached over its www REST API (see the module's
    docstring for the job convention, the handle and the mapping)."""

    type = "buildbot"

    def __init__(self, name: str, settings: dict[str, Any]) -> None:
        super().__init__(name, settings)
        url = str(settings.get("url") or "").rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise CiRefused(f"ci.{name}: url must be the Buildbot www's http(s) URL, "
                            f"not {redact.url(url)!r}")
        self.url = url
        #: The URL as messages show it.
        self.safe_url = redact.url(url)
        self.timeout = float(settings.get("timeout") or 10.0)
        cred = settings.get("credentials")
        self._credentials: Path | None = Path(cred) if cred else None
        self._session: requests.Session | None = None
        self._logged_in = False

    # -- the interface ----------------------------------------------------

    def trigger(self, t: Trigger) -> dict[str, Any]:
        """Force a build of ``t.commit`` on the job's builder; the handle."""
        sched_name, _, builder = t.job.partition("/")
        what = f"force scheduler {sched_name!r}"
        found = self._get(f"forceschedulers/{quote(sched_name, safe='')}", what=what)
        scheds = found.get("forceschedulers") if isinstance(found, dict) else None
        if not scheds:
            raise CiRefused(f"{self._where()}: no {what}")
        sched = scheds[0]
        builders = [str(b) for b in sched.get("builder_names") or []]
        if not sched.get("enabled", True):
            raise CiRefused(f"{self._where()}: {what} is disabled")
        if builder and builder not in builders:
            raise CiRefused(f"{self._where()}: {what} does not start builder {builder!r} "
                            f"(it starts: {', '.join(builders) or 'none'})")
        if not builder:
            if len(builders) != 1:
                raise CiRefused(f"{self._where()}: {what} starts {len(builders)} builders "
                                f"({', '.join(builders)}): name one as "
                                f"'{sched_name}/<builder>' in the project's ci.job")
            builder = builders[0]
        branch = t.ref.removeprefix("refs/heads/")
        params: dict[str, Any] = {
            "reason": f"deploybus: {t.project} {branch} {t.commit[:12]}",
            **t.parameters,
            "builderNames": [builder], "revision": t.commit, "branch": branch,
            "project": t.project}
        answer = self._rpc(f"forceschedulers/{quote(sched_name, safe='')}", "force", params,
                           what=f"force of {what}")
        try:
            bsid, brids = answer
            (builderid, brid), = ((int(k), int(v)) for k, v in brids.items())
            return {"buildsetid": int(bsid), "builderid": builderid, "buildrequestid": brid}
        except (TypeError, ValueError, AttributeError):
            raise CiRefused(f"{self._where()}: force of {what}: unexpected answer "
                            f"{str(answer)[:_QUOTE]!r}") from None

    def poll(self, handle: dict[str, Any], *, tail: int = 50) -> BuildStatus:
        """Where the build of ``handle`` is; a finished one with its log's tail."""
        handle = dict(handle)
        try:
            bsid = int(handle["buildsetid"])
            brid = int(handle["buildrequestid"]) if handle.get("buildrequestid") else None
        except (KeyError, TypeError, ValueError):
            raise CiRefused(f"{self._where()}: not a Buildbot build handle: "
                            f"{str(handle)[:_QUOTE]}") from None
        if brid is None:
            q = f"buildrequests?buildsetid={bsid}"
            if handle.get("builderid"):
                q += f"&builderid={int(handle['builderid'])}"
            reqs = self._list(q, "buildrequests", what=f"build requests of buildset {bsid}")
        else:
            reqs = self._list(f"buildrequests/{brid}", "buildrequests",
                              what=f"build request {brid}")
        if not reqs:
            raise CiRefused(f"{self._where()}: buildset {bsid} has no build request "
                            "(is this the master that queued it?)")
        req = reqs[0]
        brid = int(req["buildrequestid"])
        handle.update(buildrequestid=brid, builderid=int(req["builderid"]))
        builds = self._list(f"buildrequests/{brid}/builds", "builds",
                            what=f"builds of build request {brid}")
        if not builds:
            queue_url = f"{self.url}/#/buildrequests/{brid}"
            if not req.get("complete"):
                return BuildStatus(state="queued", handle=handle, url=queue_url)
            code = req.get("results")
            if code is None or code == CANCELLED:
                return BuildStatus(state="cancelled", handle=handle, url=queue_url,
                                   why=f"Buildbot build request {brid}")
            return BuildStatus(state="finished", handle=handle, url=queue_url,
                               result=BUILDBOT_RESULTS.get(code, "FAILURE"),
                               why="completed without a build")
        build = max(builds, key=lambda b: int(b["buildid"]))
        number = int(build["number"])
        handle.update(buildid=int(build["buildid"]), number=number)
        url = f"{self.url}/#/builders/{int(build['builderid'])}/builds/{number}"
        if not build.get("complete"):
            return BuildStatus(state="started", handle=handle, number=number, url=url,
                               why=build.get("state_string"))
        if not req.get("complete"):  # that build ended in RETRY: the request waits again
            return BuildStatus(state="queued", handle=handle, number=number, url=url,
                               why=f"retrying after: {build.get('state_string')}")
        code = build.get("results")
        started, ended = build.get("started_at"), build.get("complete_at")
        duration = float(ended - started) if started is not None and ended is not None else None
        return BuildStatus(state="finished", handle=handle, number=number, url=url,
                           result=BUILDBOT_RESULTS.get(code, "FAILURE") if code is not None
                           else "FAILURE",
                           duration=duration, why=build.get("state_string"),
                           console_tail=self._tail(int(build["buildid"]), tail))

    def close(self) -> None:
        """Close the HTTP session (its connections and login)."""
        if self._session is not None:
            self._session.close()
        self._session, self._logged_in = None, False

    # -- the console tail -------------------------------------------------

    def _tail(self, buildid: int, tail: int) -> list[str]:
        """The last ``tail`` lines of the build's console: every step's text
        logs after a line naming the step, read from the end back until
        there are enough."""
        if tail <= 0:
            return []
        steps = self._list(f"builds/{buildid}/steps", "steps", what=f"steps of build {buildid}")
        out: list[str] = []  # the console's end, filled in from the back
        for step in sorted(steps, key=lambda s: int(s.get("number", 0)), reverse=True):
            name = step.get("name")
            logs = self._list(f"steps/{int(step['stepid'])}/logs", "logs",
                              what=f"logs of step {name!r}")
            lines: list[str] = []
            for log in sorted(logs, key=lambda g: int(g["logid"]), reverse=True):
                if log.get("type") in _TEXT_LOGS and log.get("num_lines"):
                    lines = self._log_tail(log, tail - len(out) - len(lines), step=name) + lines
                if len(out) + len(lines) >= tail:
                    break
            if lines:
                out = [f"=== {name}: {step.get('state_string', '')}", *lines, *out]
            if len(out) >= tail:
                break
        return out[-tail:]

    def _log_tail(self, log: dict[str, Any], need: int, *, step: Any) -> list[str]:
        """The last ``need`` lines of one log that go into the console (see
        :func:`_stdio`), read in windows from its end, each twice the last,
        until there are enough or the log's start is reached."""
        kept: list[str] = []
        end, window = int(log["num_lines"]), need + 10
        while end > 0 and len(kept) < need:
            start = max(0, end - window)
            got = self._get(f"logs/{int(log['logid'])}/contents?offset={start}&limit={end - start}",
                            what=f"log {log.get('name')!r} of step {step!r}")
            chunk = "".join(c.get("content") or "" for c in got.get("logchunks", []))
            kept = (_stdio(chunk) if log.get("type") == "s" else chunk.splitlines()) + kept
            end, window = start, window * 2
        return kept[-need:]

    # -- HTTP -------------------------------------------------------------

    def _where(self) -> str:
        return f"ci.{self.name} (Buildbot at {self.safe_url})"

    def _get(self, path: str, *, what: str) -> Any:
        return self._call("GET", path, what=what)

    def _list(self, path: str, key: str, *, what: str) -> list[dict[str, Any]]:
        got = self._get(path, what=what)
        items = got.get(key) if isinstance(got, dict) else None
        if not isinstance(items, list):
            raise CiRefused(f"{self._where()}: {what}: not a Buildbot answer")
        return items

    def _rpc(self, path: str, method: str, params: dict[str, Any], *, what: str) -> Any:
        body = {"jsonrpc": "2.0", "method": method, "id": 1, "params": params}
        answer = self._call("POST", path, json_body=body, what=what)
        if not isinstance(answer, dict) or "result" not in answer:
            err = answer.get("error") if isinstance(answer, dict) else None
            raise CiRefused(f"{self._where()}: {what}: {_message(err) or 'no result'}")
        return answer["result"]

    def _call(self, method: str, path: str, *, what: str, json_body: Any = None) -> Any:
        """One call of the API, logged in first if there are credentials;
        JSON of a 2xx answer, else the error it means."""
        session = self._http()
        for attempt in (1, 2):
            r = self._send(session, method, f"{self.url}/api/v2/{path}", what=what,
                           json=json_body)
            if r.status_code in (401, 403) and self._credentials and attempt == 1:
                self._logged_in = False  # the session may have lapsed: once more
                session = self._http()
                continue
            break
        self._raise_for(r, what)
        try:
            return r.json()
        except ValueError:
            raise CiRefused(f"{self._where()}: {what}: the answer is not JSON "
                            f"(is {self.safe_url} a Buildbot www?)") from None

    def _http(self) -> requests.Session:
        """The session, logged in if there are credentials."""
        if self._session is None:
            self._session = requests.Session()
            self._session.headers["Accept"] = "application/json"
        if self._credentials and not self._logged_in:
            self._session.auth = self._read_credentials()
            r = self._send(self._session, "GET", f"{self.url}/auth/login", what="login",
                           allow_redirects=False)
            if r.status_code not in (404, 501):  # no such resource: the master has no auth
                self._raise_for(r, "login")
            self._logged_in = True
        return self._session

    def _read_credentials(self) -> tuple[str, str]:
        assert self._credentials is not None
        try:
            line = self._credentials.read_text().strip().splitlines()[0]
        except (OSError, IndexError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or "empty or not text"
            raise CiRefused(f"{self._where()}: cannot read the credentials file "
                            f"{self._credentials}: {why}") from None
        user, colon, password = line.partition(":")
        if not colon or not user:
            raise CiRefused(f"{self._where()}: the credentials file {self._credentials} "
                            "does not hold user:password")
        return user, password

    def _send(self, session: requests.Session, method: str, url: str, *, what: str,
              **kw: Any) -> requests.Response:
        try:
            return session.request(method, url, timeout=self.timeout, **kw)
        except requests.Timeout:
            raise CiUnavailable(f"{self._where()}: {what}: no answer within "
                                f"{self.timeout:g}s") from None
        except requests.RequestException as e:
            raise CiUnavailable(f"{self._where()}: {what}: {_reason(e)}") from None

    def _raise_for(self, r: requests.Response, what: str) -> None:
        code = r.status_code
        if code < 300 or (what == "login" and code < 400):
            return
        said = _message(_json_or_none(r)) or r.reason or ""
        msg = f"{self._where()}: {what}: HTTP {code}" + (f" ({said[:_QUOTE]})" if said else "")
        if code >= 500 or code in _TRANSIENT:
            raise CiUnavailable(msg)
        if code == 404:  # Buildbot's own text for it is a page of internals
            msg = f"{self._where()}: no {what} (HTTP 404)"
        if code in (401, 403):
            msg += ("; check the credentials file and the master's authz" if self._credentials
                    else "; the master needs a login: set credentials")
        raise CiRefused(redact.text(msg))


def _stdio(chunk: str) -> list[str]:
    """The lines of a stdio log chunk: each stored line starts with its
    stream, ``o`` (stdout), ``e`` (stderr) or ``h`` (the worker's header: the
    command, its argv, directory, and with ``logEnviron`` the whole
    environment, which may hold secrets); of the header only how the command
    ended is kept."""
    out = []
    for line in chunk.splitlines():
        stream, text = line[:1], line[1:]
        if stream in ("o", "e") or (stream == "h" and _ENDED.match(text)):
            out.append(text)
    return out


def _json_or_none(r: requests.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return None


def _message(err: Any) -> str:
    """What a Buildbot error answer says: ``{"error": "..."}`` (REST) or
    ``{"error": {"code": .., "message": ..}}`` (JSON-RPC)."""
    if isinstance(err, dict):
        err = err.get("error", err)
        if isinstance(err, dict):
            err = err.get("message")
    return redact.text(str(err)) if err else ""


def _reason(e: Exception) -> str:
    """A short reason for a failed connection ("[Errno 111] Connection
    refused"), without the URL that requests puts around it."""
    m = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(e))
    return m[0].strip() if m else f"cannot connect ({type(e).__name__})"


BACKENDS[BuildbotBackend.type] = BuildbotBackend
