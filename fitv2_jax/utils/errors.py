"""The error a user can fix: bad flags, files, configs, data or checkpoints.

Library code raises `UserError` with a message that names the file or flag and what to do; the
commands (`fitv2_jax.cli.app.run`) print it as one line on stderr and exit with status 2. Any
other exception is a bug and keeps its traceback. `UserError` is a `ValueError`, so callers that
catch bad values keep working.
"""


class UserError(ValueError):
    """A problem with the user's input; the message says which input and how to fix it."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""
