"""How commands mark generated text: one convention everywhere (``dlm demo``, ``dlm sample``)."""

from __future__ import annotations

import os


class SpanMarker:
    """Marks generated text: colour on a terminal, and markers that never occur in the corpus
    (Shakespeare's own square brackets, as in ``[Exit.]``, must not look generated)."""

    OPEN, CLOSE = "\u27e6", "\u27e7"  # the mathematical white square brackets

    def __init__(self, colour: bool):
        self.colour = colour

    @property
    def legend(self) -> str:
        return f"between {self.OPEN} {self.CLOSE}" + (", in green" if self.colour else "")

    def __call__(self, text: str) -> str:
        if self.colour:
            return f"{self.OPEN}\033[32m{text}\033[0m{self.CLOSE}"
        return f"{self.OPEN}{text}{self.CLOSE}"


def span_marker(stream) -> SpanMarker:
    """Colour only on a terminal that is not asked to go without it (NO_COLOR)."""
    isatty = getattr(stream, "isatty", lambda: False)()
    return SpanMarker(colour=bool(isatty) and "NO_COLOR" not in os.environ)
