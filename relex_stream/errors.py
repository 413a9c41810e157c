"""The one error type for user mistakes."""


class RelexError(Exception):
    """A problem with the user's input or environment; the message says what to do.

    The CLI prints it as one line and exits with code 2. Anything else is a bug.
    """
