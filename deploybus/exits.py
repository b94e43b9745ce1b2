"""Process exit codes of every deploybus command and daemon (sysexits where one fits).

A module of its own so the CLI can name them without importing the runner.
"""

#: Clean exit.
EXIT_OK = 0
#: A deploy or command failed (the reason is printed).
EXIT_FAILURE = 1
#: (2 is click's: a usage error on the command line.)
#: A rollout went through, but some hosts failed (within max_failures).
EXIT_PARTIAL = 3
#: A rollout was aborted by a person.
EXIT_ABORTED = 4
#: Command line usage error (sysexits EX_USAGE).
EXIT_USAGE = 64
#: A required service (broker, database) is unavailable (EX_UNAVAILABLE).
EXIT_UNAVAILABLE = 69
#: Internal error (EX_SOFTWARE).
EXIT_SOFTWARE = 70
#: Timed out waiting; try again (EX_TEMPFAIL).
EXIT_TEMPFAIL = 75
#: Refused: not signed, not allowed, locked (EX_NOPERM).
EXIT_REFUSED = 77
#: Configuration error (EX_CONFIG); systemd units do not restart on it.
EXIT_CONFIG = 78
#: Second signal: cold stop.
EXIT_COLD = 130
