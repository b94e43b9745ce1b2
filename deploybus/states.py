"""The states of a rollout and of each host in it.

Kept apart from :mod:`deploybus.store` so that readers of the bus (the CLI's
``--wait``) know them without importing SQLAlchemy.
"""

#: Rollout states; the last four are final.
ROLLOUT_STATES = ("queued", "running", "paused", "succeeded", "failed", "refused", "aborted")
FINAL_STATES = frozenset({"succeeded", "failed", "refused", "aborted"})

#: Host step states that are settled (the host will not be asked again).
SETTLED_STEPS = frozenset({"succeeded", "failed", "refused", "skipped", "offline"})
