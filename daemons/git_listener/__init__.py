"""Commit events into deploybus: the post-receive hook (:mod:`.hook`) and
the Subversion post-commit hook (:mod:`.svn`).

The webhook HTTP receiver (GitHub, GitLab, Gitea) joins it in a later issue.
"""
