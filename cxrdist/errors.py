"""Errors a user can cause: the CLI prints them as one line and exits 2, never a traceback."""


class UserError(Exception):
    """A problem with the user's input (files, CSV columns, labels, config keys).

    The message must say what is wrong and where, on one line.
    """


class BadImage(UserError):
    """An image file that cannot be read or decoded."""
