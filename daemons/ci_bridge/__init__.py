"""CI bridge: commits -> CI builds, CI results -> ``ci.events``.

Not built yet (the foundation issue delivers the path from push to deploy
without CI). The topic it will publish on is :data:`deploybus.topics.CI_EVENTS`.
"""
