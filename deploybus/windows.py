"""Deploy windows and freezes: when an environment may be deployed to.

Per environment in the config::

    windows:
      timezone: Europe/Berlin        # default UTC
      allow: ["Mon-Fri 09:00-17:00"] # if given, deploys only inside one of these
      deny:  ["Fri 15:00-24:00", "2026-12-20..2027-01-02"]   # freezes win over allow

A rule is ``DAYS HH:MM-HH:MM`` (DAYS: ``*``, ``Mon``, ``Mon-Fri``, ``Sat,Sun``)
or a date range ``YYYY-MM-DD..YYYY-MM-DD`` (whole days, inclusive). A deploy
outside the windows is refused unless it carries an override reason, which
is written to the audit trail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime, time

from deploybus.errors import WindowError  # still importable from here

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_TIME_RULE = re.compile(r"^(?P<days>\S+)\s+(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2})$")
_DATE_RULE = re.compile(r"^(?P<start>\d{4}-\d{2}-\d{2})\.\.(?P<end>\d{4}-\d{2}-\d{2})$")


def _days(spec: str) -> set[int]:
    if spec == "*":
        return set(range(7))
    out: set[int] = set()
    for part in spec.lower().split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            if a not in DAYS or b not in DAYS:
                raise WindowError(f"unknown day in {spec!r} (use Mon..Sun)")
            i, j = DAYS.index(a), DAYS.index(b)
            out.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
        else:
            if part not in DAYS:
                raise WindowError(f"unknown day {part!r} (use Mon..Sun)")
            out.add(DAYS.index(part))
    return out


def _hm(text: str) -> time | None:
    h, m = (int(x) for x in text.split(":"))
    if h == 24 and m == 0:
        return None  # end of day
    if not (0 <= h < 24 and 0 <= m < 60):
        raise WindowError(f"bad time {text!r}")
    return time(h, m)


@dataclass(frozen=True)
class Rule:
    text: str
    days: frozenset[int] = frozenset()
    start: time | None = None
    end: time | None = None
    first: date | None = None
    last: date | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        t = text.strip()
        if m := _DATE_RULE.match(t):
            try:
                first, last = date.fromisoformat(m["start"]), date.fromisoformat(m["end"])
            except ValueError as exc:
                raise WindowError(f"bad date in {text!r}: {exc}") from None
            if last < first:
                raise WindowError(f"date range {text!r} ends before it starts")
            return cls(t, first=first, last=last)
        if m := _TIME_RULE.match(t):
            return cls(t, days=frozenset(_days(m["days"])), start=_hm(m["start"]) or time(0),
                       end=_hm(m["end"]))
        raise WindowError(f"window rule {text!r} is neither 'DAYS HH:MM-HH:MM' "
                          "nor 'YYYY-MM-DD..YYYY-MM-DD'")

    def matches(self, t: datetime) -> bool:
        if self.first is not None and self.last is not None:
            return self.first <= t.date() <= self.last
        if t.weekday() not in self.days:
            return False
        now = t.time()
        assert self.start is not None
        return self.start <= now and (self.end is None or now < self.end)


@dataclass(frozen=True)
class Windows:
    timezone: str = "UTC"
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = field(default_factory=tuple)

    @classmethod
    def parse(cls, spec: dict | None) -> Windows:
        spec = spec or {}
        tz = spec.get("timezone", "UTC")
        if not isinstance(tz, str):
            raise WindowError(f"timezone must be a name like Europe/Berlin, not {tz!r:.40}")
        if tz != "UTC":
            # zoneinfo (and its tz database) only for environments that name a zone
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
            try:
                ZoneInfo(tz)
            except (ZoneInfoNotFoundError, ValueError):
                raise WindowError(f"unknown timezone {tz!r}") from None
        return cls(tz, tuple(Rule.parse(r) for r in spec.get("allow") or ()),
                   tuple(Rule.parse(r) for r in spec.get("deny") or ()))

    def refusal(self, at: datetime) -> str | None:
        """Why a deploy at ``at`` is outside the windows, or None if it may go."""
        from zoneinfo import ZoneInfo
        local = at.astimezone(ZoneInfo(self.timezone))
        for rule in self.deny:
            if rule.matches(local):
                return f"inside freeze {rule.text!r} ({self.timezone})"
        if self.allow and not any(rule.matches(local) for rule in self.allow):
            return (f"outside the deploy windows {', '.join(r.text for r in self.allow)} "
                    f"({self.timezone}, now {local:%a %H:%M})")
        return None
