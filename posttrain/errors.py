"""Error types shared by the library and the CLI.

`UserError` is bad input that the CLI reports as one line with exit code 2; anything else is an
internal error (exit code 1).
"""


class UserError(Exception):
    """Bad input from the user: a missing file, an invalid config value, a shape mismatch."""


class TrainingDiverged(RuntimeError):
    """A loss or reward became NaN/inf; the run stopped and the checkpoints written so far are kept."""
