"""Heartbeats and presence (see :mod:`.service`)."""
