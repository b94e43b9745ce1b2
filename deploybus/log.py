"""structlog set-up: JSON lines when not on a terminal, readable lines when on one.

No line carries a credential: :func:`redact_event` runs over every structlog
event and :class:`RedactFilter` over every standard library record (the
drivers' logs), after tracebacks are formatted, so a URL quoted by an
exception is redacted too (:mod:`deploybus.redact`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from deploybus import redact

#: Values logged as they are: nothing in them can hold a URL.
_PLAIN = (int, float, bool, type(None))


def _scrub(value: Any) -> Any:
    if isinstance(value, str | dict | list | tuple):
        return redact.deep(value)
    if isinstance(value, _PLAIN):
        return value
    # An exception or a path is rendered with str() or repr(): if what it
    # shows holds a credential, it is logged as that text, redacted.
    shown = str(value)
    clean = redact.text(shown)
    return value if clean == shown else clean


def redact_event(_logger: Any, _method: str,
                 event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: every value of the event with URL credentials redacted."""
    for key, value in event_dict.items():
        event_dict[key] = _scrub(value)
    return event_dict


class RedactFilter(logging.Filter):
    """Redacts URL credentials in standard library records (kombu, stomp.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact.text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact.text(record.exc_text)
        return True


def setup(*, level: str | None = None, json: bool | None = None) -> None:
    """Configure structlog and the standard library logging that drivers use."""
    level = (level or os.environ.get("DEPLOYBUS_LOG_LEVEL", "info")).upper()
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Drivers (kombu, stomp.py) log through the standard library.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())
