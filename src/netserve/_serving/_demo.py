"""The demo the ``netserve`` command serves: the documentation's upper-case echo.

The documented example answers one read per connection; the demo keeps the
connection open and answers every line, which is what someone typing into
``nc`` expects.
"""

from __future__ import annotations

from netserve._core._handlers import StreamRequestHandler

__all__ = ["UpperCaseEchoHandler"]


class UpperCaseEchoHandler(StreamRequestHandler):
    """Answer each line with the same line upper-cased, until the client closes."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())
