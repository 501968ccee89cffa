"""ForkingMixIn: a child process per request, with the stdlib's semantics.

Hooks overridden: ``process_request`` (forks), ``service_actions`` and
``handle_timeout`` (reap), ``server_close`` (reap, waiting if ``block_on_close``),
and the serving loop's (at ``max_children`` it stops accepting and waits for an
exit on the children's pidfds).
Attributes read: ``max_children``, ``block_on_close``; ``active_children`` holds
the pids of the children this server started.

A server reaps only its own children, pid by pid (``_children``). A child runs
the one request runner and exits with status 0 when the handler returned; the
parent counts the request when it reaps the child (``statistics()``). Closed
with ``block_on_close = False``, the server leaves a background reaper that
reaps the children still running as they exit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import selectors
import signal
import socket
from typing import TYPE_CHECKING, Any, NoReturn

from netserve._core._connections import FAILED, ServerStatistics
from netserve._core._log import get_logger
from netserve._core._servers import BaseServer
from netserve._models._children import Children, exit_child

__all__ = ["ForkingMixIn"]

limits_log = get_logger("limits")

# The selector's data for a child's pidfd (see _netserve_before_wait).
_CHILD_EXITED = "netserve-child-exited"
# Without pidfds, how often a loop at max_children looks for exits.
_NO_PIDFD_PAUSE = 0.05

if TYPE_CHECKING:
    _MixInBase = BaseServer
else:
    _MixInBase = object


class ForkingMixIn(_MixInBase):
    """Handle each request in a new child process."""

    _netserve_handles_inline = False
    _netserve_forks_requests = True

    # handle_request() waits at most this long, so that children are reaped even
    # on a server driven by handle_request() alone.
    timeout: float | None = 300
    active_children: set[int] | None = None
    max_children: int = 40
    # server_close() waits for every child to exit.
    block_on_close: bool = True
    # abort_connections(): how long a child may take to exit after SIGTERM.
    abort_grace: float = 1.0

    def _netserve_children(self) -> Children:
        # Created on first use, around the stdlib's ``active_children`` set.
        children: Children | None = vars(self).get("_netserve_children_now")
        if children is None:
            if self.active_children is None:
                self.active_children = set()
            children = self._netserve_children_now = Children(
                self.active_children, self._netserve_child_exited
            )
        return children

    def _netserve_hosts_held(self) -> dict[int, int]:
        # Child pid -> the identity of the request it holds, while a per-client
        # limit counts it against its host (created on first use: the stdlib's
        # __init__ signature stays as it is).
        held: dict[int, int] | None = vars(self).get("_netserve_child_requests")
        if held is None:
            held = {}
            self._netserve_child_requests = held
        return held

    def _netserve_child_exited(self, pid: int, exitcode: int) -> None:
        # The request a child held, for the per-client count (only kept while a
        # per-client limit is counting).
        key = self._netserve_hosts_held().pop(pid, None)
        self._netserve_table.finish_detached(exitcode, key)

    def collect_children(self, *, blocking: bool = False) -> None:
        """Reap finished children; first wait while ``max_children`` are running.

        With ``blocking``, wait for every child to exit.
        """
        if not self.active_children:
            return
        children = self._netserve_children()
        while len(children) >= self.max_children:
            children.wait_for_one()
            children.reap()
        if blocking:
            children.reap_all()
        else:
            children.reap()

    # -- the serving loop at max_children ----------------------------------------------
    # The stdlib's process_request() waits in collect_children() for a child
    # to exit when max_children run: its loop, and with it shutdown() and
    # close(), hang for as long as a child serves. serve_forever() here stops
    # watching the listener instead (the kernel's backlog holds what comes)
    # and waits on the children's pidfds, so that it still answers a stop at
    # once; likewise at max_connections. handle_request() keeps the stdlib's
    # wait in process_request().

    def _netserve_children_full(self) -> bool:
        return self.active_children is not None and len(self.active_children) >= self.max_children

    def _netserve_waits_for_children(self) -> bool:
        """Whether accepting waits for a child to exit: at ``max_children``, or
        at ``max_connections`` (a child's connection is counted out when it is
        reaped, so its exit must wake the loop, whatever ``poll_interval``)."""
        if not self.active_children:
            return False
        limit = self.max_connections
        return self._netserve_children_full() or (
            limit is not None and self._netserve_table.active >= limit
        )

    def _netserve_accept_room(self, batch: int) -> int:
        # Never more in one batch than may still fork without a wait.
        running = len(self.active_children) if self.active_children else 0
        return max(1, min(batch, self.max_children - running))

    def _netserve_accept_allowed(self) -> bool:
        if self._netserve_children_full():
            self._netserve_rate_limited("children", limits_log, logging.INFO).event(
                "accepting paused: %d children running (max_children)", self.max_children
            )
            return False
        return super()._netserve_accept_allowed()

    def _netserve_before_wait(
        self, selector: selectors.BaseSelector, poll_interval: float | None
    ) -> float | None:
        wait = super()._netserve_before_wait(selector, poll_interval)
        if not self._netserve_waits_for_children():
            self._netserve_unwatch_children(selector)
            return wait
        if self._netserve_children().watch(selector, _CHILD_EXITED):
            return wait
        # No pidfds: look for exits again shortly (a pause, never a busy loop).
        return _NO_PIDFD_PAUSE if wait is None else min(wait, _NO_PIDFD_PAUSE)

    def _netserve_ready(self, key: selectors.SelectorKey) -> None:
        if key.data is _CHILD_EXITED:
            self._netserve_children().exited(key.fd)
        else:
            super()._netserve_ready(key)

    def _netserve_loop_stopped(self, selector: selectors.BaseSelector) -> None:
        self._netserve_unwatch_children(selector)
        super()._netserve_loop_stopped(selector)

    def _netserve_unwatch_children(self, selector: selectors.BaseSelector) -> None:
        children: Children | None = vars(self).get("_netserve_children_now")
        if children is not None:
            children.unwatch(selector)

    def statistics(self) -> ServerStatistics:
        """The counters (``ServerStatistics``); ``at_limit`` is also true while
        ``max_children`` children run (accepting waits for one to exit)."""
        stats = super().statistics()
        if self._netserve_children_full() and not stats.at_limit:
            stats = dataclasses.replace(stats, at_limit=True)
        return stats

    def handle_timeout(self) -> None:
        """Reap finished children."""
        self.collect_children()

    def service_actions(self) -> None:
        """Reap finished children on every pass of ``serve_forever()``."""
        if self._netserve_children_full():
            # Without collect_children()'s wait: the loop waits for an exit
            # itself, and answers a stop meanwhile (see above).
            self._netserve_children().reap()
        else:
            self.collect_children()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Fork; the child handles the request and exits, the parent carries on."""
        # Reaping here too makes max_children a bound for handle_request() loops,
        # which never call service_actions().
        self.collect_children()
        children = self._netserve_children()
        pid = os.fork()
        if pid == 0:
            self._serve_in_child(request, client_address)
        # The child has its own copy of the connection.
        table = self._netserve_table
        if table.counts_hosts():
            self._netserve_hosts_held()[pid] = id(request)
        children.add(pid)
        table.detach(request)
        self.close_request(request)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until every child has exited, reaping each, and no connection is
        held in this process (one a ``process_request()`` of the user's own
        serves without forking is counted out only after it returns); False
        on time-out."""
        table = self._netserve_table
        clock = table.clock
        deadline = None if timeout is None else clock() + timeout
        if self.active_children:
            # Reaping counts each child's connection out of the table.
            children = self._netserve_children()
            while children.pids:
                remaining = None if deadline is None else deadline - clock()
                if remaining is not None and remaining <= 0:
                    return False
                children.wait_for_one(remaining)
                children.reap()
        return table.wait_idle(None if deadline is None else max(0.0, deadline - clock()))

    def abort_connections(self) -> None:
        """SIGTERM every child; SIGKILL those still running ``abort_grace`` later."""
        children = self._netserve_children()
        children.signal(signal.SIGTERM)
        if not self.wait_closed(self.abort_grace):
            children.signal(signal.SIGKILL)

    def _serve_in_child(self, request: Any, client_address: Any) -> NoReturn:
        # The child must never return into the parent's loop or run its cleanup
        # (atexit, finalizers): every path ends in os._exit. The status is the
        # runner's outcome: 0 only when the handler returned normally, 1 when it
        # raised (as in the stdlib), 2 and 3 for a failed or timed-out stage,
        # 4 when verify_client() refused it (the parent counts it as refused).
        status = FAILED
        try:
            # The child never accepts: without its copy of the listener, closing
            # the server closes the port even while children still serve.
            listener = getattr(self, "socket", None)
            if listener is not None and listener.type == socket.SOCK_STREAM:
                listener.close()
            status = self._netserve_run_request(request, client_address)
        finally:
            exit_child(status)

    def server_close(self) -> None:
        """Close the server, then reap children (waiting if ``block_on_close``).

        Without ``block_on_close``, the children still running are reaped in the
        background as they exit.
        """
        super().server_close()
        self.collect_children(blocking=self.block_on_close)
        if not self.block_on_close and self.active_children:
            self._netserve_children().reap_in_background()
