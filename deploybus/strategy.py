"""Rollout strategies: which hosts go in which phase, and how many at once.

A strategy is a small mapping, from the environment's ``strategy:`` in the
config, overridden per rollout (``deploybus deploy --canary 1 --batch 25%``)::

    canary: 1          # first N hosts, or a host name; 0 = no canary phase
    batch: 25%         # hosts per batch after the canary: a count or a percentage
    window: 0          # at most K hosts in flight inside a phase (0 = the whole phase)
    pause: 0           # seconds between phases, or "promote": wait after the canary
    max_failures: 0    # halt once more hosts than this have failed
    auto_rollback: false   # on halt, switch hosts this rollout moved back
    stuck: 900         # seconds a host may go without progress before it counts as failed

The named shapes people ask for are settings of these: all at once is
``batch: 100%``; canary then batches is ``canary: 1, batch: 25%``; a sliding
window is ``batch: 100%, window: K``; one after another is ``window: 1``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeGuard

from deploybus.errors import StrategyError  # still importable from here

#: What an environment without a ``strategy:`` gets: one host after another.
DEFAULTS: dict[str, Any] = {"canary": 0, "batch": "100%", "window": 1, "pause": 0,
                            "max_failures": 0, "auto_rollback": False, "stuck": 900}


@dataclass(frozen=True)
class Strategy:
    canary: int | str = 0
    batch: int | str = "100%"
    window: int = 1
    pause: float | str = 0
    max_failures: int = 0
    auto_rollback: bool = False
    stuck: float = 900

    @classmethod
    def parse(cls, *layers: dict[str, Any] | None) -> Strategy:
        """Merge ``layers`` over the defaults (later wins) and check every value."""
        merged: dict[str, Any] = dict(DEFAULTS)
        names = {f.name for f in fields(cls)}
        for layer in layers:
            for k, v in (layer or {}).items():
                if k not in names:
                    raise StrategyError(f"unknown strategy setting {k!r} "
                                        f"(known: {', '.join(sorted(names))})")
                if v is not None:
                    merged[k] = v
        s = cls(**merged)
        s.check()
        return s

    def check(self) -> None:
        if isinstance(self.canary, bool) or not isinstance(self.canary, int | str) or \
                isinstance(self.canary, int) and self.canary < 0:
            raise StrategyError("canary must be a number of hosts >= 0 or a host name")
        batch_size(self.batch, 10)  # validates
        for name in ("window", "max_failures"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise StrategyError(f"{name} must be a whole number >= 0")
        if self.pause != "promote" and not (_seconds(self.pause) and self.pause >= 0):
            raise StrategyError("pause must be seconds >= 0 or 'promote'")
        if not (_seconds(self.stuck) and self.stuck > 0):
            raise StrategyError("stuck must be seconds > 0")
        if not isinstance(self.auto_rollback, bool):
            raise StrategyError("auto_rollback must be true or false")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def phases(self, hosts: list[str]) -> list[list[str]]:
        """Split ``hosts`` (in order) into the canary phase and the batches."""
        rest = list(hosts)
        phases: list[list[str]] = []
        if isinstance(self.canary, str) and not self.canary.isdecimal():
            if self.canary not in rest:
                raise StrategyError(f"canary host {self.canary!r} is not in this rollout")
            rest.remove(self.canary)
            phases.append([self.canary])
        else:
            n = int(self.canary)
            if n:
                phases.append(rest[:n])
                rest = rest[n:]
        size = batch_size(self.batch, len(hosts))
        for i in range(0, len(rest), size):
            phases.append(rest[i:i + size])
        return phases

    def in_flight(self, phase: list[str]) -> int:
        return min(self.window, len(phase)) if self.window else len(phase)


def _seconds(value: object) -> TypeGuard[float]:
    """Whether ``value`` is a finite number of seconds (JSON bodies may say
    ``NaN`` or ``Infinity``, which compare false with everything)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and \
        math.isfinite(value)


def batch_size(batch: int | str, total: int) -> int:
    """Hosts per batch for ``batch`` (a count or ``"N%"``) of ``total`` hosts; at least 1."""
    if isinstance(batch, bool):
        raise StrategyError("batch must be a count or a percentage")
    if isinstance(batch, int):
        if batch < 1:
            raise StrategyError("batch must be at least 1 host")
        return batch
    if isinstance(batch, str) and batch.endswith("%"):
        try:
            pct = float(batch[:-1])
        except ValueError:
            raise StrategyError(f"batch {batch!r} is not a percentage") from None
        if not 0 < pct <= 100:
            raise StrategyError("batch percentage must be in (0, 100]")
        return max(1, math.ceil(total * pct / 100))
    if isinstance(batch, str) and batch.isdecimal():
        return batch_size(int(batch), total)
    raise StrategyError(f"batch {batch!r} must be a count or a percentage like '25%'")
