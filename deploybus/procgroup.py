"""Stopping a child that leads a process group of its own (started with
``process_group=0`` or ``start_new_session=True``): a deploy script, the
fetcher's package command."""

from __future__ import annotations

import os
import signal
import subprocess


def kill_group(proc: subprocess.Popen[bytes], *, grace: float,
               reap: float | None = None) -> bool:
    """SIGTERM to ``proc``'s process group; once ``proc`` has exited or
    ``grace`` seconds have passed, SIGKILL to the group, so that nothing
    it started stays behind. Then wait for ``proc`` up to ``reap`` seconds
    (None: until it is gone). Returns whether it was reaped."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, reap)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass  # the group is empty; the leader may still need reaping
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            if sig == signal.SIGKILL:
                return False
    return True
