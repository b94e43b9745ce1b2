"""The per-host deploy agent: releases, scripts, atomic switch.

:mod:`deploybus.layout` owns the on-disk layout, :mod:`.steps` runs one deploy,
:mod:`.agent` is the service that takes signed ``deploy.request`` messages.
"""
