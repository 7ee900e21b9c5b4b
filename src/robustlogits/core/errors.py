"""One exception type for bad user input, so the CLI can print one clean line and exit non-zero."""


class UserError(ValueError):
    """Bad input from the user (unknown option, out-of-range value, missing data or model).

    Raised before anything is written where possible; the CLI turns it into a one-line
    message and exit code 2 instead of a traceback.
    """


class StoreUnreachable(RuntimeError):
    """The tracking store stopped answering in the middle of a run (a stopped server, a lost network).

    Not the user's input, and the run cannot be told it failed: the CLI prints the one line this
    carries (what happened, which run stays RUNNING, how to end or continue it) and exits 1.
    """
