"""Credentials out of URLs, so that no message, log line, page or API answer
carries one.

Git, broker and database URLs may hold a secret in their user part
(``https://ci:ghp_xxx@github.com/app.git``, ``amqp://guest:s3cret@mq/``), and
driver errors quote them (``fatal: unable to access 'https://...'``).
:func:`url` hides the secret in one URL, :func:`text` in every URL inside
free text. What is kept: scheme, user name, host, port, path, query. The
secret is a password (``user:SECRET@``) in any scheme, or, for http and
https, a user part without a password: that is how GitHub and Azure DevOps
take a token (``https://TOKEN@github.com/``). In other schemes (ssh, amqp,
stomp, postgresql) a user without a password is a name and is kept.
``user@host:path`` (scp-like git) has no scheme and no password: untouched.
"""

from __future__ import annotations

import re
from typing import Any

#: What replaces a secret.
MASK = "***"

#: Schemes whose user part alone may be a token.
TOKEN_AS_USER = frozenset({"http", "https", "git+http", "git+https"})

# A scheme (starting where a run of scheme characters starts, so a long run
# is not rescanned from each of its characters), then the user part: up to
# the last "@" of the authority (an unencoded "@" in a password is common
# enough), which ends at "/", "?", "#", whitespace or a quote.
_CREDENTIALS = re.compile(r"(?<![A-Za-z0-9+.\-])([A-Za-z][A-Za-z0-9+.\-]*)://([^\s/?#'\"<>`]*)@")


def _hide(m: re.Match[str]) -> str:
    scheme, userinfo = m[1], m[2]
    user, colon, secret = userinfo.partition(":")
    if colon and secret:
        return f"{scheme}://{user}:{MASK}@"
    if not colon and user and scheme.lower() in TOKEN_AS_USER:
        return f"{scheme}://{MASK}@"
    return m[0]


def url(text_url: str) -> str:
    """``text_url`` with its credentials replaced by ``***``:
    ``amqp://guest:***@mq:5672/vhost?prefix=``, ``https://***@github.com/x.git``."""
    m = _CREDENTIALS.match(text_url)
    return _hide(m) + text_url[m.end():] if m else text_url


def text(s: str) -> str:
    """``s`` with the credentials of every URL in it replaced (see :func:`url`)."""
    if "@" not in s or "://" not in s:  # the common case, at the cost of two scans
        return s
    return _CREDENTIALS.sub(_hide, s)


def deep(value: Any) -> Any:
    """``value`` with :func:`text` applied to every string in it, inside
    dicts (their values), lists and tuples too; anything else as it is.
    For whole answers and log events."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, dict):
        return {k: deep(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [deep(v) for v in value]
    return value
