"""One exception type for bad user input, so the CLI can print one clean line and exit non-zero."""


class UserError(ValueError):
    """Bad input from the user (unknown option, out-of-range value, missing data or model).

    Raised before anything is written where possible; the CLI turns it into a one-line
    message and exit code 2 instead of a traceback.
    """
