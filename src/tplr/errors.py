"""Typed errors shared by every layer.

Every error carries a message that names what was wrong and a ``hint`` that says what
to do about it. The CLI prints ``error: <message>`` and ``hint: <hint>`` and exits
non-zero without a traceback.
"""

from __future__ import annotations


class TplrError(Exception):
    """Base of every error tplr raises on purpose."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} ({self.hint})" if self.hint else text

    @property
    def message(self) -> str:
        return super().__str__()


class ConfigError(TplrError):
    """A configuration value is missing or invalid."""
