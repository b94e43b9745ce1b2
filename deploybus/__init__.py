"""deploybus: one-click, audited git-to-server deploys over a message bus.

Layering (see docs/architecture.md): :mod:`deploybus.bus` knows bytes and
topics only; the core modules (envelope, signing, config, runner, store) know
no daemon; each daemon under :mod:`deploybus.daemons` knows the core and never
another daemon; the front end talks to daemons over the bus and reads the
store.
"""

__version__ = "0.1.0"
