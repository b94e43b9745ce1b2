"""Notifier: rollout and CI outcomes -> outgoing webhooks and email.

:mod:`.service` (the daemon), :mod:`.events` (what a status or a build
means, and the text people read), :mod:`.queue` (the durable table of
notifications to send), :mod:`.senders` (webhook and SMTP delivery). See
docs/notifications.md.
"""
