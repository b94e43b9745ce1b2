"""The web front end and JSON API (Flask).

It reads the state store and talks to the daemons over the bus: a deploy
asked for here is a signed ``deploy.rollout`` like the CLI's. Login, roles,
deploy windows and the audit trail come with the front-end issue; until then
it binds to 127.0.0.1 by default.
"""
