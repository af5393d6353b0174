"""Errors a user can cause: the CLI prints them as one line and exits 2, never a traceback."""


class UserError(Exception):
    """A problem with the user's input (files, CSV columns, labels, config keys).

    The message must say what is wrong and where, on one line.
    """


class BadImage(UserError):
    """An image file that cannot be read or decoded."""


def one_line(err: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with its traceback."""
    text = str(err).strip()
    if "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1]
        text = text.split(": ", 1)[1] if text.startswith(("cxrdist.", "UserError", "BadImage")) and ": " in text else text
    return text.splitlines()[0] if text else type(err).__name__
