"""The one project error type.

`cli.py` prints an `RlhfError` as one red line (plus an optional hint) and exits with code 2;
`RLHF_DEBUG=1` shows the traceback instead. Raise it for anything the user can fix: bad input,
a missing file, an option that makes no sense.
"""

from __future__ import annotations


class RlhfError(Exception):
    """A user-facing error: `message` says what is wrong, `hint` the next step."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class TrainingStopped(RlhfError):
    """Training stopped itself (a NaN/inf loss or reward): exit 3, the last good state is kept."""

    exit_code = 3
