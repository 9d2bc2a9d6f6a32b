"""The errors a user can fix, and the warning for a file that cannot be verified.

Every stage raises `SetupError` (a ValueError) for a problem with a run's inputs: a missing path, a size
that does not divide, a checkpoint or data set that does not fit the run, a corrupt file, a write that
failed. Its message names the input and says what to do; the command-line entry points
(`crawler.cli.run_main`) print it as one line, without a traceback, and exit with status 2.
"""
from __future__ import annotations


class SetupError(ValueError):
    """A problem with the run's inputs (paths, sizes, options, a checkpoint that does not fit) that the
    user can fix; the message says how."""


class MissingFileError(SetupError, FileNotFoundError):
    """A file or directory a run reads does not exist. Both a SetupError (the command lines print it as
    one line) and a FileNotFoundError (what callers of the readers have always caught)."""


class UnverifiedWarning(UserWarning):
    """A file loaded without a check it would get today: written before checkpoints carried a checksum
    or artifacts recorded their tokenizer. The command lines print it as one `warning:` line."""
