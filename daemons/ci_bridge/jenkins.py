"""Jenkins behind the CI-backend interface (:class:`JenkinsBackend`).

jenkinsapi (the design's Jenkins client) holds the connection: its
``Jenkins`` object with a crumb-aware requester (basic auth with the user's
API token, the CSRF crumb fetched and sent with every POST and fetched again
when Jenkins refuses it, one ``requests`` session, so the crumb's web-session
cookie goes with it), and its ``Job`` reads the job and its declared
parameters. Where a real queue needs what jenkinsapi 0.3.x gets wrong or does
not do, this module talks to Jenkins's documented JSON API through that same
requester (same session, credentials, timeout and TLS settings):

- **Triggering.** ``Job.invoke()`` POSTs, then GETs the queue item and checks
  that ``Location`` starts with our base URL before it returns the
  ``QueueItem``. When either fails (a 5xx or a timeout just after the POST;
  Jenkins behind a proxy answering with its own root URL) it raises *after*
  the build was queued: the handle is lost and the bridge, retrying, would
  queue a second build each time. Here the POST is the last thing
  :meth:`JenkinsBackend.trigger` does; the queue id is read from
  ``Location`` (``201 Created``, or ``303 See Other`` when Jenkins folded the
  request into an identical waiting item) and the handle names the queue
  item under our own base URL.
- **Following the build.** jenkinsapi's ``QueueItem`` and ``Build`` know
  nothing of a queue item Jenkins forgot (404 five minutes after it left
  the queue), of a build that has left the queue before its executable
  exists, or of finding the build again by its ``queueId``; and ``Build``
  polls the whole build object. :meth:`JenkinsBackend.poll` reads
  ``/queue/item/N/api/json``, then ``/job/NAME/N/api/json`` (with a
  ``tree``) and the end of ``consoleText`` (streamed, only the last lines
  kept).
- **Errors.** jenkinsapi's crumb requester reads ``/crumbIssuer/api/python``
  and raises a bare ``RuntimeError`` with Jenkins's page when that fails, so
  a 401 and a 503 look alike; :class:`_Requester` reads the JSON API and
  keeps the HTTP status. Every failure is translated where it enters:
  unreachable, timed out or 5xx -> :class:`CiUnavailable`; 401, 403, 404, a
  cancelled or lost queue item -> :class:`CiRefused`. No message carries the
  token (they name the credentials file instead).
- **Cost.** The ``Jenkins`` object is made ``lazy``: otherwise it fetches the
  list of every job (and walks every folder) when made, and a ``Job`` of a
  job with more than 100 builds fetches all of them.

A parameter the job does not declare is refused before anything is queued:
Jenkins drops undeclared parameters without a word
(``ParametersDefinitionProperty.buildWithParameters`` reads only the
declared ones), so the build would run with the job's default commit.
"""

from __future__ import annotations

import collections
import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from jenkinsapi.custom_exceptions import JenkinsAPIException
from jenkinsapi.jenkins import Jenkins
from jenkinsapi.utils.crumb_requester import CrumbRequester

from deploybus.daemons.ci_bridge.backend import (
    BACKENDS,
    Backend,
    BuildStatus,
    CiRefused,
    CiUnavailable,
    Trigger,
)
from deploybus.errors import CiError

__all__ = ["JenkinsBackend"]

#: Seconds one HTTP call may take unless the config says otherwise.
TIMEOUT = 10.0

#: Characters kept of one console line (a minified bundle can be one line).
LINE_CHARS = 2000

#: Statuses a POST to buildWithParameters answers when the build was queued:
#: 201 for a new queue item, 303 when it was folded into a waiting one (and
#: 200, which jenkinsapi accepts too).
QUEUED = (200, 201, 303)

#: What the build's JSON is asked for (Jenkins's ``tree``): no actions, no
#: change sets, no artifacts.
BUILD_TREE = "number,url,building,result,duration,queueId"

#: The queue item in a ``Location`` header.
_QUEUE_ITEM = re.compile(r"/queue/item/(\d+)/?$")


class _Requester(CrumbRequester):
    """jenkinsapi's crumb requester, with a crumb fetch that keeps the HTTP
    status: from the JSON API, 404 meaning "this Jenkins issues no crumbs",
    any other failure a :class:`requests.HTTPError` with the response (not a
    ``RuntimeError`` with the page in it)."""

    def _get_crumb_data(self) -> dict[str, str] | bool:
        response = self.get_url(self._baseurl + "/crumbIssuer/api/json")
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise requests.HTTPError(f"{response.status_code} from the crumb issuer",
                                     response=response)
        body = response.json()
        return {str(body["crumbRequestField"]): str(body["crumb"])}


class JenkinsBackend(Backend):
    """One Jenkins server (``ci.<name>`` with ``type: jenkins``).

    Settings: ``url`` (the Jenkins root), ``credentials`` (a file holding
    ``user:token``, read when the first call needs it and again after a
    401, so a rotated token is picked up), ``timeout`` (seconds per HTTP
    call). The handle :meth:`trigger` returns is ``{"job", "queue_id",
    "queue_url"}``; :meth:`poll` adds ``"number"`` once an executor took the
    build, and polls the build alone from then on."""

    type = "jenkins"

    def __init__(self, name: str, settings: dict[str, Any]) -> None:
        super().__init__(name, settings)
        self.url = str(settings["url"]).rstrip("/")
        self.timeout = float(settings.get("timeout") or TIMEOUT)
        creds = settings.get("credentials")
        self.credentials = Path(creds) if creds else None
        self._client: Jenkins | None = None
        self._token: str | None = None  # only to keep it out of messages
        self._lock = threading.Lock()

    # -- the interface -------------------------------------------------------------

    def trigger(self, t: Trigger) -> dict[str, Any]:
        """Queue a build of ``t.job`` with ``t.parameters``; the handle of its
        queue item."""
        jenkins = self._jenkins()
        what = f"job {t.job!r}"
        with self._errors(what):
            job = jenkins.get_job_by_url(self._job_url(t.job), t.job)
            declared = set(job.get_params_list())
            undeclared = sorted(set(t.parameters) - declared)
            if undeclared:
                raise self._refused(
                    f"{what} does not declare the parameter(s) {', '.join(undeclared)} "
                    f"(it declares: {', '.join(sorted(declared)) or 'none'}); Jenkins would "
                    f"drop them and build with its defaults: add them to the job as string "
                    f"parameters, or change projects.<project>.ci.parameters")
            response = jenkins.requester.post_url(job.get_build_triggerurl(),
                                                  data=dict(t.parameters),
                                                  allow_redirects=False)
        if response.status_code not in QUEUED:
            raise self._http_error(response, what)
        location = response.headers.get("Location", "")
        match = _QUEUE_ITEM.search(urlsplit(location).path)
        if match is None:
            raise self._refused(f"{what}: Jenkins answered {response.status_code} without "
                                f"naming a queue item (Location: {location[:100]!r}); is it "
                                f"older than 1.519?")
        queue_id = int(match.group(1))
        return {"job": t.job, "queue_id": queue_id,
                "queue_url": f"{self.url}/queue/item/{queue_id}/"}

    def poll(self, handle: dict[str, Any], *, tail: int = 50) -> BuildStatus:
        """Where the build of ``handle`` is: its queue item until an executor
        took it, then the build itself (the queue item is forgotten by
        Jenkins five minutes after it left the queue)."""
        h = dict(handle)
        job, queue_id, number = h.get("job"), h.get("queue_id"), h.get("number")
        if not isinstance(job, str) or not isinstance(queue_id if number is None else number,
                                                      int):
            raise self._refused(f"not a Jenkins build handle: {sorted(h)}")
        if number is None:
            assert isinstance(queue_id, int)
            item = self._get_json(f"{self.url}/queue/item/{queue_id}/",
                                  f"queue item {queue_id} of job {job!r}", missing_ok=True)
            if item is None:
                number = self._number_by_queue_id(job, queue_id)
            elif item.get("cancelled"):
                raise self._refused(f"the build of job {job!r} was cancelled in the queue "
                                    f"(queue item {queue_id})")
            elif not isinstance(item.get("executable"), dict):
                # waiting, blocked, buildable, or handed to an executor that has
                # not made the build yet
                return BuildStatus(state="queued", handle=h, why=item.get("why"))
            else:
                number = int(item["executable"]["number"])
            h["number"] = number
        build = self._get_json(self._build_url(job, number), f"build #{number} of job {job!r}",
                               tree=BUILD_TREE)
        assert build is not None
        url = build.get("url") or self._build_url(job, number)
        result = build.get("result")
        # a build that is finishing may say building: false before its result is set
        if build.get("building") or result is None:
            return BuildStatus(state="started", handle=h, number=number, url=url)
        return BuildStatus(state="finished", handle=h, result=str(result), number=number,
                           url=url, duration=float(build.get("duration") or 0) / 1000,
                           console_tail=self._console_tail(job, number, tail) if tail > 0
                           else [])

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.requester.session.close()

    # -- talking to Jenkins --------------------------------------------------------

    def _jenkins(self) -> Jenkins:
        """jenkinsapi's Jenkins object; made (credentials read) on first use."""
        with self._lock:
            if self._client is None:
                user, token = self._read_credentials()
                self._token = token
                requester = _Requester(user, token, baseurl=self.url, timeout=self.timeout,
                                       max_retries=None)
                # lazy: no poll of every job (and folder) now
                self._client = Jenkins(self.url, requester=requester, lazy=True,
                                       timeout=self.timeout)
            return self._client

    def _read_credentials(self) -> tuple[str | None, str | None]:
        if self.credentials is None:
            return None, None
        try:
            text = self.credentials.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise self._refused(f"cannot read the credentials file {self.credentials}: "
                                f"{exc.strerror or type(exc).__name__}") from None
        user, _, token = text.partition(":")
        if not user or not token or "\n" in text:
            raise self._refused(f"the credentials file {self.credentials} must hold one line "
                                f"user:token (a Jenkins API token)")
        return user, token

    def _get_json(self, url: str, what: str, *, tree: str | None = None,
                  missing_ok: bool = False) -> dict[str, Any] | None:
        """``url``'s JSON API (``url`` ends with ``/``); None for a 404 if ``missing_ok``."""
        with self._errors(what):
            response = self._jenkins().requester.get_url(
                url + "api/json", params={"tree": tree} if tree else None)
            if response.status_code == 404 and missing_ok:
                return None
            if response.status_code != 200:
                raise self._http_error(response, what)
            body = response.json()
        if not isinstance(body, dict):
            raise self._unavailable(f"{what}: the answer is not a JSON object")
        return body

    def _number_by_queue_id(self, job: str, queue_id: int) -> int:
        """The build that came from a queue item Jenkins no longer knows: a
        build records the ``queueId`` it came from (the job lists its last
        100 builds)."""
        body = self._get_json(self._job_url(job) + "/", f"job {job!r}",
                              tree="builds[number,queueId]")
        assert body is not None
        for build in body.get("builds") or []:
            if build.get("queueId") == queue_id:
                return int(build["number"])
        raise self._refused(f"queue item {queue_id} of job {job!r} is gone and none of the "
                            f"job's last builds came from it: it was cancelled (Jenkins "
                            f"forgets a queue item five minutes after it left the queue), "
                            f"or Jenkins lost its queue")

    def _console_tail(self, job: str, number: int, tail: int) -> list[str]:
        """The last ``tail`` lines of the build's log, read as a stream so a
        large log is never held whole. A build without a log: no lines."""
        what = f"the console log of build #{number} of job {job!r}"
        lines: collections.deque[bytes] = collections.deque(maxlen=tail)
        with self._errors(what):
            response = self._jenkins().requester.get_url(
                self._build_url(job, number) + "consoleText", stream=True)
            try:
                if response.status_code == 404:
                    return []
                if response.status_code != 200:
                    raise self._http_error(response, what)
                rest = b""
                for chunk in response.iter_content(64 * 1024):
                    *done, rest = (rest + chunk).split(b"\n")
                    lines.extend(done)
                    rest = rest[:LINE_CHARS * 4]
                if rest:
                    lines.append(rest)
            finally:
                response.close()
        return [line.decode("utf-8", "replace").rstrip("\r")[:LINE_CHARS] for line in lines]

    def _job_url(self, job: str) -> str:
        """``a/b`` is job ``b`` in folder ``a``: ``<url>/job/a/job/b``."""
        return self.url + "".join(f"/job/{quote(part, safe='')}"
                                  for part in job.strip("/").split("/"))

    def _build_url(self, job: str, number: int) -> str:
        return f"{self._job_url(job)}/{number}/"

    # -- errors ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate what requests and jenkinsapi raise into the error tree."""
        try:
            yield
        except CiError:
            raise
        except requests.HTTPError as exc:
            if exc.response is None:
                raise self._unavailable(f"{what}: {type(exc).__name__}") from None
            raise self._http_error(exc.response, what) from None
        except requests.Timeout:
            raise self._unavailable(f"no answer within {self.timeout:g} s ({what})") from None
        except requests.ConnectionError as exc:
            raise self._unavailable(f"cannot connect: {_reason(exc)} ({what})") from None
        except (JenkinsAPIException, ValueError, KeyError, TypeError):
            # not JSON (requests' JSONDecodeError is a ValueError), or JSON without
            # Jenkins's fields: a proxy's page, or no Jenkins at this URL
            raise self._unavailable(f"the answer about {what} is not Jenkins's remote API "
                                    f"(a proxy's page?)") from None
        except requests.RequestException as exc:
            raise self._unavailable(f"{type(exc).__name__} ({what})") from None

    def _http_error(self, response: requests.Response, what: str) -> CiError:
        status = response.status_code
        said = _said(response)
        if status >= 500 or status in (408, 429):
            return self._unavailable(f"answered {status}{said} ({what})")
        if status == 401:
            with self._lock:  # read the file again next time: the token may be rotated
                self._client = None
            return self._refused(f"answered 401{said}: the user or API token in "
                                 f"{self.credentials} is wrong or revoked ({what})")
        if status == 403:
            return self._refused(f"answered 403{said}: the user may not do this (it needs "
                                 f"Overall/Read, Job/Read and Job/Build), or the CSRF crumb was "
                                 f"refused ({what})")
        if status == 404:
            return self._refused(f"answered 404: no {what} (or the user may not see it)")
        return self._refused(f"answered {status}{said} ({what})")

    def _where(self, message: str) -> str:
        text = f"ci.{self.name}: Jenkins at {self.url}: {message}"
        if self._token:
            text = text.replace(self._token, "***")
        return text

    def _refused(self, message: str) -> CiRefused:
        return CiRefused(self._where(message))

    def _unavailable(self, message: str) -> CiUnavailable:
        return CiUnavailable(self._where(message))


def _said(response: requests.Response) -> str:
    """Jenkins's own words from an error page (``Error 403 No valid crumb was
    included in the request``), short; or nothing."""
    try:
        text = response.text[:4000]
    except Exception:  # a body that cannot be decoded says nothing
        return ""
    match = re.search(r"<title>(?:Error \d+ )?([^<]{1,160})</title>", text) or \
        re.search(r"HTTP ERROR \d+ ([^<\n]{1,160})", text)
    return f" {match.group(1).strip()!r}" if match else ""


def _reason(exc: requests.ConnectionError) -> str:
    """Why a connection failed, in the operating system's words."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if match:
        return match.group(1).strip()
    for reason in ("Connection aborted", "RemoteDisconnected", "Connection reset"):
        if reason in text:
            return reason.lower()
    return type(exc).__name__


BACKENDS["jenkins"] = JenkinsBackend
