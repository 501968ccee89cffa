"""Health and metrics for servers run without the supervisor (issue 14, section 1).

The command always runs a supervisor, which serves ``/livez``, ``/readyz`` and
``/metrics`` itself (``--metrics-bind``). A program that runs its servers in
its own process gets the same three paths from ``serve_admin()``: the same
endpoint (``_admin``) on a thread of its own, answering from the servers'
state. Readiness turns 503 the moment one of them starts ``drain()``.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

from netserve._serving._admin import AdminEndpoint, Response, text
from netserve._serving._figures import SupervisorStatistics, figures_of
from netserve._serving._metrics import metrics_route

__all__ = ["AdminThread", "serve_admin"]


def serve_admin(servers: Any, address: Any = ("127.0.0.1", 0)) -> AdminThread:
    """Serve ``/livez``, ``/readyz`` and ``/metrics`` for ``servers`` (one server,
    or several run by this process) on ``address`` (TCP, loopback by default;
    a ``str`` is a Unix socket path) from a thread; returns it, started.

    - ``/livez``: 200 while every server's ``serve_forever()`` runs, else 503;
    - ``/readyz``: 200 while every one serves and none drains; 503 ``draining``
      from the moment one of them starts ``drain()``, 503 ``not serving``
      before ``serve_forever()`` and after it returned;
    - ``/metrics``: the servers' ``statistics()`` summed, in Prometheus' format
      (the ``metrics`` extra), as the supervisor's (docs/observability.md).

    ``close()`` (or leaving a ``with`` block) stops the thread and closes the
    listener.
    """
    group = list(servers) if isinstance(servers, Sequence) else [servers]
    if isinstance(address, str):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(address)
            listener.listen()
        except BaseException:
            listener.close()
            raise
    else:
        listener = socket.create_server(address)
    return AdminThread(listener, group)


class AdminThread:
    """The endpoint ``serve_admin()`` started: its ``address``, and ``close()``."""

    def __init__(self, listener: socket.socket, servers: list[Any]) -> None:
        self.servers = servers
        self._listener = listener
        #: Where the endpoint listens (port 0 resolved).
        self.address: Any = listener.getsockname()
        self._endpoint = AdminEndpoint(
            listener,
            {
                "/livez": self._liveness,
                "/readyz": self._readiness,
                "/metrics": metrics_route(self.statistics),
            },
        )
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="netserve-admin", daemon=True)
        self._thread.start()

    def statistics(self) -> SupervisorStatistics:
        """The servers' figures, summed, with this process as the one worker."""
        serving = all(server.serving for server in self.servers)
        draining = any(server.draining for server in self.servers)
        return SupervisorStatistics.from_totals(
            figures_of(self.servers),
            workers=1 if serving else 0,
            ready=serving and not draining,
            draining=draining,
        )

    def close(self) -> None:
        """Stop answering and close the listener; waits for the thread."""
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        self._thread.join()
        os.close(self._stop_w)
        os.close(self._stop_r)
        self._stop_w = self._stop_r = -1
        self._listener.close()

    def __enter__(self) -> AdminThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _liveness(self) -> Response:
        if all(server.serving for server in self.servers):
            return text(200, "alive\n")
        return text(503, "not serving\n")

    def _readiness(self) -> Response:
        if any(server.draining for server in self.servers):
            return text(503, "draining\n")
        if not all(server.serving for server in self.servers):
            return text(503, "not serving\n")
        return text(200, "ready\n")

    def _run(self) -> None:
        self._endpoint.serve_until(self._stop_r)
