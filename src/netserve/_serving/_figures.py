"""Workers' figures, shared with their supervisor (issue 14, section 1).

A supervisor's ``statistics()`` sums what its workers count, and its counters
never go backwards when a worker is replaced. Theory of operation:

- Before it forks any worker the supervisor maps one block of anonymous shared
  memory (``Board``), cut into fixed slots; every process forked after that
  sees the same pages. Each worker is given a free slot as it is forked.
- The worker writes the sum of its servers' ``statistics()`` into its slot
  from its control thread, every ``PUBLISH_INTERVAL`` and once more as it
  exits (``SlotWriter``). The serving loops and handlers never touch the
  block: counting costs the hot path nothing beyond the server's own table.
- A write is bracketed by a sequence number, odd while it is under way; a
  reader that sees it odd or changed reads again (a seqlock: one writer per
  slot, readers never block it).
- When the supervisor reaps a worker it reads the slot a last time, adds its
  counters to what retired workers counted, and frees the slot. A worker
  killed outright loses at most its last interval's counts (killed in the
  middle of a write, the supervisor's last good read of its slot counts).

Counters (``COUNTERS``) are summed over retired and live workers; gauges
(``GAUGES``: what is open or busy now) over the live ones only.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from netserve._core._connections import COUNTER_NAMES, TIMEOUT_KINDS

__all__ = [
    "COUNTERS",
    "GAUGES",
    "PUBLISH_INTERVAL",
    "Board",
    "SlotWriter",
    "SupervisorStatistics",
    "figures_of",
]

#: Counters: they only grow, and survive their worker. ``timeouts:<kind>`` are
#: ``ServerStatistics.timeouts_by_kind`` (``timeouts:`` when the kind is unknown).
COUNTERS: tuple[str, ...] = (
    *COUNTER_NAMES,
    *(f"timeouts:{kind}" for kind in TIMEOUT_KINDS),
)
#: Gauges: now, summed over the live workers. ``threads`` and ``busy_threads``
#: are a pool's workers; ``greenlets`` a hub's handlers.
GAUGES: tuple[str, ...] = ("active", "parked", "threads", "busy_threads", "queued", "greenlets")

#: How often a worker writes its figures (seconds).
PUBLISH_INTERVAL = 1.0

_FIELDS = COUNTERS + GAUGES
# A slot: the sequence number, the writer's pid, then one signed 64-bit integer
# per field, native order (only this machine's processes read it).
_SLOT = struct.Struct(f"=Qq{len(_FIELDS)}q")
_HEADER = struct.Struct("=Qq")
# Far more slots than workers run at once, even through a reload.
DEFAULT_SLOTS = 1024
_READ_TRIES = 1000

# From a server's statistics: (field in the slot, attribute of the snapshot).
_GAUGE_SOURCES = (
    ("active", "active"),
    ("parked", "parked"),
    ("threads", "workers"),
    ("busy_threads", "busy_workers"),
    ("queued", "queued"),
    ("greenlets", "greenlets"),
)


@dataclass(frozen=True)
class SupervisorStatistics:
    """A snapshot of a supervisor and its workers, from ``Supervisor.statistics()``.

    The counters are ``ServerStatistics``' summed over every worker since the
    supervisor started, those that have exited included (a worker killed
    outright loses at most its last second's counts); the gauges are summed
    over the workers running now.
    """

    accepted: int = 0
    refused: int = 0
    handled: int = 0
    errors: int = 0
    timeouts: int = 0
    stage_failures: int = 0
    accept_errors: int = 0
    disconnects: int = 0
    lines_too_long: int = 0
    limited: int = 0
    #: ``timeouts`` by kind, as ``ServerStatistics.timeouts_by_kind``.
    timeouts_by_kind: Mapping[str, int] = field(default_factory=dict)
    active: int = 0
    parked: int = 0
    #: A pool's threads, and those busy now; requests in its queues.
    threads: int = 0
    busy_threads: int = 0
    queued: int = 0
    #: A hub's handler greenlets.
    greenlets: int = 0
    #: Workers serving now (those draining not counted).
    workers: int = 0
    #: Workers started to replace one that exited or was killed unasked.
    worker_restarts: int = 0
    #: Reloads (HUP) completed.
    reloads: int = 0
    #: Whether the instance takes new work: a worker serves and no drain began.
    ready: bool = False
    #: Whether the whole instance drains (TERM, or its drain delay).
    draining: bool = False

    @classmethod
    def from_totals(cls, totals: Mapping[str, int], **state: Any) -> SupervisorStatistics:
        """Built from ``Board.totals()`` and the supervisor's own state."""
        plain: dict[str, Any] = {name: totals[name] for name in COUNTER_NAMES + GAUGES}
        by_kind = {
            name.partition(":")[2]: count
            for name, count in totals.items()
            if name.startswith("timeouts:") and count
        }
        return cls(**plain, timeouts_by_kind=by_kind, **state)


def figures_of(servers: Iterable[Any]) -> dict[str, int]:
    """The summed figures of a worker's servers, by field name.

    Servers without ``statistics()`` (a user's own class) count nothing."""
    totals = dict.fromkeys(_FIELDS, 0)
    for server in servers:
        statistics = getattr(server, "statistics", None)
        if statistics is None:
            continue
        stats = statistics()
        for name in COUNTER_NAMES:
            totals[name] += int(getattr(stats, name, 0))
        by_kind: Mapping[str, int] = getattr(stats, "timeouts_by_kind", {})
        for kind, count in by_kind.items():
            totals[f"timeouts:{kind}"] += count
        for name, attribute in _GAUGE_SOURCES:
            totals[name] += int(getattr(stats, attribute, 0) or 0)
    return totals


class Board:
    """The shared block: slots handed to workers, read by the supervisor."""

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        # Anonymous and shared (mmap's default flags): inherited by every fork.
        self._block = mmap.mmap(-1, slots * _SLOT.size)
        self._free = list(range(slots - 1, -1, -1))
        self._taken: set[int] = set()
        self._retired = dict.fromkeys(COUNTERS, 0)
        # Each live slot's last consistent read: what counts when a read finds
        # a write under way (a counter read as missing would go backwards).
        self._last: dict[int, dict[str, int]] = {}

    def take(self) -> int | None:
        """A free slot for a worker about to be forked (zeroed); None if none is left."""
        if not self._free:
            return None
        index = self._free.pop()
        self._block[index * _SLOT.size : (index + 1) * _SLOT.size] = bytes(_SLOT.size)
        self._taken.add(index)
        self._last.pop(index, None)
        return index

    def writer(self, index: int) -> SlotWriter:
        """What the worker writes its slot with (call it in the worker)."""
        return SlotWriter(self._block, index)

    def release(self, index: int) -> None:
        """The slot's worker was reaped: keep its counters, free the slot."""
        if index not in self._taken:
            return
        last = self._read(index)
        if last is not None:
            for name in COUNTERS:
                self._retired[name] += last[name]
        self._taken.discard(index)
        self._last.pop(index, None)
        self._free.append(index)

    def totals(self) -> dict[str, int]:
        """Counters of every worker so far, and gauges of the live ones."""
        totals = dict(self._retired)
        totals.update(dict.fromkeys(GAUGES, 0))
        for index in self._taken:
            figures = self._read(index)
            if figures is not None:
                for name in _FIELDS:
                    totals[name] += figures[name]
        return totals

    def close(self) -> None:
        self._block.close()

    def _read(self, index: int) -> dict[str, int] | None:
        """A consistent copy of a slot's figures (or, while a write stays under
        way, the last one read); None before its first write."""
        figures = self._read_now(index)
        if figures is None:
            return self._last.get(index)
        self._last[index] = figures
        return figures

    def _read_now(self, index: int) -> dict[str, int] | None:
        offset = index * _SLOT.size
        for _ in range(_READ_TRIES):
            before = _HEADER.unpack_from(self._block, offset)[0]
            if before & 1:
                continue  # a write is under way
            values = _SLOT.unpack_from(self._block, offset)
            if _HEADER.unpack_from(self._block, offset)[0] != before:
                continue  # written meanwhile
            if before == 0:
                return None
            return dict(zip(_FIELDS, values[2:], strict=True))
        return None  # a write still under way (or killed there): _read() keeps the last


class SlotWriter:
    """A worker's end of its slot."""

    def __init__(self, block: mmap.mmap, index: int) -> None:
        self._block = block
        self._offset = index * _SLOT.size
        self._sequence = 0

    def publish(self, figures: Mapping[str, int], pid: int) -> None:
        """Write ``figures`` (``figures_of()``) for the supervisor to read."""
        offset = self._offset
        # Made before the write begins: the odd sequence number (a write under
        # way) stays in place no longer than the copy itself.
        values = [figures.get(name, 0) for name in _FIELDS]
        self._sequence += 1
        _HEADER.pack_into(self._block, offset, self._sequence, pid)
        _SLOT.pack_into(self._block, offset, self._sequence, pid, *values)
        self._sequence += 1
        _HEADER.pack_into(self._block, offset, self._sequence, pid)
