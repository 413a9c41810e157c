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


class NonfiniteRows(RelexError):
    """A tensor's rows hold NaN or Inf (or deltas whose squares overflow float64). `fact` says
    which and where; `step` is the one checkpoint to blame, None when it is the base or every
    step. The message adds `run`'s remedies; `watch` words its own and leaves `step` out."""

    def __init__(self, fact: str, remedy: str, step: int | None):
        super().__init__(f"{fact}; {remedy}")
        self.fact, self.step = fact, step


class NonfiniteOutput(RelexError):
    """A prediction to be written holds NaN or Inf. `fact` says where; `cause` is 'target' (the
    prediction overflows the output dtype), 'dtype' (a base value the output dtype cannot
    hold) or 'base' (the base holds NaN or Inf). The message adds `run`'s remedies; `watch`
    words its own."""

    def __init__(self, fact: str, remedy: str, cause: str):
        super().__init__(f"{fact}; {remedy}")
        self.fact, self.cause = fact, cause


class NotAStore(RelexError):
    """A path given as a store is not one (not a directory, unreadable, or without a relex_stream
    store's metadata). `fact` says which; the message adds `run`'s remedy (another --cache);
    report and backtest, which have no --cache and write nothing there, word their own."""

    def __init__(self, fact: str, remedy: str = "pass another --cache, or remove it"):
        super().__init__(f"{fact}; {remedy}")
        self.fact = fact
