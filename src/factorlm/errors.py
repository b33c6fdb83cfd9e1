"""User-facing errors.

Anything a user can get wrong (a path, a task name, a ratio) raises :class:`FactorLMError` with a
one-line message; the CLI prints ``factorlm: error: <message>`` and exits with status 2, never a
traceback.
"""


class FactorLMError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`FactorLMError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise FactorLMError(message)
