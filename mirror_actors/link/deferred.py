"""Deferred replies now live in `supervisors.replies`; re-exported for the link."""

from supervisors.replies import DeferredReplies, reply, reply_error

__all__ = ["DeferredReplies", "reply", "reply_error"]
