"""What the post-receive hook runs on every push: queue, start a drainer, return.

``python -m deploybus.daemons.git_listener.post_receive --outbox FILE
--project NAME -- DRAIN-COMMAND...`` reads git's ``old new ref`` lines,
writes one ``git.push`` per ref to the durable outbox (:mod:`deploybus.outbox`)
and starts DRAIN-COMMAND (``deploybus outbox drain``) detached, to publish
them; then it tells the pusher and exits. It never fails the push and takes
a few tens of milliseconds: it imports the standard library and the outbox,
nothing else (no YAML, no bus driver, no cryptography); the drainer pays for
those after git has returned.

If the outbox cannot be written (its directory not writable by the user git
runs the hook as, a full disk), the hook falls back to publishing directly
(``deploybus notify push``, up to a few seconds) and says which happened.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence

ZERO = "0" * 40

#: Seconds an event may wait in the outbox before the hook warns the pusher
#: that the bus has not taken it.
STALE = 60.0


def pushes(lines: Iterable[str], *, project: str, pusher: str | None = None) -> list[dict]:
    """``git.push`` bodies for the ``old new ref`` lines git gives the hook."""
    who = pusher or os.environ.get("GL_USERNAME") or os.environ.get("GITEA_PUSHER_NAME") \
        or getpass.getuser()
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            continue
        old, new, ref = parts
        out.append({"project": project, "ref": ref, "old": old, "new": new, "pusher": who,
                    "created": old == ZERO, "deleted": new == ZERO})
    return out


def _say(text: str) -> None:
    sys.stderr.write(f"deploybus: {text}\n")


def _start_drainer(command: Sequence[str]) -> None:
    """Start the drainer in its own session with no tie to git's pipes: git
    waits for every holder of the hook's stdout and stderr, so the drainer
    must hold none of them."""
    subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def _fallback(lines: list[str], fallback: Sequence[str]) -> None:
    """Publish directly (the outbox could not be written)."""
    try:
        subprocess.run(list(fallback), input="".join(lines), text=True, timeout=15,
                       check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        _say(f"warning: push event NOT queued and NOT published: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cut = args.index("--")
        opts, drainer = args[:cut], args[cut + 1:]
        outbox_path = opts[opts.index("--outbox") + 1]
        project = opts[opts.index("--project") + 1]
    except (ValueError, IndexError):
        _say("warning: the post-receive hook is damaged; reinstall it with "
             "`deploybus hook install`")
        return 0
    lines = sys.stdin.readlines()
    bodies = pushes(lines, project=project)
    if not bodies:
        return 0
    # the drainer's command line, as the fallback: `... outbox drain ...` ->
    # `... notify push --project P` (same interpreter, config and key)
    fallback = drainer[:drainer.index("outbox")] + ["notify", "push", "--project", project] \
        if "outbox" in drainer else []
    try:
        from deploybus.outbox import Event, Outbox
        from deploybus.topics import GIT_COMMITS
        with Outbox(outbox_path) as box:
            box.add([Event(GIT_COMMITS, "git.push", b) for b in bodies], source="hook")
            status = box.status()
    except Exception as exc:  # noqa: BLE001 - never fail the push
        _say(f"warning: cannot queue the push in {outbox_path} ({exc}); publishing directly")
        if fallback:
            _fallback(lines, fallback)
        return 0
    try:
        _start_drainer(drainer)
    except OSError as exc:
        _say(f"warning: cannot start the drainer ({exc}); the push stays queued")
    n = len(bodies)
    _say(f"{n} push event{'s' if n != 1 else ''} for {project} queued for the bus")
    oldest = status.get("oldest")
    if oldest is not None and time.time() - oldest > STALE:
        _say(f"warning: {status['pending']} event(s) have waited for the bus since "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(oldest))}"
             + (f" (last error: {status['error'][:200]})" if status.get("error") else "")
             + "; check the broker, and `deploybus outbox status`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
