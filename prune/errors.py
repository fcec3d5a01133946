"""User-facing errors.

A `PruneError` is bad input that the user can fix: `run.py` prints its message as one line, exits with
status 2, and writes no results for that cell. Anything else is a bug and keeps its traceback.
"""


class PruneError(Exception):
    """Bad input; the message names what is wrong and how to fix it."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message (its type's name when it has none), cut to `limit` characters:
    libraries' errors run over several lines, and ours are printed as one."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]
