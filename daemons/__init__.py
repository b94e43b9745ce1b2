"""The deploybus daemons; each knows the core and never another daemon."""
