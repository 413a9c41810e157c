"""The one error type for user mistakes (and the one case a caller may wait out)."""


class RelexError(Exception):
    """A problem with the user's input or environment; the message says what to do.

    The CLI prints it as one line and exits with code 2. Anything else is a bug.
    """


class StoreBusy(RelexError):
    """The store is locked by another process, or was changed by one since this run looked at
    it: `watch` tries again at the next poll instead."""


class SourceChanged(RelexError):
    """A checkpoint file changed while it was read: `watch` takes the step again once settled."""
