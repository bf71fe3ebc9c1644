"""Errors in the data a user gave us (missing source, empty folder, dataset already there)."""


class DataError(ValueError):
    """The message names the path or value, and what is allowed."""
