"""Forge push webhooks: which forge sent one, whether it is signed, what it says.

Pure functions, no I/O: the HTTP receiver (:mod:`.listener`) reads the request
and calls :func:`detect`, :func:`parse`, :func:`matches`, :func:`verify` and
:func:`delivery_id`; each push a delivery carries becomes a ``git.push`` body
(``deploybus.protocol.GitPush`` without its ``project``, which the receiver
adds from the config).

What each forge sends, and what is made of it
=============================================

==========  =====================  ==========================  ===================
forge       event header           signature / token           delivery id
==========  =====================  ==========================  ===================
github      ``X-GitHub-Event``     ``X-Hub-Signature-256``:    ``X-GitHub-Delivery``
                                   ``sha256=`` + hex HMAC-
                                   SHA256 of the body
gitlab      ``X-Gitlab-Event``     ``X-Gitlab-Token``: the     ``Idempotency-Key``,
                                   secret itself               else ``X-Gitlab-
                                                               Event-UUID``
gitea       ``X-Gitea-Event``      ``X-Gitea-Signature``: hex  ``X-Gitea-Delivery``
            (``X-Forgejo-Event``,  HMAC-SHA256 of the body
            ``X-Gogs-Event``)      (``X-Forgejo-`` /
                                   ``X-Gogs-Signature``)
bitbucket   ``X-Event-Key``        ``X-Hub-Signature``:        ``X-Request-UUID``
                                   ``sha256=`` + hex HMAC-
                                   SHA256 of the body
==========  =====================  ==========================  ===================

Gitea (and Forgejo, its fork, and Gogs, its ancestor, same payloads) also sends
``X-GitHub-Event``/``X-GitHub-Delivery`` and ``X-Gogs-*`` for compatibility,
so it is recognised before GitHub. Header names are matched whatever their
case, in a plain dict or in werkzeug's ``Headers``.

Published (each gives ``pushes``):

* **github** ``push``: ``ref``, ``before``, ``after``, ``pusher.name`` (else
  ``sender.login``), ``commits[]``. ``created``/``deleted`` follow the shas.
* **gitlab** ``Push Hook`` and ``Tag Push Hook`` (and a ``System Hook`` whose
  ``object_kind`` or ``event_name`` is ``push`` or ``tag_push``): ``ref``,
  ``before``, ``after``, ``user_username`` (else ``user_name``: the documented tag example has no
  ``user_username``), ``commits[]``. ``new`` is ``after``, not
  ``checkout_sha``: that is ``null`` when a tag is deleted.
* **gitea** ``push`` (branches and tags; Gitea also sends a push, with an
  all-zero ``after``, when a tag is deleted): ``ref``, ``before``, ``after``,
  ``pusher.login`` (else ``pusher.username``, ``sender.login``), ``commits[]``.
* **bitbucket** ``repo:push``: one push per entry of ``push.changes``; the ref
  is built from ``new.type``/``old.type`` (``branch`` -> ``refs/heads/``,
  ``tag`` -> ``refs/tags/``) and ``name``; ``old``/``new`` are the
  ``target.hash`` of ``old``/``new``, which are ``null`` when the ref is
  created/deleted (all zeros here). Pusher: ``actor.nickname``, else
  ``actor.display_name``. A change of any other type (Mercurial's
  ``named_branch``/``bookmark``) is skipped.

Every push has ``ref`` (a full refname), ``old`` and ``new`` (lower-case hex;
a missing side is ``"0" * 40``, as in :mod:`.hook`: created means ``old`` is
zeros, deleted means ``new`` is zeros), ``pusher``, ``created``, ``deleted``
and ``commits``: ``{"id", "author", "subject"}`` (author name and first line
of the message, each cut to 200 characters), oldest first, at most the newest
50 (GitHub, GitLab: oldest first as sent; Gitea and Bitbucket list them
newest first and are reversed). ``new`` is the ref's new value as the forge
reports it, as the git hook does: for an annotated tag GitHub, GitLab and
Gitea give the tag object, Bitbucket the commit.

Pings (answered, nothing published): GitHub ``ping`` (``zen``, ``hook_id``),
Bitbucket ``diagnostics:ping``, and any push that moves nothing (``before``
equal to ``after``): that is what Gitea's "Test Delivery" sends (the default
branch's head as both, zeros in an empty repository), and GitLab's "Test" of
a push event in a repository of one commit. GitLab's test otherwise sends the
default branch's last three commits as an ordinary ``Push Hook`` that nothing
tells from a real push: it is published like one (the auto-deploy skips it
when the environment already runs that head).

Ignored (empty ``pushes``, ``ping`` false; the receiver answers 202): every
other event (``issues``, ``Merge Request Hook``, ``pullrequest:created``,
...), and Bitbucket Data Center's ``repo:refs_changed``, whose shape is not
Bitbucket Cloud's. GitHub's and Gitea's ``create`` and ``delete`` events are
ignored on purpose: every ref a ``git push`` creates or deletes also comes as
a ``push`` event, with ``before``/``after`` and the commits, while ``create``
and ``delete`` carry only the short ref name and its type, no sha; publishing
both would say each creation twice, and a ``git.push`` without shas is of no
use to anyone (the fetcher and the auto-deploy act on ``new``). The one
thing lost: Gitea sends no push when a *branch* is deleted, only ``delete``;
nothing in deploybus acts on deletions yet.

Malformed (:class:`WebhookError`, status 400): a body that is not a JSON
object, or a push event without what a push needs (a full ``ref``, hex
``before``/``after``; for Bitbucket a ``push.changes`` list whose entries
name a ref and a hash). Every function here is total: whatever JSON arrives,
:func:`parse` returns a :class:`Delivery` or raises :class:`WebhookError`,
and every push it returns is a valid ``git.push`` body once a ``project`` is
added.

:func:`delivery_id` returns the forge's own id as sent (at most 200
printable characters), not prefixed by the forge: the receiver keys
de-duplication on ``"<forge>:<id>"``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from deploybus.errors import WebhookError

FORGES = ("github", "gitlab", "gitea", "bitbucket")

#: The sha of a ref that does not exist (as in daemons/git_listener/hook.py).
ZERO = "0" * 40
#: Commits kept per push (the newest).
MAX_COMMITS = 50
#: Longest author, subject and pusher kept.
MAX_TEXT = 200
#: Longest delivery id kept.
MAX_ID = 200
#: Longest ref accepted (protocol.GitPush.ref).
MAX_REF = 250
#: Longest event name and repository name kept.
MAX_NAME = 1000

_SHA_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]{64}")
#: Characters refused in a ref or a branch/tag name: controls, space, DEL.
_REF_BAD_RE = re.compile(r"[\x00-\x20\x7f]")
#: Unicode categories dropped from free text: controls, surrogates (they
#: cannot be encoded), line and paragraph separators.
_BAD_TEXT = frozenset({"Cc", "Cs", "Zl", "Zp"})


@dataclass(frozen=True)
class Delivery:
    """What one webhook delivery says."""

    #: One of :data:`FORGES`.
    forge: str
    #: The forge's event name as sent ("push", "Tag Push Hook", "repo:push").
    event: str
    #: The forge's delivery id (:func:`delivery_id`), None if it sent none.
    id: str | None
    #: Every name the payload gives its repository: full name, clone URLs, web URL.
    repository: frozenset[str]
    #: ``git.push`` bodies without ``project``.
    pushes: tuple[dict[str, Any], ...]
    #: A ping or test delivery: answered, publishes nothing.
    ping: bool


# -- headers ---------------------------------------------------------------------------


class HeaderMap(Protocol):
    """Request headers: anything with ``items()`` of (name, value) pairs, so
    a ``Mapping[str, str]`` (a dict, in any case) and werkzeug's ``Headers``
    (which is not a Mapping: iterating it yields pairs) both fit."""

    def items(self) -> Iterable[tuple[str, str]]: ...


def _lower_headers(headers: HeaderMap) -> dict[str, str]:
    """The headers by lower-case name (the first of repeated ones), whatever
    the mapping: a dict of any case, werkzeug ``Headers`` (whose iteration
    yields pairs), ``email.message.Message``."""
    out: dict[str, str] = {}
    try:
        items: Iterable[Any] = headers.items()
    except AttributeError:
        return out
    for item in items:
        try:
            key, value = item
        except (TypeError, ValueError):
            continue
        if isinstance(key, str) and isinstance(value, str):
            out.setdefault(key.lower(), value)
    return out


def _first(h: dict[str, str], *names: str) -> str | None:
    """The first of ``names`` present with a non-blank value, stripped."""
    for name in names:
        value = h.get(name)
        if value is not None and value.strip():
            return value.strip()
    return None


_EVENT_HEADERS: dict[str, tuple[str, ...]] = {
    "gitea": ("x-gitea-event", "x-forgejo-event", "x-gogs-event"),
    "github": ("x-github-event",),
    "gitlab": ("x-gitlab-event",),
    "bitbucket": ("x-event-key",),
}

_ID_HEADERS: dict[str, tuple[str, ...]] = {
    "github": ("x-github-delivery",),
    "gitea": ("x-gitea-delivery", "x-forgejo-delivery", "x-gogs-delivery"),
    "gitlab": ("idempotency-key", "x-gitlab-event-uuid"),
    "bitbucket": ("x-request-uuid",),
}


def detect(headers: HeaderMap) -> str | None:
    """Which forge sent a request, from its event header; None if none we know.

    Gitea comes first: it sends ``X-GitHub-Event`` too."""
    h = _lower_headers(headers)
    for forge, names in _EVENT_HEADERS.items():
        if _first(h, *names) is not None:
            return forge
    return None


def delivery_id(forge: str, headers: HeaderMap) -> str | None:
    """The forge's id of this delivery, for de-duplication: the same on a
    redelivery (GitHub, Gitea, GitLab's ``Idempotency-Key``). As sent, not
    prefixed; None if absent, longer than 200 characters or not printable."""
    names = _ID_HEADERS.get(forge) if isinstance(forge, str) else None
    if names is None:
        return None
    value = _first(_lower_headers(headers), *names)
    if value is None or len(value) > MAX_ID or not value.isprintable() \
            or any(unicodedata.category(c) == "Cs" for c in value):
        return None
    return value


# -- signatures ------------------------------------------------------------------------


def _hmac_hex(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of two strings (any characters)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"),
                               expected.encode("utf-8", "replace"))


def _prefixed_hex(value: str | None) -> str | None:
    """The hex digest of a ``sha256=<hex>`` header, None if not of that form."""
    if value is None:
        return None
    algo, sep, digest = value.partition("=")
    if not sep or algo.strip().lower() != "sha256":
        return None
    return digest.strip().lower()


def verify(forge: str, headers: HeaderMap, body: bytes, secret: bytes) -> bool:
    """Whether the delivery is signed (or carries the token) with ``secret``.

    Constant-time; False when the header is missing, the secret is empty or
    the forge unknown. GitHub's SHA-1 ``X-Hub-Signature`` is not accepted."""
    if not isinstance(secret, bytes | bytearray) or not secret \
            or not isinstance(body, bytes | bytearray):
        return False
    secret, body = bytes(secret), bytes(body)
    h = _lower_headers(headers)
    if forge == "github":
        given = _prefixed_hex(_first(h, "x-hub-signature-256"))
    elif forge == "bitbucket":
        given = _prefixed_hex(_first(h, "x-hub-signature"))
    elif forge == "gitea":
        raw = _first(h, "x-gitea-signature", "x-forgejo-signature", "x-gogs-signature")
        given = raw.lower() if raw is not None else None
    elif forge == "gitlab":
        token = h.get("x-gitlab-token")
        if token is None:
            return False
        # The token is the secret itself, compared as bytes: a WSGI server
        # hands header bytes over decoded as latin-1, a dict may hold text.
        candidates = [token.encode("utf-8", "replace")]
        if all(ord(c) < 256 for c in token):
            candidates.append(token.encode("latin-1"))
        return any([hmac.compare_digest(c, secret) for c in candidates])
    else:
        return False
    if given is None or not _HEX_RE.fullmatch(given):
        return False
    return _same(given, _hmac_hex(secret, body))


# -- parsing ---------------------------------------------------------------------------


def _bad(message: str) -> WebhookError:
    return WebhookError(message, status=400)


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object, limit: int = MAX_TEXT) -> str | None:
    """Free text (author, subject, pusher) made safe to carry: controls,
    surrogates and line separators dropped, cut to ``limit``; None if
    nothing is left."""
    if not isinstance(value, str):
        return None
    clean = "".join(c for c in value[:limit * 4] if unicodedata.category(c) not in _BAD_TEXT)
    clean = clean.strip()[:limit]
    return clean or None


def _subject(message: object) -> str | None:
    if not isinstance(message, str):
        return None
    return _text(message.strip().split("\n", 1)[0])


def _sha(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{what} is missing or not a string")
    sha = value.strip().lower()
    if not _SHA_RE.fullmatch(sha):
        raise _bad(f"{what} is not a full commit id: {value!r:.80}")
    return sha


def _zero(sha: str) -> bool:
    return set(sha) == {"0"}


def _ref(value: object, what: str = "ref") -> str:
    if not isinstance(value, str):
        raise _bad(f"{what} is missing or not a string")
    if not value.startswith("refs/") or len(value) > MAX_REF or len(value) <= len("refs/") \
            or _REF_BAD_RE.search(value) \
            or any(unicodedata.category(c) in _BAD_TEXT for c in value):
        raise _bad(f"{what} is not a full refname: {value!r:.80}")
    return value


def _commits(raw: object, *, newest_first: bool,
             entry: Callable[[dict[str, Any]], dict[str, Any] | None]) -> list[dict[str, Any]]:
    """``{"id", "author", "subject"}`` of the well-formed entries of ``raw``
    (any other is skipped), oldest first, the newest :data:`MAX_COMMITS`."""
    if not isinstance(raw, list):
        return []  # GitLab once sent "" for none; anything else: none
    out = []
    for item in raw:
        if not isinstance(item, dict):
            continue
        commit = entry(item)
        if commit is not None:
            out.append(commit)
    if newest_first:
        out.reverse()
    return out[-MAX_COMMITS:]


def _commit(cid: object, author: str | None, message: object) -> dict[str, Any] | None:
    if not isinstance(cid, str) or not _SHA_RE.fullmatch(cid.strip().lower()):
        return None
    return {"id": cid.strip().lower(), "author": author, "subject": _subject(message)}


def _git_commit(item: dict[str, Any]) -> dict[str, Any] | None:
    """A commit as GitHub, GitLab and Gitea give it: id, message, author.name."""
    return _commit(item.get("id"), _text(_dict(item.get("author")).get("name")),
                   item.get("message"))


def _bitbucket_author(author: object) -> str | None:
    """Bitbucket's ``author``: ``raw`` is ``Name <email>``; else the user's name."""
    a = _dict(author)
    raw = a.get("raw")
    if isinstance(raw, str):
        name = raw.split("<", 1)[0] if "<" in raw else raw
        if _text(name):
            return _text(name)
    user = _dict(a.get("user"))
    return _text(user.get("display_name")) or _text(user.get("nickname"))


def _bitbucket_commit(item: dict[str, Any]) -> dict[str, Any] | None:
    return _commit(item.get("hash"), _bitbucket_author(item.get("author")), item.get("message"))


def _push(ref: str, old: str, new: str, pusher: str | None,
          commits: list[dict[str, Any]]) -> dict[str, Any]:
    return {"ref": ref, "old": old, "new": new, "pusher": pusher,
            "created": _zero(old), "deleted": _zero(new), "commits": commits}


def _names(*values: object) -> frozenset[str]:
    """The usable names among ``values`` (strings; lists of strings)."""
    out = set()
    for value in values:
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and v.strip() and len(v) <= MAX_NAME \
                    and not any(unicodedata.category(c) in _BAD_TEXT for c in v):
                out.add(v.strip())
    return frozenset(out)


def _github_like_repository(payload: dict[str, Any]) -> frozenset[str]:
    """GitHub's and Gitea's ``repository``. Not ``url``: an API URL in most
    GitHub events; not Gitea's ``original_url``: a mirror's source."""
    r = _dict(payload.get("repository"))
    return _names(r.get("full_name"), r.get("html_url"), r.get("clone_url"),
                  r.get("ssh_url"), r.get("git_url"))


def _gitlab_repository(payload: dict[str, Any]) -> frozenset[str]:
    p, r = _dict(payload.get("project")), _dict(payload.get("repository"))
    return _names(p.get("path_with_namespace"), p.get("web_url"), p.get("git_http_url"),
                  p.get("git_ssh_url"), p.get("http_url"), p.get("ssh_url"), p.get("url"),
                  p.get("homepage"), r.get("url"), r.get("homepage"), r.get("git_http_url"),
                  r.get("git_ssh_url"))


def _bitbucket_repository(payload: dict[str, Any]) -> frozenset[str]:
    r = _dict(payload.get("repository"))
    links = _dict(r.get("links"))
    clone = [_dict(c).get("href") for c in links.get("clone") or []] \
        if isinstance(links.get("clone"), list) else []
    return _names(r.get("full_name"), _dict(links.get("html")).get("href"), clone)


def _simple_push(payload: dict[str, Any], pusher: str | None, *,
                 newest_first: bool) -> tuple[tuple[dict[str, Any], ...], bool]:
    """The one push of a GitHub, GitLab or Gitea push payload, and whether it
    is a test delivery (moves nothing)."""
    ref = _ref(payload.get("ref"))
    old = _sha(payload.get("before"), "before")
    new = _sha(payload.get("after"), "after")
    if old == new:
        return (), True
    commits = _commits(payload.get("commits"), newest_first=newest_first, entry=_git_commit)
    return (_push(ref, old, new, pusher, commits),), False


def _github(event: str, payload: dict[str, Any]) -> tuple[tuple[dict[str, Any], ...], bool]:
    if event == "ping":
        return (), True
    if event != "push":
        return (), False  # create/delete repeat what push says (module docstring)
    pusher = _text(_dict(payload.get("pusher")).get("name")) \
        or _text(_dict(payload.get("sender")).get("login"))
    return _simple_push(payload, pusher, newest_first=False)


def _gitea(event: str, payload: dict[str, Any]) -> tuple[tuple[dict[str, Any], ...], bool]:
    if event != "push":
        return (), False
    p = _dict(payload.get("pusher"))
    pusher = _text(p.get("login")) or _text(p.get("username")) \
        or _text(_dict(payload.get("sender")).get("login"))
    return _simple_push(payload, pusher, newest_first=True)


def _gitlab(event: str, payload: dict[str, Any]) -> tuple[tuple[dict[str, Any], ...], bool]:
    kinds = ("push", "tag_push")
    push = event in ("Push Hook", "Tag Push Hook") or event == "System Hook" and (
        payload.get("object_kind") in kinds or payload.get("event_name") in kinds)
    if not push:
        return (), False
    pusher = _text(payload.get("user_username")) or _text(payload.get("user_name"))
    return _simple_push(payload, pusher, newest_first=False)


_BITBUCKET_PREFIX = {"branch": "refs/heads/", "tag": "refs/tags/"}


def _bitbucket_change(change: object, pusher: str | None) -> dict[str, Any] | None:
    """The push of one ``push.changes[]`` entry; None for a ref type that is
    not a git branch or tag, or a change that moves nothing."""
    if not isinstance(change, dict):
        raise _bad("push.changes[] is not an object")
    old_raw, new_raw = change.get("old"), change.get("new")
    if old_raw is not None and not isinstance(old_raw, dict) or \
            new_raw is not None and not isinstance(new_raw, dict):
        raise _bad("push.changes[].old/new is neither an object nor null")
    side = new_raw if new_raw is not None else old_raw
    if side is None:
        raise _bad("push.changes[] has neither old nor new")
    kind = side.get("type")
    if not isinstance(kind, str) or kind not in _BITBUCKET_PREFIX:
        return None
    name = side.get("name")
    if not isinstance(name, str) or not name:
        raise _bad("push.changes[] names no branch or tag")
    ref = _ref(_BITBUCKET_PREFIX[kind] + name, "push.changes[].new.name")
    old = _sha(_dict(old_raw.get("target")).get("hash"), "push.changes[].old.target.hash") \
        if old_raw is not None else ZERO
    new = _sha(_dict(new_raw.get("target")).get("hash"), "push.changes[].new.target.hash") \
        if new_raw is not None else ZERO
    if old == new:
        return None
    commits = _commits(change.get("commits"), newest_first=True, entry=_bitbucket_commit)
    return _push(ref, old, new, pusher, commits)


def _bitbucket(event: str, payload: dict[str, Any]) -> tuple[tuple[dict[str, Any], ...], bool]:
    if event == "diagnostics:ping":
        return (), True
    if event != "repo:push":
        return (), False
    changes = _dict(payload.get("push")).get("changes")
    if not isinstance(changes, list):
        raise _bad("repo:push without a push.changes list")
    actor = _dict(payload.get("actor"))
    pusher = _text(actor.get("nickname")) or _text(actor.get("display_name")) \
        or _text(actor.get("username"))
    pushes = []
    for change in changes:
        push = _bitbucket_change(change, pusher)
        if push is not None:
            pushes.append(push)
    return tuple(pushes), False


_PARSERS = {"github": (_github, _github_like_repository),
            "gitea": (_gitea, _github_like_repository),
            "gitlab": (_gitlab, _gitlab_repository),
            "bitbucket": (_bitbucket, _bitbucket_repository)}


def parse(forge: str, headers: HeaderMap, body: bytes) -> Delivery:
    """What a delivery from ``forge`` says (see the module docstring).

    Raises :class:`WebhookError` (400) for a body that is not a JSON object,
    a delivery without its event header, or a push without what a push
    needs; any other event is a Delivery with no pushes."""
    if not isinstance(forge, str) or forge not in _PARSERS:
        raise _bad(f"unknown forge {forge!r:.40}")
    parser, repository = _PARSERS[forge]
    h = _lower_headers(headers)
    event = _first(h, *_EVENT_HEADERS[forge])
    if event is None:
        raise _bad(f"no {_EVENT_HEADERS[forge][0]} header")
    event = _text(event, MAX_NAME) or ""
    try:
        payload = json.loads(body)
    except (ValueError, TypeError, RecursionError) as exc:
        raise _bad(f"the body is not JSON: {exc}"[:200]) from None
    if not isinstance(payload, dict):
        raise _bad(f"the body is a JSON {type(payload).__name__}, not an object")
    pushes, ping = parser(event, payload)
    return Delivery(forge=forge, event=event, id=delivery_id(forge, headers),
                    repository=repository(payload), pushes=pushes, ping=ping)


# -- which project ---------------------------------------------------------------------


def _clean_path(path: str) -> str:
    path = path.strip().strip("/").lower()
    if path.endswith(".git"):
        path = path[:-4].rstrip("/")
    return path


def _url_key(value: str) -> tuple[str, str] | None:
    """(host, path) of a clone or web URL, lower-case, without scheme, user,
    port, trailing ``/`` or ``.git``: ``https://github.com/Team/App.git``,
    ``git@github.com:team/app.git`` and ``ssh://git@github.com/team/app`` are
    all ``("github.com", "team/app")``. None if ``value`` is not a URL (a
    full name, a local path)."""
    value = value.strip()
    if "://" in value:
        try:
            parts = urllib.parse.urlsplit(value)
            host = parts.hostname
        except ValueError:
            return None
        if not host or parts.scheme.lower() == "file":
            return None
        path = parts.path
    else:
        # scp-like [user@]host:path: a colon before any slash (git's rule)
        head, sep, path = value.partition(":")
        if not sep or "/" in head or not head:
            return None
        host = head.rpartition("@")[2].lower()
        if not host:
            return None
    path = _clean_path(path)
    return (host.lower(), path) if path else None


def _path_of(value: str) -> str:
    """The path of a URL or of a local path, cleaned like a URL's."""
    key = _url_key(value)
    if key is not None:
        return key[1]
    if "://" in value:
        try:
            return _clean_path(urllib.parse.urlsplit(value).path)
        except ValueError:
            return ""
    return _clean_path(value)


def _ends_with(path: str, name: str) -> bool:
    return bool(name) and (path == name or path.endswith("/" + name))


def matches(delivery: Delivery, *, git_url: str, repository: str | None) -> bool:
    """Whether ``delivery`` is about the repository of a project whose git URL
    is ``git_url`` and whose webhook config may name its ``repository`` (a
    full name ``team/app`` or a URL).

    With ``repository``, only it decides: a URL matches a URL of the payload
    (host and path, case-insensitive, whatever the scheme, user or port); a
    full name matches the payload's full name or the path (or ``host/path``)
    of one of its URLs. Without, ``git_url`` matches a URL of the payload the same way, or
    the payload's full name when the git URL's path ends with it (a project
    cloned from a mirror at ``git@mirror:team/app.git`` or
    ``/srv/git/team/app.git``)."""
    urls: set[tuple[str, str]] = set()
    names: set[str] = set()
    for value in delivery.repository:
        key = _url_key(value)
        if key is not None:
            urls.add(key)
        elif "://" not in value:
            name = _clean_path(value)
            if name:
                names.add(name)
    paths = {path for _, path in urls}
    if isinstance(repository, str) and repository.strip():
        key = _url_key(repository)
        if key is not None:
            return key in urls
        if "://" in repository:
            return False
        name = _clean_path(repository)
        return bool(name) and (name in names or name in paths
                               or name in {f"{host}/{path}" for host, path in urls})
    if not isinstance(git_url, str) or not git_url.strip():
        return False
    key = _url_key(git_url)
    if key is not None and key in urls:
        return True
    path = _path_of(git_url)
    return any(_ends_with(path, name) for name in names)
