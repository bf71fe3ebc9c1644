"""Errors a user can fix. The CLI prints their message as one line and exits 2."""


class UserError(Exception):
    """The message names the file, field or value, and what is allowed."""
