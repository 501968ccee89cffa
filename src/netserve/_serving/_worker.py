"""A prefork worker (issue 12, section 2): the supervisor's other side.

``Supervisor._spawn()`` forks, drops the supervisor's descriptors in the child
and runs ``WorkerProcess(...).run()``, whose return value is the child's exit
status. The worker builds its servers (``make_server``, with the hooks), runs
each ``serve_forever()`` on a thread of its own, and keeps its main thread for
control: the signals (through a wake-up pipe), the supervisor's liveness pipe,
and the heartbeat. What the two sides say to each other is defined here.

The status pipe, worker to supervisor: ``READY`` once its servers serve,
``BEAT`` (a heartbeat: every serving loop completed a pass since the last
one), ``RETIRING`` (it drains on its own: max_requests), and end-of-file as
it exits. Its figures go through shared memory (``_figures``), written from
the control thread every ``PUBLISH_INTERVAL`` and once more as it exits.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Any

from netserve._core._log import get_logger
from netserve._serving._figures import PUBLISH_INTERVAL, SlotWriter, figures_of

# Its start-up failure and its own errors go to stderr as tracebacks (the
# user's code failed: they need the whole of it, as the command promises);
# this logger is for what the worker notices about itself.
log = get_logger("supervisor")

__all__ = [
    "BEAT",
    "BOOT_FAILED",
    "LOOP_FAILED",
    "READY",
    "RETIRING",
    "WORKER_SIGNALS",
    "WorkerProcess",
    "nonblocking_pipe",
    "send",
    "wake_only",
]

# A worker's exit status when make_server() or a hook raised before it served.
BOOT_FAILED = 3
# ... and when a serving loop ended on its own (serve_forever() raised).
LOOP_FAILED = 4

READY = b"R"
BEAT = b"."
RETIRING = b"D"

# The stdlib's default poll_interval, for servers netserve did not make: a
# stop waits that long for their loop to look at its flag.
_FOREIGN_POLL = 0.5

# Messages on a worker's own wake-up pipe, besides signal numbers (1..64).
_LOOP_ENDED = 0xFF
_MAX_REQUESTS = 0xFE

WORKER_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
)


def wake_only(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: the wake-up fd already carries the signal."""


def nonblocking_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def send(fd: int, message: bytes) -> None:
    try:
        os.write(fd, message)
    except (BlockingIOError, BrokenPipeError):
        pass  # a full pipe: the supervisor is not reading; gone: nobody is


class WorkerProcess:
    """One worker, in its own process: build the server, serve, stop when told."""

    def __init__(
        self,
        supervisor: Any,
        worker_id: int,
        status: int,
        jitter: int,
        mask: set[int | signal.Signals],
        *,
        alive: int,
        listeners: list[Any],
        figures: SlotWriter | None = None,
    ) -> None:
        self.figures = figures  # where the supervisor reads this worker's figures
        self.listeners = listeners
        self.mask = mask  # the signal mask to restore once the handlers are set
        self.sup = supervisor
        self.id = worker_id
        self.status = status
        self.max_requests = supervisor.max_requests + jitter if supervisor.max_requests else 0
        self.interval = supervisor.timeout / 4
        self.servers: list[Any] = []
        self.threads: list[threading.Thread] = []
        self.passes: list[float] = []
        self.ctl_r = self.ctl_w = -1
        self.alive = alive  # the supervisor's pipe: end of file once it is gone

    def run(self) -> int:
        sup = self.sup
        os.set_blocking(self.status, False)
        self.ctl_r, self.ctl_w = nonblocking_pipe()
        signal.set_wakeup_fd(self.ctl_w, warn_on_full_buffer=False)
        for signum in WORKER_SIGNALS:
            signal.signal(signum, wake_only)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        try:
            if sup.post_fork is not None:
                sup.post_fork(self.id)
            made = sup.make_server(self.listeners)
            self.servers = list(made) if isinstance(made, list | tuple) else [made]
            if sup.worker_start is not None:
                sup.worker_start(made)
        except BaseException:
            sys.stderr.write(f"netserve: worker {self.id} (pid {os.getpid()}) failed to start:\n")
            traceback.print_exc()
            for server in self.servers:
                self._close(server)
            return BOOT_FAILED
        start = time.monotonic()
        self.passes = [start] * len(self.servers)
        for index, server in enumerate(self.servers):
            self._watch_passes(index, server)
            thread = threading.Thread(
                target=self._serve, args=(server,), name=f"netserve-worker-{self.id}", daemon=True
            )
            self.threads.append(thread)
            thread.start()
        send(self.status, READY)
        return self._control(start)

    def _watch_passes(self, index: int, server: Any) -> None:
        """Wrap the server's ``service_actions()``: note each pass of its loop."""
        original = server.service_actions
        call_in_loop = getattr(server, "_netserve_call_in_loop", None)
        passes = self.passes
        posted = [False]
        limit = self.max_requests
        retiring = [False]
        wake = self.ctl_w

        def note() -> None:
            posted[0] = False
            passes[index] = time.monotonic()

        def service_actions() -> None:
            original()
            if call_in_loop is None:
                note()
            elif not posted[0]:
                posted[0] = True  # a stuck loop never accumulates calls
                call_in_loop(note)
            if limit and not retiring[0] and self._handled() >= limit:
                retiring[0] = True
                send(wake, bytes([_MAX_REQUESTS]))

        server.service_actions = service_actions

    def _handled(self) -> int:
        total = 0
        for server in self.servers:
            statistics = getattr(server, "statistics", None)
            if statistics is not None:
                total += statistics().handled
        return total

    def _serve(self, server: Any) -> None:
        interval = self.interval
        if not hasattr(server, "_netserve_call_in_loop"):
            # Not netserve's: its shutdown() waits up to a poll_interval.
            interval = min(interval, _FOREIGN_POLL)
        try:
            server.serve_forever(poll_interval=interval)
        except BaseException:
            traceback.print_exc()
        finally:
            send(self.ctl_w, bytes([_LOOP_ENDED]))

    def _publish(self) -> None:
        if self.figures is None:
            return
        try:
            self.figures.publish(figures_of(self.servers), os.getpid())
        except Exception:
            # A server whose statistics() fails (a user's class): its figures
            # are advisory, the worker serves on; said once, then not tried again.
            log.exception("worker %d: its figures cannot be read; not published", self.id)
            self.figures = None

    def _control(self, start: float) -> int:
        sel = selectors.DefaultSelector()
        sel.register(self.ctl_r, selectors.EVENT_READ)
        sel.register(self.alive, selectors.EVENT_READ)
        beat_sent = start
        wait = self.interval if self.figures is None else min(self.interval, PUBLISH_INTERVAL)
        published = 0.0
        try:
            while True:
                if self.figures is not None and time.monotonic() - published >= PUBLISH_INTERVAL:
                    self._publish()
                    published = time.monotonic()
                for key, _ in sel.select(wait):
                    if key.fd == self.alive:
                        sys.stderr.write(
                            f"netserve: worker {self.id} (pid {os.getpid()}): "
                            "the supervisor is gone; stopping\n"
                        )
                        return self._stop(graceful=False, code=0)
                    for message in os.read(self.ctl_r, 256):
                        if message == signal.SIGTERM:
                            return self._stop(graceful=True, code=0)
                        if message in (signal.SIGINT, signal.SIGQUIT):
                            return self._stop(graceful=False, code=0)
                        if message == signal.SIGUSR1 and self.sup.reopen_logs is not None:
                            try:
                                self.sup.reopen_logs()
                            except Exception:
                                traceback.print_exc()
                        elif message == _MAX_REQUESTS:
                            send(self.status, RETIRING)
                            return self._stop(graceful=True, code=0)
                        elif message == _LOOP_ENDED:
                            return self._stop(graceful=False, code=LOOP_FAILED)
                        # HUP, TTIN, TTOU: meant for the supervisor; ignored.
                if min(self.passes) > beat_sent:
                    beat_sent = time.monotonic()
                    send(self.status, BEAT)
        finally:
            sel.close()

    def _stop(self, *, graceful: bool, code: int) -> int:
        timeout = self.sup.graceful_timeout
        finished: list[bool] = []
        if graceful:
            drains = [
                threading.Thread(
                    target=lambda s=server: finished.append(self._drain(s, timeout)),
                    daemon=True,
                )
                for server in self.servers
            ]
            for thread in drains:
                thread.start()
            for thread in drains:
                thread.join()
        else:
            for server in self.servers:
                self._abort(server)
        for thread in self.threads:
            thread.join(self.sup.kill_grace)
        if graceful and all(finished) and len(finished) == len(self.servers):
            # Everything ended: close as usual. Otherwise a handler may still
            # run (a thread in time.sleep()), which server_close() would wait
            # for; the process ends instead, and the kernel closes the rest.
            for server in self.servers:
                self._close(server)
        self._publish()  # the last figures, for the supervisor to keep
        return code

    @staticmethod
    def _drain(server: Any, timeout: float) -> bool:
        drain = getattr(server, "drain", None)
        if drain is not None:
            return bool(drain(timeout))
        server.shutdown()
        return True

    def _abort(self, server: Any) -> None:
        close = getattr(server, "close", None)
        if close is None:
            server.shutdown()
            return
        close()
        server.abort_connections()
        server.wait_closed(self.sup.kill_grace / 2)

    @staticmethod
    def _close(server: Any) -> None:
        try:
            server.server_close()
        except Exception:
            traceback.print_exc()
