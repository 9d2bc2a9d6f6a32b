"""The error a user can fix. Every stage raises `SetupError` (a ValueError) for a problem with a run's
inputs: a missing path, a size that does not divide, a checkpoint or data set that does not fit the run.
Its message names the input and says what to do; the command-line entry points print it as one line,
without a traceback."""
from __future__ import annotations


class SetupError(ValueError):
    """A problem with the run's inputs (paths, sizes, options, a checkpoint that does not fit) that the
    user can fix; the message says how."""
