"""The hub's stall watchdog: name the handler that holds the hub's thread (issue 11).

One blocking call in a handler (``time.sleep``, a database driver, a DNS
look-up) stops every other connection on the hub, silently. As asyncio's debug
mode warns of a slow callback, the watchdog logs, at WARNING through
``netserve.hub`` and rate-limited, the handler that has held the hub's thread
past the threshold, with its stack as it is at that moment: the line that
blocks, not the line after it.

Theory of operation
-------------------
The loop counts (``Hub.beat``): one more as it enters its poll, one more as
it leaves it, so an odd count means "idle in poll" and an even count that
stays the same means "still busy in the same pass". That is all the loop
itself pays, besides one flag test per pass; nothing happens per switch.

The watchdog thread looks at the count at most every half threshold. While
the loop is busy it notes when it first saw the current pass; once that pass
has lasted the threshold it formats the stack of the hub's thread (the
greenlet running on it is the one that holds it) and logs it, once per pass.
While the loop is idle in its poll, the watchdog does not poll: it sleeps on
an event that the loop sets as it leaves the poll (only if the watchdog asked
for it), so an idle hub costs no wake-ups at all.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from types import FrameType
from typing import TYPE_CHECKING

from netserve._core._handlers import BaseRequestHandler
from netserve._core._log import RateLimitedLog

if TYPE_CHECKING:
    from netserve._models._hub import Hub

__all__ = ["StallWatchdog", "describe_stack"]

log = logging.getLogger("netserve.hub")

# The shortest pause between two looks at a busy loop: a tiny threshold must
# not turn the watchdog into a busy loop of its own.
_MIN_PERIOD = 0.005


def describe_stack(frame: FrameType | None) -> tuple[str, str]:
    """Who holds the thread (a request handler, if one is on the stack) and the stack."""
    if frame is None:
        return "the hub's thread", "(no frame)\n"
    who = "the hub's thread (no handler on its stack)"
    current: FrameType | None = frame
    while current is not None:
        code = current.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            handler = current.f_locals.get("self")
            if isinstance(handler, BaseRequestHandler):
                who = (
                    f"{type(handler).__qualname__}.{code.co_name}() "
                    f"for {getattr(handler, 'client_address', '?')!r}"
                )
                break
        current = current.f_back
    return who, "".join(traceback.format_stack(frame))


class StallWatchdog:
    """Watches one run of a hub's thread; ``stop()`` it as that thread ends."""

    def __init__(self, hub: Hub, ident: int, report: RateLimitedLog) -> None:
        self._hub = hub
        self._ident = ident
        self._report = report
        self._wake = threading.Event()
        self._stopped = False
        self.thread = threading.Thread(target=self._run, name=f"{hub.name}-watchdog", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """From any thread: the watchdog ends soon (join ``thread`` to wait)."""
        self._stopped = True
        self._wake.set()

    def wake(self) -> None:
        """From the loop, as it leaves a poll the watchdog sleeps through."""
        self._wake.set()

    def _run(self) -> None:
        hub = self._hub
        wake = self._wake
        seen = -1  # the busy pass seen last, and since when
        seen_at = 0.0
        reported = -1
        while not self._stopped:
            threshold = hub.stall_warning
            beat = hub.beat
            if threshold is None:
                # Turned off while the thread runs: look again now and then.
                wake.clear()
                wake.wait(1.0)
                continue
            if beat & 1:
                # Idle in its poll: sleep until the loop leaves the poll. Asked
                # for before looking again, so that either the loop sees the
                # request or we see its new count.
                wake.clear()
                hub.watchdog_asleep = True
                if hub.beat == beat and not self._stopped:
                    wake.wait()
                hub.watchdog_asleep = False
                continue
            now = time.monotonic()
            if beat != seen:
                seen, seen_at = beat, now
            elif now - seen_at >= threshold and reported != beat:
                reported = beat
                self._warn(now - seen_at, threshold)
            wake.clear()
            wake.wait(max(_MIN_PERIOD, threshold / 2))

    def _warn(self, held: float, threshold: float) -> None:
        frame = sys._current_frames().get(self._ident)
        who, stack = describe_stack(frame)
        self._report.event(
            "%s has held the hub's thread for %.3f s (hub_stall_warning %.3g s); every "
            "other connection waits meanwhile: use netserve.to_thread() for blocking "
            "calls. Its stack now:\n%s",
            who,
            held,
            threshold,
            stack,
        )
