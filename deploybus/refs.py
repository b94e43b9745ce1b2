"""Validation of names and git refs that arrive in messages.

Refs reach ``git`` as arguments, so anything that could be read as an option
(``--upload-pack=...``), walk out of a directory (``..``), or that git itself
would refuse (``git check-ref-format`` rules) is rejected before it gets
there.
"""

from __future__ import annotations

import re
import unicodedata

from deploybus.errors import RefError

#: Project, environment and host names.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: Longest ref accepted.
MAX_REF = 200

#: Longest ``user`` accepted (who asked for a deploy; scripts see it).
MAX_USER = 128

#: The only ref namespaces a rollout may deploy from, by full refname.
DEPLOYABLE = ("refs/tags/", "refs/heads/")

_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]*")
_SHA_RE = re.compile(r"[0-9a-f]{7,64}")
_FULL_SHA_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")

#: Unicode categories refused in ``user``: controls (C0, DEL, C1), surrogates
#: (they cannot reach a script's environment) and line/paragraph separators.
_BAD_USER_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def check_ref(ref: object) -> str:
    """Return ``ref`` if it is a safe branch, tag or commit name; else raise RefError."""
    if not isinstance(ref, str):
        raise RefError(f"ref must be a string, not {type(ref).__name__}")
    if not ref or len(ref) > MAX_REF:
        raise RefError(f"ref must be 1-{MAX_REF} characters")
    if not _REF_RE.fullmatch(ref):
        raise RefError(f"ref {ref!r:.80} has characters git refs may not start with or contain")
    bad = ("..", "//", "@{", "/.", ".lock/")
    if any(b in ref for b in bad) or ref.endswith((".", "/", ".lock")):
        raise RefError(f"ref {ref!r:.80} is not a valid git ref name")
    return ref


def is_commit_id(ref: str) -> bool:
    """``ref`` looks like a commit id, full or abbreviated (7 to 64 hex digits)."""
    return _SHA_RE.fullmatch(ref) is not None


def is_full_commit_id(ref: str) -> bool:
    """``ref`` is a full commit id: 40 (SHA-1) or 64 (SHA-256) lower-case hex digits."""
    return _FULL_SHA_RE.fullmatch(ref) is not None


def check_commit(value: object) -> str:
    """Return ``value`` if it is a full commit id; else raise RefError. A
    request names the commit it deploys in full: an abbreviation is
    resolved by git, and a branch or tag of that name would win."""
    if not isinstance(value, str) or not is_full_commit_id(value):
        raise RefError(f"commit must be a full commit id (40 or 64 lower-case hex digits), "
                       f"not {value!r:.80}")
    return value


def short_ref_name(refname: str) -> str:
    """The name a person would type for ``refname``: ``refs/tags/v1.0`` is
    ``v1.0``, ``refs/heads/main`` is ``main``; anything else is kept."""
    for prefix in DEPLOYABLE:
        if refname.startswith(prefix) and len(refname) > len(prefix):
            return refname[len(prefix):]
    return refname


def check_user(value: object) -> str:
    """Return ``value`` if it is a usable ``user`` (who asked); else raise RefError.

    The user reaches scripts as ``DEPLOYBUS_USER``, the journal, the audit
    log and results: 1-128 characters, none of them a control character
    (a NUL cannot be put in an environment at all: the script would not
    start), a surrogate or a line separator."""
    if not isinstance(value, str):
        raise RefError(f"user must be a string, not {type(value).__name__}")
    if not value or len(value) > MAX_USER:
        raise RefError(f"user must be 1-{MAX_USER} characters")
    if any(unicodedata.category(ch) in _BAD_USER_CATEGORIES for ch in value):
        raise RefError(f"user {value!r:.80} contains control characters")
    return value


def check_name(value: object, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise RefError(f"invalid {what} {value!r:.80}")
    return value
