"""User-facing errors. The CLI prints these as one clear line instead of a traceback."""


class PregateError(Exception):
    """A mistake the user can fix (bad input, missing file, wrong option); the message says how."""

    exit_status = 2  # what `pregate` exits with after printing the message
