"""Prometheus metrics of a supervisor and its workers (issue 14, section 1).

An optional extra (``netserve[metrics]``: the ``prometheus-client`` package);
without it ``/metrics`` answers 501 with a one-line hint.

Not the client library's multi-process mode: that mode has every process write
each metric into files of its own on every change, so a counter would cost
each request a locked write on the hot path; and its counters die with a
worker's files unless they are merged by hand. The workers' figures already
reach the supervisor through shared memory (``_figures``), summed, with the
counters kept past their worker: a collector reads them at scrape time, and
the library only renders the exposition format.

Every name has the ``netserve_`` prefix. Counters end in ``_total`` as the
exposition format wants.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from netserve._core._connections import TIMEOUT_KINDS
from netserve._serving._admin import Response, text
from netserve._serving._figures import SupervisorStatistics

__all__ = ["metrics_route"]

_HINT = "metrics need the prometheus-client package: pip install 'netserve[metrics]'\n"

# (name, help, the SupervisorStatistics field)
_COUNTERS = (
    ("connections_accepted", "Connections (and datagrams) accepted.", "accepted"),
    ("connections_refused", "Connections closed without a handler.", "refused"),
    ("connections_limited", "Connections refused by max_connections_per_client.", "limited"),
    ("requests_handled", "Requests whose handler finished.", "handled"),
    ("request_errors", "Requests whose handler raised.", "errors"),
    ("client_disconnects", "Requests ended by the client going away.", "disconnects"),
    ("lines_too_long", "Requests ended by a line past max_line_size.", "lines_too_long"),
    ("stage_failures", "Connections a stage (PROXY header, TLS) rejected.", "stage_failures"),
    ("accept_errors", "accept() failures (descriptors, memory).", "accept_errors"),
    ("worker_restarts", "Workers started to replace one that exited unasked.", "worker_restarts"),
    ("reloads", "Reloads (HUP) completed.", "reloads"),
)
_GAUGES = (
    ("connections_active", "Connections open now.", "active"),
    ("connections_parked", "Connections open with no handler yet.", "parked"),
    ("workers", "Worker processes serving.", "workers"),
    ("draining", "1 while the instance drains.", "draining"),
    ("ready", "1 while the instance takes new work.", "ready"),
    ("pool_threads", "The pool's worker threads.", "threads"),
    ("pool_busy_threads", "The pool's worker threads running a handler.", "busy_threads"),
    ("pool_queued", "Requests waiting for a pool thread.", "queued"),
    ("hub_greenlets", "The hub's handler greenlets.", "greenlets"),
)


def metrics_route(statistics: Callable[[], SupervisorStatistics]) -> Callable[[], Response]:
    """The ``/metrics`` route: the exposition text of ``statistics()``, or 501."""
    # Imported here, not with netserve: an optional extra, and only a
    # supervisor with an admin endpoint needs it.
    try:
        from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415
        from prometheus_client.exposition import CONTENT_TYPE_LATEST  # noqa: PLC0415
    except ImportError:
        return lambda: text(501, _HINT)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(statistics))

    def route() -> Response:
        return (200, CONTENT_TYPE_LATEST, generate_latest(registry))

    return route


class _Collector:
    """Reads the supervisor's figures at each scrape."""

    def __init__(self, statistics: Callable[[], SupervisorStatistics]) -> None:
        self.statistics = statistics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (  # noqa: PLC0415 (see metrics_route)
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        stats = self.statistics()
        for name, doc, attribute in _COUNTERS:
            yield CounterMetricFamily(f"netserve_{name}", doc, value=getattr(stats, attribute))
        timeouts = CounterMetricFamily(
            "netserve_timeouts",
            "Connections ended by netserve's time-outs, by setting.",
            labels=["kind"],
        )
        # Every kind, seen or not: a series that appears late breaks rate().
        counts = dict.fromkeys(TIMEOUT_KINDS[1:], 0) | dict(stats.timeouts_by_kind)
        for kind, count in counts.items():
            timeouts.add_metric([kind or "unknown"], count)
        yield timeouts
        for name, doc, attribute in _GAUGES:
            yield GaugeMetricFamily(f"netserve_{name}", doc, value=int(getattr(stats, attribute)))
