"""User-facing errors.

Every problem a user can fix (a missing file, a bad option, an impossible length) is raised as
:class:`DLMError` with a one-line message that names the problem and the fix. The CLI prints
``error: <message>`` and exits non-zero without a traceback.
"""


class DLMError(Exception):
    """A user error with a one-line message that names the problem and the fix."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`DLMError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise DLMError(message)
