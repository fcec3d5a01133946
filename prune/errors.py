"""User-facing errors.

A `PruneError` is bad input that the user can fix: `run.py` prints its message as one line, exits with
status 2, and writes no results for that cell. Anything else is a bug and keeps its traceback.
"""


class PruneError(Exception):
    """Bad input; the message names what is wrong and how to fix it."""
