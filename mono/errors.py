"""The error types every stage raises for mistakes of the user, not bugs of mono.

Stdlib only, the lowest module of the package: config, store and every stage import it.
A `UserError` is bad input (a missing or corrupt artifact, a bad value, an unwritable
`--out`): the jobs report it as one line, `prog: error: message`, with exit status 2
(`mono.cli`). Anything else is a bug and keeps its traceback. The subclasses also derive
from the builtin error a caller would expect (`ValueError`, `FileNotFoundError`), so
`except ValueError` keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: the message names the offending value, file or URI."""


class MissingInput(UserError, FileNotFoundError):
    """An input artifact (corpus, manifest, LM, shard, SAE) is not where the user said."""


class BadOutput(UserError):
    """`--out` (or another destination) is a file, unwritable, or on storage we cannot reach."""
