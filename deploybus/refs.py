"""Validation of names and git refs that arrive in messages.

Refs reach ``git`` as arguments, so anything that could be read as an option
(``--upload-pack=...``), walk out of a directory (``..``), or that git itself
would refuse (``git check-ref-format`` rules) is rejected before it gets
there.
"""

from __future__ import annotations

import re

from deploybus.errors import RefError

#: Project, environment and host names.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: Longest ref accepted.
MAX_REF = 200

_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]*")
_SHA_RE = re.compile(r"[0-9a-f]{7,64}")


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
    return _SHA_RE.fullmatch(ref) is not None


def check_name(value: object, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise RefError(f"invalid {what} {value!r:.80}")
    return value
