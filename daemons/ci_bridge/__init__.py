"""CI bridge: pushes -> CI builds; CI results -> ``ci.events``.

:mod:`.service` (the daemon), :mod:`.records` (its builds in the state
database), :mod:`.backend` (the one interface CI servers sit behind),
:mod:`.jenkins` and :mod:`.buildbot` (the servers), :mod:`.notify` (builds
a CI reports itself). See docs/continuous-delivery.md.
"""
