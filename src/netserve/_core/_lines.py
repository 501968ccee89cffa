"""``rfile`` with a bound on the length of a line (``max_line_size``, issue 11).

A ``readline()`` without a size reads until a newline, however far that is: a
client that never sends one grows the server's memory without bound (200 MB
of line took 400-600 MB in a probe). With a limit, a line read without a size
(or with a larger one) stops at the limit and raises ``LineTooLong``: the
line's first ``limit`` bytes are consumed, the rest is left unread. Line
iteration and ``readlines()`` go through ``readline()`` and stop alike.

The reader is the io module's ``BufferedReader`` over the socket's raw file,
with ``readline()`` bounded: what the handler sees is otherwise the stdlib's.
The hub's sockets make their own reader (``_greenfile``) and bound it alike.
"""

from __future__ import annotations

import io
import socket
from typing import Any

from netserve._core._errors import LineTooLong

__all__ = ["open_reader"]


class _LineBoundedReader(io.BufferedReader):
    """A ``BufferedReader`` whose unsized ``readline()`` stops at a limit."""

    # Set on each reader as it is made (no __init__ of our own: one call less
    # for every connection).
    max_line_size: int

    def readline(self, size: int | None = -1, /) -> bytes:
        # Runs for every line a handler reads: the C method is called directly.
        limit = self.max_line_size
        if size is not None and 0 <= size <= limit:
            return _readline(self, size)
        line = _readline(self, limit)
        if len(line) == limit and line[-1] != 10:  # b"\n"
            raise LineTooLong(f"a line went past max_line_size ({limit} bytes)")
        return line


_readline = io.BufferedReader.readline


def open_reader(conn: Any, bufsize: int, limit: int | None) -> Any:
    """``conn.makefile("rb", bufsize)``, with lines bounded by ``limit`` (if any)."""
    if limit is not None and limit < 1:
        raise ValueError(f"max_line_size must be a positive number of bytes, not {limit!r}")
    # Looked up on the class: a wrapper that forwards attributes (a stage's
    # PrefixedSocket) must not hand out its socket's reader, which would skip
    # the wrapper's read-ahead.
    cls = type(conn)
    if limit is not None:
        # A socket class with its own reader (GreenSocket) bounds its lines itself.
        bounded = getattr(cls, "_netserve_line_reader", None)
        if bounded is not None:
            return bounded(conn, bufsize, limit)
    # A socket with netserve's time-outs (_limits.TimedSocket) has a raw file
    # of its own, which reads through the socket's time-outs; so has a stage's
    # PrefixedSocket, which reads its read-ahead first (under any socket).
    raw_reader = getattr(cls, "_netserve_raw_reader", None)
    if raw_reader is not None:
        raw = raw_reader(conn)
    elif limit is None or not isinstance(conn, socket.socket):
        return conn.makefile("rb", bufsize)
    else:
        raw = conn.makefile("rb", 0)  # the raw socket file, counted by the socket
    if bufsize < 0:
        bufsize = io.DEFAULT_BUFFER_SIZE
    if limit is None:
        return raw if bufsize == 0 else io.BufferedReader(raw, bufsize)
    # An unbuffered rfile (rbufsize 0) reads a byte at a time; so does this,
    # never taking more from the socket than the line.
    reader = _LineBoundedReader(raw, max(bufsize, 1))
    reader.max_line_size = limit
    return reader
