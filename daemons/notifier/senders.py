"""Delivering one notification: an HTTP POST to a webhook, or an email over
SMTP. Each call tries once and raises :class:`DeliveryError` on any
failure; retrying is the service's business.

Nothing secret is in an error text: a webhook URL is shown as
``scheme://host:port`` (a Slack webhook's path is its token), the webhook
secret and the SMTP password are read from their files when needed and
never leave this module.

**Webhooks.** ``POST`` with ``Content-Type: application/json``. The body is
``{"text": ...}`` (format ``slack``) or the notification's facts (format
``json``, docs/notifications.md), UTF-8, keys sorted. Headers:
``X-Deploybus-Event``, ``X-Deploybus-Delivery`` (the same on every try of
one notification) and, when the webhook has a ``secret``,
``X-Deploybus-Signature: sha256=<hex HMAC-SHA256 of the body>``. Any 2xx is
delivered; anything else (another status, a redirect: redirects are not
followed, a timeout, a refused connection) is a failure.

**Email.** A plain-text message from ``smtp.from`` to one address, through
``smtp.host:port`` (port 465: TLS from the start; else STARTTLS when
``starttls: true``), logging in with ``user:password`` from the
credentials file if there is one. Its Message-ID is made from the delivery
id, so a copy sent again after a crash is the same message to a mail
client.
"""

from __future__ import annotations

import email.policy
import hashlib
import hmac
import http.client
import json
import smtplib
import ssl
import urllib.error
import urllib.parse
import urllib.request
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

from deploybus import __version__, redact
from deploybus.config import Smtp
from deploybus.daemons.notifier.events import email_text, slack_text
from deploybus.daemons.notifier.queue import Row
from deploybus.errors import DeliveryError

#: Seconds a webhook has to answer.
WEBHOOK_TIMEOUT = 10.0
#: Bytes of a webhook's answer that are read (and dropped).
ANSWER_CAP = 64 * 1024
#: Characters of an error text kept.
ERROR_CHARS = 300


def target_label(row: Row) -> str:
    """What logs call a target: an email address, or a webhook's
    ``scheme://host[:port]`` (never its path or user part: tokens live there)."""
    if row.kind == "email":
        return row.address
    return safe_url(row.address)


def safe_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…"


def _clean(text: str, *hide: str) -> str:
    for h in hide:
        if h:
            text = text.replace(h, "…")
    return redact.text(text)[:ERROR_CHARS]


def webhook_body(row: Row) -> bytes:
    """The exact bytes POSTed (and signed) for ``row``."""
    if row.format == "slack":
        payload: dict[str, Any] = {"text": slack_text(row.facts["text"])}
    else:
        payload = row.facts
    return json.dumps(payload, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def sign(body: bytes, secret: bytes) -> str:
    """The ``X-Deploybus-Signature`` header's value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def read_secret(path: Path) -> bytes:
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise DeliveryError(f"cannot read the webhook secret file {path}: "
                            f"{exc.strerror or exc}") from None
    if not secret:
        raise DeliveryError(f"the webhook secret file {path} is empty")
    return secret


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a success: the signed body is never
    re-sent elsewhere."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def post_webhook(row: Row, *, timeout: float = WEBHOOK_TIMEOUT) -> int:
    """POST ``row`` to its webhook; the HTTP status of a 2xx answer, else
    DeliveryError."""
    body = webhook_body(row)
    headers = {"Content-Type": "application/json; charset=utf-8",
               "User-Agent": f"deploybus-notifier/{__version__}",
               "X-Deploybus-Event": row.event, "X-Deploybus-Delivery": row.delivery}
    if row.secret is not None:
        headers["X-Deploybus-Signature"] = sign(body, read_secret(row.secret))
    request = urllib.request.Request(row.address, data=body, headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=timeout) as answer:
            answer.read(ANSWER_CAP)
            status = int(answer.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DeliveryError(f"HTTP {exc.code} {_clean(str(exc.reason), row.address)}") \
            from None
    except urllib.error.URLError as exc:
        raise DeliveryError(_clean(str(exc.reason), row.address)) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise DeliveryError(_clean(f"{type(exc).__name__}: {exc}", row.address)) from None
    if not 200 <= status < 300:
        raise DeliveryError(f"HTTP {status}")
    return status


def email_message(row: Row, sender: str) -> EmailMessage:
    subject, text = email_text(row.facts)
    # Not folded at 78 characters: Python folds a subject that starts with
    # "[" onto a line of its own, which parses back with a leading space.
    msg = EmailMessage(policy=email.policy.SMTP.clone(max_line_length=998))
    msg["Subject"] = subject
    msg["From"] = sender
    msg["To"] = row.address
    msg["Date"] = formatdate(usegmt=True)
    domain = sender.rpartition("@")[2] or "deploybus"
    msg["Message-ID"] = f"<{row.delivery}@{domain}>"
    msg["X-Deploybus-Event"] = row.event
    msg["X-Deploybus-Delivery"] = row.delivery
    msg.set_content(text)
    return msg


def _credentials(path: Path) -> tuple[str, str]:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise DeliveryError(f"cannot read the SMTP credentials file {path}: "
                            f"{exc.strerror or exc}") from None
    user, colon, password = text.partition(":")
    if not colon or not user:
        raise DeliveryError(f"the SMTP credentials file {path} does not hold user:password")
    return user, password


def send_email(row: Row, smtp: Smtp | None) -> None:
    """Send ``row`` (an email) through ``smtp``; DeliveryError on any failure."""
    if smtp is None:
        raise DeliveryError("no smtp: section in the config")
    msg = email_message(row, smtp.sender)
    password = ""
    try:
        client: smtplib.SMTP
        if smtp.port == 465:
            client = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout,
                                      context=ssl.create_default_context())
        else:
            client = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
        with client:
            if smtp.starttls and smtp.port != 465:
                client.starttls(context=ssl.create_default_context())
            if smtp.credentials is not None:
                user, password = _credentials(smtp.credentials)
                client.login(user, password)
            client.send_message(msg)
    except DeliveryError:
        raise
    except smtplib.SMTPResponseException as exc:
        text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) \
            else str(exc.smtp_error)
        raise DeliveryError(f"SMTP {exc.smtp_code} {_clean(text, password)}") from None
    except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
        raise DeliveryError(_clean(f"{type(exc).__name__}: {exc}", password)) from None


def deliver(row: Row, *, smtp: Smtp | None, timeout: float = WEBHOOK_TIMEOUT) -> None:
    """Try ``row`` once; DeliveryError if it did not go."""
    if row.kind == "webhook":
        post_webhook(row, timeout=timeout)
    elif row.kind == "email":
        send_email(row, smtp)
    else:
        raise DeliveryError(f"unknown kind of target {row.kind!r}")
