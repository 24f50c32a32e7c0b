"""The one error type that callers of engines and backends understand."""


class BackendError(Exception):
    """Something a person can act on went wrong while running an instance.

    The message is shown to the instance's owner as its status message, so it must be
    readable and must never contain a secret.
    """
