"""Logging for netserve's own events: one logger per part, and rate limiting.

Every part logs through ``logging.getLogger("netserve.<part>")``. The package
logger carries a ``NullHandler`` (set in ``__init__``), so a drop-in user's
stderr does not change unless they configure logging (issue 10, design 7).
Exceptions raised by handlers still go to ``handle_error()``, as in the stdlib.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Callable

__all__ = ["JsonFormatter", "RateLimitedLog", "get_logger"]


def get_logger(part: str) -> logging.Logger:
    """The logger of one part of netserve: ``netserve.<part>``."""
    return logging.getLogger(f"netserve.{part}")


class RateLimitedLog:
    """A condition that may repeat thousands of times a second, logged sparingly.

    At most one line per ``interval`` seconds: an occurrence is logged at once
    when the last line is that old, with a count of the occurrences since that
    line when there were any; the others are only counted. So a condition that
    persists writes one line per interval, and so does one that comes and goes
    (a descriptor table that fills up again after every accept: issue 10, "log
    one line, then a count every 10 s").
    """

    __slots__ = ("_clock", "_interval", "_last", "_level", "_logger", "_since_last")

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        *,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._level = level
        self._interval = interval
        self._clock = clock
        # When the last line was written (None: never), and the occurrences
        # counted since.
        self._last: float | None = None
        self._since_last = 0

    def event(self, message: str, *args: object) -> None:
        """Record one occurrence; log it if the last line is ``interval`` old."""
        now = self._clock()
        last = self._last
        if last is not None and now - last < self._interval:
            self._since_last += 1
            return
        self._last = now
        if self._since_last and last is not None:
            self._logger.log(
                self._level,
                message + " (%d more in the last %.0f s)",
                *args,
                self._since_last + 1,
                now - last,
            )
        else:
            self._logger.log(self._level, message, *args)
        self._since_last = 0


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (``--log-format json``).

    Keys: ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``,
    ``message``, ``pid``, ``exception`` when there is one, and the fields a
    netserve record carries in its ``netserve`` attribute (the access log's
    ``peer``, ``client``, ``duration``, ``bytes_in``, ``bytes_out``, ``outcome``).
    Library users opt in as with any formatter::

        handler = logging.StreamHandler()
        handler.setFormatter(netserve.JsonFormatter())
        logging.getLogger("netserve").addHandler(handler)
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, object] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        fields = getattr(record, "netserve", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)
