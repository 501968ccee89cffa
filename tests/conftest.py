"""Shared fixtures: the leak check every test runs under, and serving helpers."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest

# tests/test_leak_check.py runs this file's leak check in a pytest of its own.
pytest_plugins = ["pytester"]

# How long the threads a test started may take, together, to finish after its
# teardown. It bounds joins, not a sleep: a finished thread returns at once.
THREAD_GRACE_S = 1.0


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the descriptor listdir itself used, closed by now
    return fds


def _child_pids() -> set[int]:
    """Every process whose parent is this one, zombies included."""
    me = os.getpid()
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat.rpartition(b")")[2].split()
        if int(fields[1]) == me:
            children.add(int(entry))
    return children


def _still_running(thread: threading.Thread) -> str:
    """The thread's name and where it is now."""
    frame = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
    stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
    return f"thread {thread.name!r} still running {THREAD_GRACE_S:g} s after teardown, at:\n{stack}"


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves threads, file descriptors or child processes behind."""
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    children_before = _child_pids()
    yield
    problems = []
    deadline = time.monotonic() + THREAD_GRACE_S
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            problems.append(_still_running(thread))
    # A socket nobody closed is found here (and its ResourceWarning is an error).
    gc.collect()
    leaked_fds = {fd: target for fd, target in _open_fds().items() if fd not in fds_before}
    if leaked_fds:
        problems.append(f"file descriptors left open: {leaked_fds}")
    leaked_children = _child_pids() - children_before
    for pid in leaked_children:
        # Reap it so that one leak does not fail every later test too.
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    if leaked_children:
        problems.append(f"child processes left running or unreaped: {sorted(leaked_children)}")
    if problems:
        pytest.fail(f"{request.node.nodeid} leaked: " + "\n".join(problems), pytrace=False)


class Serving:
    """A server running ``serve_forever()`` on a thread, stopped and closed on exit."""

    def __init__(
        self, server: Any, poll_interval: float | None = 0.5, *, close: bool = True
    ) -> None:
        self.server = server
        self.close = close
        self.thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True
        )

    @property
    def address(self) -> Any:
        return self.server.server_address

    def __enter__(self) -> Serving:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join()
        if self.close:
            self.server.server_close()


@pytest.fixture
def unix_path() -> Iterator[str]:
    """A path for a Unix socket in a fresh directory, removed afterwards."""
    # pytest's tmp_path can exceed the 108 bytes of sun_path; this cannot.
    with tempfile.TemporaryDirectory(prefix="ns-", dir="/tmp") as directory:
        yield os.path.join(directory, "s")


@pytest.fixture
def excepthook_calls() -> Iterator[list[type[BaseException]]]:
    """The exception types that threading.excepthook receives during the test."""
    calls: list[type[BaseException]] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: calls.append(args.exc_type)
    try:
        yield calls
    finally:
        threading.excepthook = previous


def connect(address: Any, family: int = socket.AF_INET) -> socket.socket:
    """A client stream socket connected to ``address``, with a hard timeout."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def tool(name: str) -> str:
    """The path of a real peer program (shared/reference/real-tools.md). A missing
    one fails, never skips: scripts/test installs it (as root, with apt-get)."""
    # Debian puts some in sbin, which a user's PATH may lack.
    for path in (shutil.which(name), f"/usr/sbin/{name}", f"/sbin/{name}"):
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail(f"{name} is missing: apt-get install -y --no-install-recommends {name}")


def recv_all(sock: socket.socket) -> bytes:
    """Read until the peer closes."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def pytest_configure(config: pytest.Config) -> None:
    # The suite relies on /proc for its leak checks (Linux).
    if not os.path.isdir("/proc/self/fd"):
        raise pytest.UsageError("the netserve tests need Linux's /proc")


class LogEvent(logging.Handler):
    """Sets ``event`` when a record whose message contains ``text`` is logged."""

    def __init__(self, logger: str, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(logger)
        self.text = text
        self.event = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.messages.append(message)
            self.event.set()

    def __enter__(self) -> LogEvent:
        self.saved = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved)
