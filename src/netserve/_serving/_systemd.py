"""systemd's side of a service: socket activation, readiness notification, the watchdog.

No dependency on libsystemd: each protocol is a few environment variables and,
for notifications, one datagram (shared/reference/systemd.md).

Socket activation (``sd_listen_fds(3)``): the launcher passes N descriptors
from 3 upwards and says so in ``LISTEN_FDS``, with ``LISTEN_PID`` naming the
process they are meant for (a child that inherited the variables must not take
its parent's sockets) and ``LISTEN_FDNAMES`` one name per descriptor. The
receiver marks them close-on-exec and unsets the three variables, so that
processes it starts later do not take them too.

Notification (``sd_notify(3)``): newline-separated ``KEY=VALUE`` fields in one
``AF_UNIX`` datagram to ``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract
namespace). Nothing is sent when the variable is unset: the same program runs
under systemd and outside it. A failed send is logged on ``netserve.systemd``
and reported as ``False``, never raised: a service must not stop serving
because the service manager's socket went away.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from types import TracebackType

from netserve._core._errors import SocketActivationError, UnusableSocketError
from netserve._core._log import RateLimitedLog, get_logger

__all__ = [
    "SystemdNotifier",
    "SystemdSocket",
    "systemd_listeners",
    "systemd_notify",
    "systemd_watchdog_interval",
]

_log = get_logger("systemd")

# sd_listen_fds(3): the first passed descriptor (SD_LISTEN_FDS_START).
_FIRST_FD = 3
# sd_listen_fds_with_names(3): the name of a descriptor LISTEN_FDNAMES does not name.
_UNNAMED = "unknown"
# What netserve's servers can serve: TCP/UDP over IPv4 and IPv6, Unix stream
# and datagram sockets. systemd can also pass FIFOs, netlink, SEQPACKET, ...
_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6, getattr(socket, "AF_UNIX", -1)})
_TYPES = frozenset({socket.SOCK_STREAM, socket.SOCK_DGRAM})


@dataclass(frozen=True)
class SystemdSocket:
    """One socket passed by socket activation, and the name its unit gave it.

    ``name`` is the socket unit's ``FileDescriptorName=`` (by default the unit's
    name), or ``systemd-socket-activate --fdname=``; ``"unknown"`` when the
    launcher passed no names (``LISTEN_FDNAMES`` unset).
    """

    socket: socket.socket
    name: str


def systemd_listeners(*, unset_environment: bool = True) -> list[SystemdSocket]:
    """The sockets this process was started with by socket activation, in order.

    Empty when ``LISTEN_PID`` is unset or names another process. Each socket is
    marked close-on-exec and built with its real family and type (read from the
    descriptor); the caller owns it. With ``unset_environment`` (the default),
    ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` are removed from
    ``os.environ`` whatever the outcome, as ``sd_listen_fds(3)`` does, so a second
    call returns nothing.

    Raises ``SocketActivationError`` when the variables are malformed (a count
    that is not a number, names that do not match the count), and
    ``UnusableSocketError`` when a descriptor is not a TCP, UDP or Unix
    stream/datagram socket; the descriptors then stay open and unclaimed.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES")
    if unset_environment:
        for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(variable, None)
    if pid is None or count is None:
        return []
    if _parse_count("LISTEN_PID", pid) != os.getpid():
        return []
    n = _parse_count("LISTEN_FDS", count)
    if names is None:
        fd_names = [_UNNAMED] * n
    else:
        fd_names = names.split(":")
        if len(fd_names) != n:
            raise SocketActivationError(
                f"LISTEN_FDNAMES names {len(fd_names)} descriptors, LISTEN_FDS says {n}"
            )
    fds = range(_FIRST_FD, _FIRST_FD + n)
    # Close-on-exec before anything can fail: the descriptors are this
    # process's, never a program's it runs later.
    for fd in fds:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError as exc:
            raise SocketActivationError(
                f"LISTEN_FDS={n}, but descriptor {fd} is not open: {exc.strerror}"
            ) from None
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    pairs = list(zip(fds, fd_names, strict=True))
    for fd, name in pairs:
        _check_usable(fd, name)
    return [SystemdSocket(socket.socket(fileno=fd), name) for fd, name in pairs]


def _parse_count(variable: str, value: str) -> int:
    if not value.isdigit() or not value.isascii():
        raise SocketActivationError(f"{variable}={value!r} is not a non-negative integer")
    return int(value)


def _check_usable(fd: int, name: str) -> None:
    """Raise UnusableSocketError unless ``fd`` is a socket netserve can serve."""
    what = f"descriptor {fd} ({name!r})"
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise UnusableSocketError(f"{what} is not a socket (a FIFO or file unit?)")
    # A socket object only to read the kind; detach() leaves the descriptor open.
    probe = socket.socket(fileno=fd)
    try:
        family, kind = probe.family, probe.type
    finally:
        probe.detach()
    if family not in _FAMILIES or kind not in _TYPES:
        raise UnusableSocketError(
            f"{what} is an {_kind_name(family, kind)} socket; netserve serves "
            "TCP, UDP and Unix stream or datagram sockets"
        )


def _kind_name(family: int, kind: int) -> str:
    def name(value: int, enum: type[socket.AddressFamily] | type[socket.SocketKind]) -> str:
        try:
            return enum(value).name
        except ValueError:
            return str(value)

    return f"{name(family, socket.AddressFamily)}/{name(kind, socket.SocketKind)}"


class SystemdNotifier:
    """Sends service state notifications to systemd (``sd_notify(3)``).

    ``address`` defaults to ``$NOTIFY_SOCKET``; without one, ``enabled`` is
    false and every call returns ``False`` having sent nothing.
    ``unset_environment`` removes ``NOTIFY_SOCKET`` from ``os.environ`` (read
    first), so that processes started later (workers, CGI children) do not
    notify in this service's name. The datagram socket is opened on the first
    send and kept until ``close()``; a send waits at most ``timeout`` seconds
    for room in the manager's queue. Each method returns whether the
    notification was sent; failures are logged on ``netserve.systemd``, the
    first of a run at WARNING, then sparingly until a send succeeds.
    """

    # How long a send may wait for room in the service manager's queue: a
    # bound, so that a stuck manager cannot stop a supervisor's loop.
    timeout: float = 1.0

    def __init__(self, address: str | None = None, *, unset_environment: bool = False) -> None:
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET") or None
        if unset_environment:
            os.environ.pop("NOTIFY_SOCKET", None)
        self.address = address
        self._target: str | bytes | None = _notify_target(address)
        self._socket: socket.socket | None = None
        # A supervisor may notify from more than one thread (its loop, a
        # watchdog timer): one socket, and one failure log, between them.
        self._lock = threading.Lock()
        self._failures = RateLimitedLog(_log, logging.WARNING)

    @property
    def enabled(self) -> bool:
        """Whether there is a service manager to notify."""
        return self._target is not None

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (each ``KEY=VALUE``, no newline) as one notification."""
        message = _message(fields)
        target = self._target
        if target is None:
            return False
        with self._lock:
            try:
                sock = self._socket
                if sock is None:
                    # socket.socket() is close-on-exec already (PEP 446).
                    sock = self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sock.settimeout(self.timeout)
                sock.sendto(message, target)
            except OSError as exc:
                self._failures.event("could not notify %s: %s", self.address, exc)
                return False
            return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up (or a reload) is complete; the service serves."""
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC``; send ``ready()`` when done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the service is shutting down."""
        return self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line for ``systemctl status`` (newlines become spaces)."""
        return self.send(*_status(text))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: keep-alive, at least every half ``systemd_watchdog_interval()``."""
        return self.send("WATCHDOG=1")

    def main_pid(self, pid: int) -> bool:
        """``MAINPID=pid``: the service's main process is now ``pid``."""
        return self.send(f"MAINPID={int(pid)}")

    def close(self) -> None:
        """Close the datagram socket; a later send opens another."""
        with self._lock:
            sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def systemd_notify(*fields: str) -> bool:
    """Send one notification to ``$NOTIFY_SOCKET``, e.g. ``systemd_notify("READY=1")``.

    Returns whether it was sent: ``False`` when ``NOTIFY_SOCKET`` is unset, and
    when sending failed (logged on ``netserve.systemd``). For repeated
    notifications, a ``SystemdNotifier`` keeps its socket.
    """
    with SystemdNotifier() as notifier:
        return notifier.send(*fields)


def systemd_watchdog_interval(*, unset_environment: bool = False) -> float | None:
    """The watchdog interval systemd expects of this process, in seconds, or None.

    From ``WATCHDOG_USEC`` (``WatchdogSec=``), when ``WATCHDOG_PID`` is unset or
    names this process. Send ``WATCHDOG=1`` at least every half of it.
    A malformed value is logged and read as no watchdog.
    ``unset_environment`` removes both variables.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if unset_environment:
        os.environ.pop("WATCHDOG_USEC", None)
        os.environ.pop("WATCHDOG_PID", None)
    if usec is None:
        return None
    try:
        if pid is not None and _parse_count("WATCHDOG_PID", pid) != os.getpid():
            return None
        interval = _parse_count("WATCHDOG_USEC", usec)
    except SocketActivationError as exc:
        _log.warning("ignoring the watchdog: %s", exc)
        return None
    return interval / 1e6 if interval else None


def _notify_target(address: str | None) -> str | bytes | None:
    if not address:
        return None
    if address.startswith("@"):
        # The abstract namespace: a leading NUL byte instead of the '@'.
        return b"\0" + address[1:].encode()
    if address.startswith("/"):
        return address
    # systemd 254 added vsock: addresses; nothing else is defined.
    _log.warning("NOTIFY_SOCKET=%r is not a Unix socket address; not notifying", address)
    return None


def _message(fields: tuple[str, ...]) -> bytes:
    for field in fields:
        if "=" not in field or "\n" in field:
            raise ValueError(f"a notification field is KEY=VALUE on one line, not {field!r}")
    return "\n".join(fields).encode()


def _status(text: str | None) -> list[str]:
    if text is None:
        return []
    return ["STATUS=" + " ".join(text.splitlines())]
