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


def first_line(err: BaseException, limit: int = 0, default: str = None) -> str:
    """The first line of ``err``'s message (at most ``limit`` characters when ``limit``), for a
    one-line error that quotes the cause; ``default`` (else the exception's type name) when empty."""
    text = str(err).strip()
    if not text:
        return type(err).__name__ if default is None else default
    line = text.splitlines()[0]
    return line[:limit] if limit else line
