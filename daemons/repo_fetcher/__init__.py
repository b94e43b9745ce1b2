"""Keeps this host's local git mirrors current (see :mod:`.service`)."""
