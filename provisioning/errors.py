"""The one error type that callers of engines and backends understand."""


class BackendError(Exception):
    """Something a person can act on went wrong while running an instance.

    The message is shown to the instance's owner as its status message, so it must be
    readable and must never contain a secret.
    """


class ImportRefused(BackendError):
    """A file the owner uploaded cannot be loaded as it is (cut short, not of the engine's format,
    or it asks for rights the tenant lacks); nothing was changed. The message says why, and where
    in the file."""


class NoRoom(BackendError):
    """No host the backend may place a new server on has room for it (503); the message says what
    was looked at."""
