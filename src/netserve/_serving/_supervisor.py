"""The prefork supervisor (issue 12, section 2): N worker processes on inherited sockets.

The caller binds the listening sockets; ``Supervisor.run()`` forks workers that
each build a server around them (``make_server(sockets)``, called in the worker
after the fork) and run ``serve_forever()``, and watches them until a signal
tells it to stop.

Theory of operation
-------------------
The supervisor is one thread that sleeps in a selector. It wakes for:

- a signal: every handled signal's number is written by the interpreter to a
  pipe (``signal.set_wakeup_fd``); the Python-level handlers do nothing. SIGCHLD
  is handled too, so a worker's exit wakes the loop; exited workers are reaped
  pid by pid (never ``waitpid(-1)``: other code may have children here);
- a worker's status pipe: ``R`` once ``make_server()`` (and the hooks) returned
  and the server serves, ``.`` a heartbeat, ``D`` "I am draining on my own"
  (``max_requests``), end-of-file as it exits;
- a deadline: a worker's liveness deadline, a SIGKILL due after a SIGTERM, the
  end of a start-up back-off.

Rules:

1. Each worker has an id (1, 2, 3 ... in order of forking) and a generation;
   HUP starts a new generation. The supervisor keeps ``workers`` serving
   workers of the current generation (and, during a reload, of the new one);
   a worker told to drain ("retiring") no longer counts, and its replacement
   starts at once.
2. A worker that exits before it said ``R`` (or within ``_EARLY_EXIT`` of it)
   failed at start-up. The next one
   starts after a back-off (0.1 s doubling, at most ``_BACKOFF_MAX``), one at
   a time. After ``_BOOT_TRIES`` such failures in a row with no worker
   serving, ``run()`` gives up with ``EXIT_WORKER_FAILED``; the worker printed
   its traceback on stderr (inherited), which is the error the user reads.
3. Liveness: a worker that is not draining must send something within
   ``timeout`` (counted from its fork while it starts). It sends ``.`` only
   when every serving loop has completed a pass since its last beat: the loop
   that accepts (the hub's thread on the hub) runs ``service_actions()`` on
   every pass, at least every ``timeout / 4`` (its ``poll_interval``). A silent
   worker gets SIGTERM, then SIGKILL ``kill_grace`` later, and is replaced. On
   the sync model, whose loop runs the handler itself, one request longer than
   ``timeout`` gets its worker replaced (as gunicorn's sync workers are).
4. A draining worker (TERM, TTOU, a reload, ``max_requests``) gets
   ``graceful_timeout + kill_grace`` before SIGKILL; its server's own
   ``drain(graceful_timeout)`` ends what is left at ``graceful_timeout``.
5. HUP: ``import_fresh()`` (if given) runs here; then a full new generation
   forks. Once every one of them said ``R``, the old generation drains. If one
   of them exits first (or stays silent past ``timeout``), the reload failed:
   the rest of the new generation drains, the old one keeps serving, and the
   failure is logged.
6. A worker exits by itself when the supervisor is gone: every worker watches
   the read end of a pipe whose write end only the supervisor holds, and sees
   end-of-file when the supervisor's process ends, however it ends. (A
   parent-death signal would fire when the forking *thread* ends.)

7. The listeners are made non-blocking once, before the first fork:
   ``O_NONBLOCK`` belongs to the open file description every worker shares.
   netserve's servers never set a listener they did not create back to
   blocking (``_servers``), and a server that accepts with a plain
   ``accept()`` after ``select()`` (the stdlib's) then gets EAGAIN, which it
   handles, when another worker took the connection first, instead of
   blocking until the next one.

8. Only the supervisor notifies systemd (``notifier``): READY=1 once every
   worker of the first generation serves, RELOADING=1 and READY=1 around a
   reload, STOPPING=1; WATCHDOG=1 only while some worker reports alive.

9. ``reuse_port``: each worker slot (0 .. ``workers`` - 1) has its own
   listener for every IP socket with ``SO_REUSEPORT`` set, so that the kernel
   spreads connections over the slots instead of waking every worker for
   each. Slot 0 uses the caller's sockets; the supervisor binds the others to
   the same address. A worker keeps its slot's listener and closes the
   others'; its replacement (after a crash, ``max_requests``, or in a
   reload's new generation) gets the same listener, so nothing queued on it
   is lost. Closing a listener drops the connections queued on it: one
   fewer slot (TTOU) loses those waiting on that slot's listener.

The worker's side is ``_worker``: its main thread only waits (signals, the
supervisor pipe, its serving loops ending, a heartbeat timer); each server's
``serve_forever()`` runs on a thread of its own, so that ``drain()`` is called
from outside the serving loop, as it expects.

Signals to the supervisor: TERM graceful stop (workers drain; status 0); INT
and QUIT fast stop (workers close and end their connections at once; status
0); HUP reload; TTIN and TTOU one worker more or fewer (never fewer than one);
USR1 calls ``reopen_logs()`` here and in every worker. Left out: USR2 (re-exec
the supervisor with the sockets inherited), WINCH (gunicorn stops its workers
when daemonized; netserve never daemonizes).
"""

from __future__ import annotations

import logging
import os
import random
import selectors
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from netserve._models._children import exit_child
from netserve._serving._admin import AdminEndpoint, Response, text
from netserve._serving._figures import (
    COUNTERS,
    GAUGES,
    Board,
    SupervisorStatistics,
)
from netserve._serving._metrics import metrics_route
from netserve._serving._systemd import SystemdNotifier
from netserve._serving._worker import (
    READY,
    RETIRING,
    WORKER_SIGNALS,
    WorkerProcess,
    nonblocking_pipe,
    wake_only,
)

__all__ = ["EXIT_WORKER_FAILED", "Supervisor"]

log = logging.getLogger("netserve.supervisor")

#: ``run()``'s status when no worker could start (rule 2).
EXIT_WORKER_FAILED = 3

# Start-up back-off (rule 2): the first pause, its cap, and how many failures
# in a row with nothing serving make run() give up (0.1+0.2+0.4+0.8 s: about
# 1.5 s before the user sees the status).
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 3.2
_BOOT_TRIES = 5
# A worker that dies this soon after it said it serves counts as failing to
# start: one whose serving loop fails at once must not become a fork loop.
_EARLY_EXIT = 1.0

# The supervisor also wakes when a worker exits.
_SUPERVISOR_SIGNALS = (*WORKER_SIGNALS, signal.SIGCHLD)

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


class _Worker:
    """The supervisor's record of one worker process."""

    __slots__ = (
        "figures_slot",
        "generation",
        "id",
        "kill_at",
        "killed",
        "last_seen",
        "pid",
        "pipe",
        "ready",
        "ready_at",
        "retiring",
        "slot",
    )

    def __init__(
        self, worker_id: int, pid: int, pipe: int, generation: int, now: float, *, slot: int
    ) -> None:
        self.id = worker_id
        self.slot = slot
        self.pid = pid
        self.pipe = pipe  # the read end of its status pipe; -1 once closed
        self.generation = generation
        self.ready = False
        self.ready_at = 0.0
        self.retiring = False  # told to drain or stop: no longer counts (rule 1)
        self.last_seen = now
        self.kill_at: float | None = None  # SIGKILL due then
        self.killed = False
        self.figures_slot: int | None = None  # its slot on the figures' board (_figures)


class Supervisor:
    """Forks ``workers`` processes that serve ``sockets``; ``run()`` watches them.

    ``make_server(sockets)`` is called in each worker after the fork and
    returns a server (or a list of servers, one per socket) built around the
    inherited sockets, for example with ``netserve.server_from_socket()``;
    the supervisor binds nothing. Each server runs ``serve_forever()``, with
    ``service_actions()`` wrapped to report the loop's passes (rule 3).

    Hooks, all optional: ``post_fork(worker_id)`` and ``worker_start(server)``
    run in the worker (before and after ``make_server()``; an exception in
    either fails the worker's start); ``worker_exit(worker_id, code)`` runs in
    the supervisor after the worker was reaped (``code`` as
    ``os.waitstatus_to_exitcode()`` gives it: negative for a signal);
    ``reopen_logs()`` runs on USR1 in the supervisor and in every worker;
    ``import_fresh()`` runs in the supervisor on HUP before the new workers
    fork (an exception fails the reload; the old workers keep serving).

    ``notifier`` (a ``SystemdNotifier``): READY=1 once every worker serves,
    RELOADING=1 on HUP and READY=1 when the reload is done or has failed (with
    a STATUS= line saying which), STOPPING=1 on TERM, INT and QUIT.
    ``watchdog_interval`` (``systemd_watchdog_interval()``): WATCHDOG=1 every
    quarter of it while some worker serves and reports alive.

    ``reuse_port``: each worker slot gets a listener of its own for every IP
    socket with ``SO_REUSEPORT`` set, bound here to the same address, so that
    the kernel spreads the connections over the workers (rule 9).

    ``max_requests``: a worker drains and is replaced after its servers have
    handled that many requests (``statistics().handled``), plus a random
    0..``max_requests_jitter`` of its own; 0 turns it off.

    ``run()`` must be called on the main thread (it handles signals) of a
    process with no other threads (it forks). The sockets are made
    non-blocking (their open file description, shared by the workers, rule 7).
    """

    #: Seconds between SIGTERM and SIGKILL for a silent worker, and past
    #: ``graceful_timeout`` for a draining one.
    kill_grace = 2.0

    def __init__(
        self,
        make_server: Callable[[Sequence[Any]], Any],
        sockets: Sequence[Any],
        *,
        workers: int = 1,
        graceful_timeout: float = 30.0,
        timeout: float = 30.0,
        max_requests: int = 0,
        max_requests_jitter: int = 0,
        post_fork: Callable[[int], object] | None = None,
        worker_start: Callable[[Any], object] | None = None,
        worker_exit: Callable[[int, int], object] | None = None,
        reopen_logs: Callable[[], object] | None = None,
        import_fresh: Callable[[], object] | None = None,
        notifier: SystemdNotifier | None = None,
        watchdog_interval: float | None = None,
        admin_socket: Any = None,
        drain_delay: float = 0.0,
        reuse_port: bool = False,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if timeout <= 0 or graceful_timeout < 0:
            raise ValueError("timeout must be positive and graceful_timeout not negative")
        if max_requests < 0 or max_requests_jitter < 0:
            raise ValueError("max_requests and max_requests_jitter cannot be negative")
        if drain_delay < 0:
            raise ValueError("drain_delay cannot be negative")
        self.make_server = make_server
        self.sockets = list(sockets)
        self.workers = workers
        self.graceful_timeout = graceful_timeout
        self.timeout = timeout
        self.max_requests = max_requests
        self.max_requests_jitter = max_requests_jitter
        self.post_fork = post_fork
        self.worker_start = worker_start
        self.worker_exit = worker_exit
        self.reopen_logs = reopen_logs
        self.import_fresh = import_fresh
        self.notifier = notifier
        self.watchdog_interval = watchdog_interval
        self.admin_socket = admin_socket
        self.drain_delay = drain_delay
        self.reuse_port = reuse_port
        self._running = False
        self._reset()

    def _reset(self) -> None:
        self._children: dict[int, _Worker] = {}
        self._next_id = 1
        self._generation = 0
        self._pending: int | None = None  # the generation a reload is starting
        self._boot_failures = 0
        self._next_spawn = 0.0
        self._stopping = False
        self._status = 0
        self._wake_r = self._wake_w = self._alive_r = self._alive_w = -1
        self._selector: selectors.BaseSelector | None = None
        self._announced = False  # READY=1 sent since the start
        self._next_watchdog = 0.0
        self._board: Board | None = None
        self._admin: AdminEndpoint | None = None
        self._draining = False  # the whole instance: readiness says 503
        self._drain_at: float | None = None  # the end of the drain delay
        self._restarts = 0
        self._reloads = 0
        # Slot -> its listeners (rule 9); slot 0's are the caller's sockets.
        self._slots: dict[int, list[Any]] = {0: self.sockets}

    def worker_pids(self) -> list[int]:
        """The pids of the workers running now (for the supervisor's own process)."""
        return sorted(self._children)

    def statistics(self) -> SupervisorStatistics:
        """The workers' figures, summed (``SupervisorStatistics``), and the
        supervisor's own: call it in the supervisor's process, while it runs."""
        board = self._board
        totals = board.totals() if board is not None else dict.fromkeys(COUNTERS + GAUGES, 0)
        serving = sum(w.ready and not w.retiring for w in self._children.values())
        return SupervisorStatistics.from_totals(
            totals,
            workers=serving,
            worker_restarts=self._restarts,
            reloads=self._reloads,
            ready=self._announced and not self._draining,
            draining=self._draining,
        )

    # -- health (the admin endpoint's routes) ---------------------------------------------

    def _routes(self) -> dict[str, Callable[[], Response]]:
        return {
            "/livez": self._liveness,
            "/readyz": self._readiness,
            "/metrics": metrics_route(self.statistics),
        }

    def _liveness(self) -> Response:
        """200 while some worker reports alive (rule 3), or none was started
        yet; 503 once none has for ``timeout``, or none runs after failures."""
        now = time.monotonic()
        workers = self._children.values()
        if any(now - w.last_seen < self.timeout for w in workers):
            return text(200, "alive\n")
        if not workers and not self._boot_failures:
            return text(200, "alive: starting\n")
        if not workers:
            return text(503, "no worker runs: they failed to start\n")
        return text(503, f"no worker has reported for {self.timeout:g} s\n")

    def _readiness(self) -> Response:
        """200 from the first generation's start until the instance drains; a
        reload or a worker recycled by max_requests changes nothing (the
        listeners stay open: a connection waits in the backlog meanwhile)."""
        if self._draining:
            return text(503, "draining\n")
        if not self._announced:
            return text(503, "starting\n")
        return text(200, "ready\n")

    # -- the supervisor ------------------------------------------------------------------

    def run(self) -> int:
        """Serve until TERM, INT or QUIT; returns the exit status (0, or
        ``EXIT_WORKER_FAILED`` when no worker could start)."""
        if self._running:
            raise RuntimeError("Supervisor.run() is already running")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Supervisor.run() must run on the main thread")
        self._running = True
        self._reset()
        saved: dict[signal.Signals, _Handler] = {}
        saved_wakeup = -1
        try:
            self._wake_r, self._wake_w = nonblocking_pipe()
            self._alive_r, self._alive_w = os.pipe()
            self._selector = selectors.DefaultSelector()
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
            self._board = Board()
            if self.admin_socket is not None:
                self._admin = AdminEndpoint(self.admin_socket, self._routes())
                self._admin.attach(self._selector)
            saved_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
            for signum in _SUPERVISOR_SIGNALS:
                saved[signum] = signal.signal(signum, wake_only)
            # A caller may block these signals until this point (the command
            # does, from its banner on): one sent meanwhile is delivered now,
            # to these handlers, instead of killing the process.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SUPERVISOR_SIGNALS)
            for sock in self.sockets:
                sock.setblocking(False)  # shared by every worker (rule 7)
            return self._loop()
        finally:
            # Only an exception out of the loop leaves workers here: end them.
            for worker in self._children.values():
                self._signal(worker, signal.SIGKILL)
            for pid in list(self._children):
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            for number, handler in saved.items():
                signal.signal(number, handler)
            if saved:
                signal.set_wakeup_fd(saved_wakeup)
            if self._admin is not None and self._selector is not None:
                self._admin.detach(self._selector)
            if self._board is not None:
                self._board.close()
            if self._selector is not None:
                self._selector.close()
            for worker in self._children.values():
                self._close_pipe(worker)
            self._children.clear()
            for slot in list(self._slots):
                self._close_slot(slot)
            for fd in (self._wake_r, self._wake_w, self._alive_r, self._alive_w):
                if fd >= 0:
                    os.close(fd)
            self._running = False

    def _loop(self) -> int:
        assert self._selector is not None
        log.info(
            "supervisor (pid %d): starting %d worker%s",
            os.getpid(),
            self.workers,
            "" if self.workers == 1 else "s",
        )
        self._spawn_missing(time.monotonic())
        while True:
            now = time.monotonic()
            deadline = self._next_deadline()
            wait = None if deadline is None else max(0.0, deadline - now)
            for key, _ in self._selector.select(wait):
                if key.data is None:
                    self._read_signals()
                elif isinstance(key.data, _Worker):
                    self._read_worker(key.data)
                else:  # the admin endpoint's
                    key.data(self._selector, key)
            if self._admin is not None:
                self._admin.expire(self._selector)
            self._reap()
            now = time.monotonic()
            self._check_deadlines(now)
            if self._stopping:
                if not self._children:
                    return self._status
            else:
                self._spawn_missing(now)

    def _read_signals(self) -> None:
        try:
            data = os.read(self._wake_r, 256)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGTERM:
                self._graceful_stop()
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                self._stop(graceful=False)
            elif signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGTTIN:
                self.workers += 1
                log.info("TTIN: %d workers", self.workers)
            elif signum == signal.SIGTTOU:
                self._fewer()
            elif signum == signal.SIGUSR1:
                self._reopen_logs()
            # SIGCHLD: the loop reaps after every wake-up.

    def _read_worker(self, worker: _Worker) -> None:
        try:
            data = os.read(worker.pipe, 512)
        except BlockingIOError:
            return
        if not data:
            self._close_pipe(worker)
            return
        self._heard(worker, data)

    def _heard(self, worker: _Worker, data: bytes) -> None:
        now = time.monotonic()
        worker.last_seen = now
        if self._boot_failures and worker.ready and now - worker.ready_at >= _EARLY_EXIT:
            self._boot_failures = 0  # one serves: replacements start at once again
        if READY in data and not worker.ready:
            worker.ready = True
            worker.ready_at = now
            log.info("worker %d (pid %d) serving", worker.id, worker.pid)
            if worker.generation == self._pending:
                self._reload_progress(now)
            elif not self._announced and self._all_serving(self._generation):
                self._announced = True
                self._notify("ready", f"{self.workers} workers serving")
        if RETIRING in data and not worker.retiring:
            worker.retiring = True  # its replacement starts now (rule 1)
            worker.kill_at = now + self.graceful_timeout + self.kill_grace
            log.info("worker %d (pid %d) reached max_requests; draining", worker.id, worker.pid)

    def _close_pipe(self, worker: _Worker) -> None:
        if worker.pipe < 0:
            return
        if self._selector is not None:
            try:
                self._selector.unregister(worker.pipe)
            except (KeyError, ValueError):
                pass
        os.close(worker.pipe)
        worker.pipe = -1

    def _reap(self) -> None:
        for pid, worker in list(self._children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0  # reaped by someone else: its status is lost
            if done == 0:
                continue
            # What it wrote before it exited is still in the pipe: read it first.
            while worker.pipe >= 0:
                try:
                    data = os.read(worker.pipe, 512)
                except BlockingIOError:
                    break  # a child of its own (forking model) holds the pipe
                if not data:
                    break
                self._heard(worker, data)
            self._close_pipe(worker)
            del self._children[pid]
            if worker.figures_slot is not None and self._board is not None:
                self._board.release(worker.figures_slot)
            self._exited(worker, os.waitstatus_to_exitcode(status))

    def _exited(self, worker: _Worker, code: int) -> None:
        now = time.monotonic()
        if self.worker_exit is not None:
            try:
                self.worker_exit(worker.id, code)
            except Exception:
                log.exception("worker_exit hook failed for worker %d", worker.id)
        how = _describe(code)
        if worker.generation == self._pending:
            self._reload_failed(
                f"new worker {worker.id} (pid {worker.pid}) exited with {how} "
                + ("before serving" if not worker.ready else "before the reload finished")
            )
            return
        if self._stopping or worker.retiring:
            log.info("worker %d (pid %d) exited with %s", worker.id, worker.pid, how)
            return
        self._restarts += 1  # it is replaced, at once or after a back-off
        # SIGKILL comes from outside (an operator, the OOM killer); any other
        # early end is the worker's own doing, again and again if it is a bug.
        if worker.ready and (now - worker.ready_at >= _EARLY_EXIT or code == -signal.SIGKILL):
            log.warning(
                "worker %d (pid %d) exited with %s; replacing it", worker.id, worker.pid, how
            )
            return
        self._boot_failures += 1
        serving = any(w.ready and not w.retiring for w in self._children.values())
        if self._boot_failures >= _BOOT_TRIES and not serving:
            log.error(
                "worker %d (pid %d) failed to start (exited with %s), %d times in a row "
                "with no worker serving: stopping",
                worker.id,
                worker.pid,
                how,
                self._boot_failures,
            )
            self._status = EXIT_WORKER_FAILED
            self._notify("status", f"worker {worker.id} failed to start ({how}); stopping")
            self._stop(graceful=False)
            return
        pause = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (self._boot_failures - 1))
        self._next_spawn = now + pause
        log.warning(
            "worker %d (pid %d) failed to start (exited with %s); next try in %.1f s",
            worker.id,
            worker.pid,
            how,
            pause,
        )

    def _next_deadline(self) -> float | None:
        deadlines = []
        if not self._stopping and self._missing():
            deadlines.append(self._next_spawn)
        for worker in self._children.values():
            if worker.kill_at is not None:
                if not worker.killed:
                    deadlines.append(worker.kill_at)
            elif not worker.retiring:
                deadlines.append(worker.last_seen + self.timeout)
        if self.watchdog_interval and not self._stopping:
            deadlines.append(self._next_watchdog)
        if self._drain_at is not None:
            deadlines.append(self._drain_at)
        if self._admin is not None and (admin := self._admin.next_deadline()) is not None:
            deadlines.append(admin)
        return min(deadlines) if deadlines else None

    def _check_deadlines(self, now: float) -> None:
        if self._drain_at is not None and now >= self._drain_at:
            self._drain_at = None
            self._stop(graceful=True)
        if self.watchdog_interval and not self._stopping and now >= self._next_watchdog:
            # A quarter of the interval: systemd wants one at least every half.
            self._next_watchdog = now + self.watchdog_interval / 4
            if any(
                w.ready and not w.retiring and now - w.last_seen < self.timeout
                for w in self._children.values()
            ):
                self._notify("watchdog")
        for worker in list(self._children.values()):
            if worker.kill_at is not None:
                if not worker.killed and now >= worker.kill_at:
                    log.warning(
                        "worker %d (pid %d) still running past its deadline: SIGKILL",
                        worker.id,
                        worker.pid,
                    )
                    self._signal(worker, signal.SIGKILL)
                    worker.killed = True
            elif not worker.retiring and now - worker.last_seen >= self.timeout:
                log.error(
                    "worker %d (pid %d) silent for %.1f s (timeout %g s): %s; replacing it",
                    worker.id,
                    worker.pid,
                    now - worker.last_seen,
                    self.timeout,
                    "its serving loop is blocked" if worker.ready else "stuck starting",
                )
                worker.retiring = True
                worker.kill_at = now + self.kill_grace
                self._signal(worker, signal.SIGTERM)
                self._restarts += 1

    def _signal(self, worker: _Worker, signum: int) -> None:
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass  # exited; reaped on the next pass

    def _retire(self, worker: _Worker, now: float) -> None:
        """Tell a worker to drain (rule 4)."""
        worker.retiring = True
        deadline = now + self.graceful_timeout + self.kill_grace
        worker.kill_at = deadline if worker.kill_at is None else min(worker.kill_at, deadline)
        self._signal(worker, signal.SIGTERM)

    def _counted(self, generation: int) -> list[_Worker]:
        return [w for w in self._children.values() if w.generation == generation and not w.retiring]

    def _missing(self) -> int:
        missing = self.workers - len(self._counted(self._generation))
        if self._pending is not None:
            missing += self.workers - len(self._counted(self._pending))
        return max(0, missing)

    def _spawn_missing(self, now: float) -> None:
        generations = [self._generation]
        if self._pending is not None:
            generations.append(self._pending)
        for generation in generations:
            count = self.workers - len(self._counted(generation))
            if generation == self._generation and self._boot_failures:
                # Backing off (rule 2): one at a time, and not before its time.
                starting = any(not w.ready for w in self._counted(generation))
                if now < self._next_spawn or starting:
                    continue
                count = min(count, 1)
            for _ in range(count):
                self._spawn(generation, now)

    def _graceful_stop(self) -> None:
        """TERM: readiness turns 503 at once; the drain starts after ``drain_delay``
        (a second TERM starts it at once), so that a load balancer takes the
        instance out before it stops accepting."""
        if self._stopping:
            return  # a second TERM changes nothing; INT after TERM hurries it
        if self.drain_delay > 0 and not self._draining:
            self._draining = True
            self._drain_at = time.monotonic() + self.drain_delay
            log.info("TERM: not ready; draining in %g s (drain delay)", self.drain_delay)
            self._notify("status", f"not ready; draining in {self.drain_delay:g} s")
            return
        self._drain_at = None
        self._stop(graceful=True)

    def _stop(self, *, graceful: bool) -> None:
        now = time.monotonic()
        if self._stopping and graceful:
            return  # a second TERM changes nothing; INT after TERM hurries it
        self._stopping = True
        self._draining = True
        self._drain_at = None
        if self._pending is not None:
            self._pending = None
            self._notify("ready", "reload abandoned: stopping")
        self._notify("stopping", "graceful stop: draining" if graceful else "fast stop")
        log.info("%s stop: %d workers", "graceful" if graceful else "fast", len(self._children))
        for worker in self._children.values():
            if graceful:
                self._retire(worker, now)
            else:
                worker.retiring = True
                deadline = now + self.kill_grace
                if worker.kill_at is None or worker.kill_at > deadline:
                    worker.kill_at = deadline
                self._signal(worker, signal.SIGQUIT)

    def _fewer(self) -> None:
        if self.workers <= 1:
            log.info("TTOU: already at one worker")
            return
        self.workers -= 1
        log.info("TTOU: %d workers", self.workers)
        now = time.monotonic()
        for generation in (self._generation, self._pending):
            if generation is None:
                continue
            counted = self._counted(generation)
            if len(counted) > self.workers:
                # The last slot goes (the newest worker, unless one was replaced).
                self._retire(max(counted, key=lambda w: (w.slot, w.id)), now)
        for slot in list(self._slots):
            if slot >= self.workers:
                self._close_slot(slot)  # its queued connections are dropped (rule 9)

    def _all_serving(self, generation: int) -> bool:
        counted = self._counted(generation)
        return len(counted) >= self.workers and all(w.ready for w in counted)

    def _notify(self, what: str, *args: str) -> None:
        """One ``SystemdNotifier`` call (it logs its own failures)."""
        if self.notifier is not None:
            getattr(self.notifier, what)(*args)

    def _reopen_logs(self) -> None:
        if self.reopen_logs is not None:
            try:
                self.reopen_logs()
            except Exception:
                log.exception("reopen_logs hook failed")
        for worker in self._children.values():
            self._signal(worker, signal.SIGUSR1)

    def _reload(self) -> None:
        if self._stopping:
            return
        if self._pending is not None:
            log.warning("HUP: a reload is already in progress; ignored")
            return
        self._notify("reloading", f"reloading: starting {self.workers} new workers")
        if self.import_fresh is not None:
            try:
                self.import_fresh()
            except Exception as exc:
                log.exception("reload failed: import_fresh() raised; the old workers keep serving")
                self._notify("ready", f"reload failed: {exc!r}; the old workers keep serving")
                return
        self._pending = self._generation + 1
        log.info("HUP: starting %d new workers", self.workers)
        self._spawn_missing(time.monotonic())

    def _reload_progress(self, now: float) -> None:
        assert self._pending is not None
        if sum(w.ready for w in self._counted(self._pending)) < self.workers:
            return
        old = [w for w in self._children.values() if w.generation != self._pending]
        self._generation, self._pending = self._pending, None
        self._reloads += 1
        log.info("reload done: %d new workers serve; %d old ones drain", self.workers, len(old))
        self._notify("ready", f"reloaded: {self.workers} workers serving")
        for worker in old:
            if not worker.retiring:
                self._retire(worker, now)

    def _reload_failed(self, why: str) -> None:
        now = time.monotonic()
        pending, self._pending = self._pending, None
        log.error("reload failed: %s; the old workers keep serving", why)
        self._notify("ready", f"reload failed: {why}; the old workers keep serving")
        for worker in self._children.values():
            if worker.generation == pending and not worker.retiring:
                self._retire(worker, now)

    def _listeners(self, slot: int) -> list[Any]:
        """The sockets a worker in ``slot`` serves (rule 9)."""
        if not self.reuse_port:
            return self.sockets
        found = self._slots.get(slot)
        if found is None:
            found = self._slots[slot] = [self._sibling(sock) for sock in self.sockets]
        return found

    @staticmethod
    def _sibling(sock: Any) -> Any:
        """A listener of its own on ``sock``'s address, or ``sock`` where there is none."""
        ip = sock.family in (socket.AF_INET, socket.AF_INET6)
        if not ip or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
            return sock
        new = socket.socket(sock.family, sock.type)
        try:
            new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if sock.family == socket.AF_INET6:
                v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                new.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
            new.bind(sock.getsockname())
            if sock.type == socket.SOCK_STREAM:
                new.listen(socket.SOMAXCONN)
            new.setblocking(False)
        except OSError as exc:
            new.close()
            log.error("cannot bind a reuse_port listener on %s (%s): sharing the first", sock, exc)
            return sock
        return new

    def _close_slot(self, slot: int) -> None:
        """Close the listeners this supervisor bound for ``slot`` (never the caller's)."""
        if slot == 0 or slot not in self._slots:
            return
        if any(w.slot == slot and not w.retiring for w in self._children.values()):
            return
        for sock in self._slots.pop(slot):
            if not any(sock is given for given in self.sockets):
                sock.close()

    def _spawn(self, generation: int, now: float) -> None:
        taken = {w.slot for w in self._counted(generation)}
        slot = min(set(range(len(taken) + 1)) - taken)
        listeners = self._listeners(slot)
        worker_id = self._next_id
        self._next_id += 1
        jitter = random.randint(0, self.max_requests_jitter) if self.max_requests else 0
        figures_slot = None if self._board is None else self._board.take()
        r, w = os.pipe()
        # The worker's signals wait from before the fork until the worker has
        # its own handlers (it unblocks them then): a TERM in between would
        # otherwise reach the supervisor's handler in the child and be lost.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(r)
            os.close(w)
            if figures_slot is not None and self._board is not None:
                self._board.release(figures_slot)
            raise
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pid == 0:
            code = 1
            try:
                os.close(r)
                figures = None
                if figures_slot is not None and self._board is not None:
                    figures = self._board.writer(figures_slot)
                alive = self._alive_r
                self._close_in_worker(listeners)
                code = WorkerProcess(
                    self,
                    worker_id,
                    w,
                    jitter,
                    mask,
                    alive=alive,
                    listeners=listeners,
                    figures=figures,
                ).run()
            except BaseException:
                traceback.print_exc()
            finally:
                exit_child(code)  # never back into the caller's stack
        os.close(w)
        os.set_blocking(r, False)
        worker = _Worker(worker_id, pid, r, generation, now, slot=slot)
        worker.figures_slot = figures_slot
        self._children[pid] = worker
        assert self._selector is not None
        self._selector.register(r, selectors.EVENT_READ, worker)

    def _close_in_worker(self, listeners: list[Any]) -> None:
        """In a fresh worker: drop the supervisor's descriptors and signal setup,
        and the listeners of other slots (rule 9)."""
        for slot_listeners in self._slots.values():
            for sock in slot_listeners:
                if not any(sock is own for own in listeners):
                    sock.close()
        self._slots = {}
        signal.set_wakeup_fd(-1)
        if self.notifier is not None:
            # Only the supervisor speaks for the service (rule 8).
            self.notifier.close()
            self.notifier = None
        for signum in _SUPERVISOR_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        if self._admin is not None:
            self._admin.forget()
            self._admin = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for worker in self._children.values():
            if worker.pipe >= 0:
                os.close(worker.pipe)
        for fd in (self._wake_r, self._wake_w, self._alive_w):
            os.close(fd)
        self._children = {}
