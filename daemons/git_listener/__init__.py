"""Commit events into deploybus: the post-receive hook (:mod:`.hook`).

The webhook HTTP receiver (GitHub, GitLab, Gitea) joins it in a later issue.
"""
