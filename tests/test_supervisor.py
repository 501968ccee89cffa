"""The prefork supervisor with real processes and real signals (issue 12, section 2).

Each test runs a small script (written to tmp_path) that binds 127.0.0.1 port 0
and runs a ``Supervisor`` around it. The script's hooks print what the test
waits for on stdout: ``PORT n`` before run(), ``FORK id pid`` from post_fork,
``SERVING pid`` from worker_start and ``EXIT id code`` from worker_exit. The
handler answers each line with ``<worker pid> <line>``; ``sleep S`` first
answers ``<pid> started`` and then sleeps S seconds on the serving thread.
"""

from __future__ import annotations

import json
import os
import random
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import netserve

SCRIPT = r"""
import json, logging, os, socket, socketserver, sys, time
import netserve

cfg = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
MODELS = {
    "sync": netserve.TCPServer,
    "threading": netserve.ThreadingTCPServer,
    "forking": netserve.ForkingTCPServer,
    "pool": netserve.ThreadPoolTCPServer,
    "green": netserve.GreenTCPServer,
}


class Echo(netserve.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            words = line.split()
            if words[:1] == [b"sleep"]:
                self.wfile.write(b"%d started\n" % os.getpid())
                self.wfile.flush()
                time.sleep(float(words[1]))
            self.wfile.write(b"%d " % os.getpid() + line)
            self.wfile.flush()


class StdlibEcho(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"%d " % os.getpid() + line)


def stdlib_server(sock):
    # A server netserve did not make: the supervisor needs only serve_forever(),
    # service_actions(), shutdown() and server_close().
    server = socketserver.ThreadingTCPServer(
        sock.getsockname(), StdlibEcho, bind_and_activate=False
    )
    server.socket.close()
    server.socket = sock
    return server


def make_server(sockets):
    if cfg["model"] == "stdlib":
        return stdlib_server(sockets[0])
    if cfg.get("fail") or os.path.exists(cfg.get("fail_if", "/nonexistent")):
        raise RuntimeError("boom from make_server")
    server = netserve.server_from_socket(MODELS[cfg["model"]], sockets[0], Echo)
    if cfg.get("loop_fails"):

        def serve_forever(poll_interval):
            raise RuntimeError("boom from serve_forever")

        server.serve_forever = serve_forever
    return server


def say(text):
    # One write per line: workers and the supervisor share this pipe.
    os.write(1, text.encode() + b"\n")


listener = socket.create_server(("127.0.0.1", 0), reuse_port=cfg.get("reuse_port", False))
say(f"PORT {listener.getsockname()[1]}")
supervisor = netserve.Supervisor(
    make_server,
    [listener],
    workers=cfg.get("workers", 1),
    timeout=cfg.get("timeout", 30.0),
    graceful_timeout=cfg.get("graceful_timeout", 30.0),
    max_requests=cfg.get("max_requests", 0),
    post_fork=lambda wid: say(f"FORK {wid} {os.getpid()}"),
    worker_start=lambda server: say(f"SERVING {os.getpid()}"),
    worker_exit=lambda wid, code: say(f"EXIT {wid} {code}"),
    reopen_logs=lambda: say(f"REOPEN {os.getpid()}"),
    notifier=netserve.SystemdNotifier() if cfg.get("notify") else None,
    watchdog_interval=cfg.get("watchdog"),
    reuse_port=cfg.get("reuse_port", False),
)
status = supervisor.run()
listener.close()
say(f"STATUS {status}")
sys.exit(status)
"""

# Generous bounds on waits that end as soon as what they wait for happens.
WAIT = 10.0


class Running:
    """The supervisor script as a child process, read line by line."""

    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None, **cfg: Any) -> None:
        script = tmp_path / "serve.py"
        script.write_text(SCRIPT)
        self.stderr_path = tmp_path / "stderr.txt"
        cfg.setdefault("model", "threading")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), json.dumps(cfg)],
                stdout=subprocess.PIPE,
                stderr=err,
                env=None if env is None else {**os.environ, **env},
            )
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)
        self.buffer = b""
        self.lines: list[str] = []
        self.port = int(self.expect("PORT")[0])

    def line(self, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.selector.select(remaining):
                raise AssertionError(f"no line within {timeout} s; stderr:\n{self.stderr()}")
            data = os.read(self.fd, 4096)
            if not data:
                raise AssertionError(f"stdout ended; stderr:\n{self.stderr()}")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        self.lines.append(line.decode())
        return line.decode()

    def expect(self, word: str, timeout: float = WAIT) -> list[str]:
        """The next line that starts with ``word`` (its other words); others are kept."""
        deadline = time.monotonic() + timeout
        while True:
            words = self.line(max(0.0, deadline - time.monotonic())).split()
            if words[0] == word:
                return words[1:]

    def serving(self, count: int) -> set[int]:
        return {int(self.expect("SERVING")[0]) for _ in range(count)}

    def rest(self, timeout: float = WAIT) -> list[str]:
        """The lines left until stdout ends."""
        lines = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                lines.append(self.line(max(0.0, deadline - time.monotonic())))
            except AssertionError:
                if self.buffer or time.monotonic() >= deadline:
                    raise
                return lines

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.selector.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Any]:
    started: list[Running] = []

    def start(env: dict[str, str] | None = None, **cfg: Any) -> Running:
        run = Running(tmp_path, env, **cfg)
        started.append(run)
        return run

    yield start
    for run in started:
        run.close()


def ask(port: int, text: str = "hello") -> int:
    """One request on a new connection; returns the pid that answered it."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(text.encode() + b"\n")
        reply = sock.makefile("rb").readline()
    pid, _, echoed = reply.partition(b" ")
    assert echoed == text.encode() + b"\n", reply
    return int(pid)


def wait_gone(pid: int, timeout: float = WAIT) -> bool:
    """Whether process ``pid`` (not necessarily our child) ends within ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_supervisor_is_exported() -> None:
    assert "Supervisor" in netserve.__all__
    with pytest.raises(ValueError):
        netserve.Supervisor(lambda s: None, [], workers=0)


def test_workers_serve_and_a_killed_worker_is_replaced(running: Any) -> None:
    sup = running(workers=2)
    pids = sup.serving(2)
    assert {ask(sup.port) for _ in range(6)} <= pids
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    replacement = sup.serving(1)
    assert gone(victim)
    live = (pids - {victim}) | replacement
    assert {ask(sup.port) for _ in range(6)} <= live
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0
    assert "exited with signal SIGKILL; replacing it" in sup.stderr()
    assert all(gone(pid) for pid in live)


def test_term_answers_the_requests_in_flight_and_exits_0(running: Any) -> None:
    sup = running(workers=2, graceful_timeout=10.0)
    pids = sup.serving(2)
    clients = []
    try:
        for _ in range(20):  # the count: 20 slow requests in flight
            sock = socket.create_connection(("127.0.0.1", sup.port), timeout=WAIT)
            clients.append((sock, sock.makefile("rb")))
            sock.sendall(b"sleep 1\n")
            assert clients[-1][1].readline().endswith(b" started\n")
        sup.signal(signal.SIGTERM)
        for sock, reader in clients:
            reply = reader.readline()
            assert reply.endswith(b" sleep 1\n")
            assert int(reply.split()[0]) in pids
            sock.shutdown(socket.SHUT_WR)  # the handler ends at this end of stream
        assert sup.wait() == 0
    finally:
        for sock, reader in clients:
            reader.close()
            sock.close()
    exits = [line.split() for line in sup.rest() if line.startswith("EXIT")]
    assert sorted(code for _, _, code in exits) == ["0", "0"]
    assert all(gone(pid) for pid in pids)


def _stop_with_a_request_in_its_handler(sup: Any, signum: int) -> int:
    """One worker busy with a 20 s request when ``signum`` comes: its client
    must see the end of the stream (cut, not answered), and the supervisor exit
    0. Returns the worker's pid."""
    (pid,) = sup.serving(1)
    with (
        socket.create_connection(("127.0.0.1", sup.port), timeout=WAIT) as sock,
        sock.makefile("rb") as reader,
    ):
        sock.sendall(b"sleep 20\n")
        assert reader.readline().endswith(b" started\n")
        sup.signal(signum)
        assert reader.readline() == b""
        assert sup.wait() == 0
    return int(pid)


def test_term_past_the_graceful_timeout_cuts_the_rest_and_exits_0(running: Any) -> None:
    sup = running(workers=1, graceful_timeout=0.5)
    # Cut at the deadline.
    assert gone(_stop_with_a_request_in_its_handler(sup, signal.SIGTERM))
    assert "still open after 0.5 s; ending them" in sup.stderr()


def test_int_is_a_fast_stop(running: Any) -> None:
    sup = running(workers=1, graceful_timeout=30.0)
    # The handler's connection is shut down at once, long before the 30 s.
    assert gone(_stop_with_a_request_in_its_handler(sup, signal.SIGINT))


def test_hup_twice_replaces_every_worker_without_a_failed_request(running: Any) -> None:
    # Several clients busy through both reloads, each opening a connection,
    # making 1 to 10 requests on it (every reply checked), closing it and
    # opening the next. A sent request is never retried.
    sup = running(workers=2, graceful_timeout=5.0)
    old = sup.serving(2)
    clients = 4
    answered: list[list[int]] = [[] for _ in range(clients)]
    failures: list[BaseException] = []
    phase = [0]  # 0, 1, 2: the reloads done
    done = threading.Event()
    progress = threading.Condition()

    def client(index: int) -> None:
        # Bounded in count and time: it ends 20 connections into the last phase.
        deadline = time.monotonic() + 30
        rng = random.Random(index)
        last_phase = 0
        for _ in range(2000):
            if done.is_set() or time.monotonic() > deadline or last_phase >= 20:
                return
            last_phase += phase[0] == 2
            try:
                with (
                    socket.create_connection(("127.0.0.1", sup.port), timeout=WAIT) as sock,
                    sock.makefile("rb") as reader,
                ):
                    for number in range(rng.randint(1, 10)):
                        text = b"c%d-%d\n" % (index, number)
                        sock.sendall(text)
                        pid, _, echoed = reader.readline().partition(b" ")
                        assert echoed == text, (pid, echoed)
                        with progress:
                            answered[index].append(int(pid))
                            progress.notify_all()
            except Exception as exc:
                with progress:
                    failures.append(exc)
                    progress.notify_all()
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    generations = [old]
    try:
        for reload in range(2):
            # Every client is busy before each reload.
            with progress:
                counts = [len(replies) for replies in answered]
                assert progress.wait_for(
                    lambda counts=counts: (
                        failures
                        or all(len(r) > n + 5 for r, n in zip(answered, counts, strict=True))
                    ),
                    WAIT,
                )
            sup.signal(signal.SIGHUP)
            generations.append(sup.serving(2))
            # The old workers drain and exit; the clients keep asking meanwhile.
            for _ in range(2):
                sup.expect("EXIT")
            phase[0] = reload + 1
    finally:
        for thread in threads:
            thread.join(WAIT)
        done.set()
        for thread in threads:
            thread.join()
    assert failures == []
    first, second, third = generations
    assert len(first | second | third) == 6  # every pid changed, twice
    for replies in answered:
        assert set(replies) <= first | second | third
        assert set(replies[-10:]) <= third
        # Busy before, between and after the reloads (waited for above).
        assert set(replies) & first
        assert set(replies) & second
    assert all(gone(pid) for pid in first | second)
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def test_a_worker_that_cannot_start_stops_the_supervisor(running: Any) -> None:
    sup = running(workers=2, fail=True)
    started = time.monotonic()
    assert sup.wait(20) == netserve.EXIT_WORKER_FAILED
    assert time.monotonic() - started < 15
    err = sup.stderr()
    assert "RuntimeError: boom from make_server" in err
    assert "failed to start" in err
    forks = [line for line in sup.rest() if line.startswith("FORK")]
    # Backed off, one at a time after the first failure: never a fork loop.
    assert len(forks) == 5, forks


def test_a_worker_whose_loop_fails_at_once_is_no_fork_loop(running: Any) -> None:
    sup = running(workers=1, loop_fails=True)
    assert sup.wait(20) == netserve.EXIT_WORKER_FAILED
    assert "RuntimeError: boom from serve_forever" in sup.stderr()
    forks = [line for line in sup.rest() if line.startswith("FORK")]
    assert len(forks) == 5, forks


def test_workers_exit_when_the_supervisor_is_killed(running: Any) -> None:
    sup = running(workers=2)
    pids = sup.serving(2)
    assert ask(sup.port) in pids
    sup.signal(signal.SIGKILL)
    assert sup.wait() == -signal.SIGKILL
    for pid in pids:
        assert wait_gone(pid, 5.0), f"worker {pid} outlived its supervisor"


@pytest.mark.parametrize("model", ["sync", "green"])
def test_a_worker_whose_loop_is_blocked_is_replaced(running: Any, model: str) -> None:
    sup = running(workers=1, timeout=1.0, model=model)
    (pid,) = sup.serving(1)
    with (
        socket.create_connection(("127.0.0.1", sup.port), timeout=WAIT) as sock,
        sock.makefile("rb") as reader,
    ):
        sock.sendall(b"sleep 60\n")
        assert reader.readline().endswith(b" started\n")
        (replacement,) = sup.serving(1)
        assert replacement != pid
        assert ask(sup.port) == replacement
        # The blocked worker is killed: its connection ends.
        assert reader.readline() == b""
    assert wait_gone(pid, 5.0)
    assert "its serving loop is blocked" in sup.stderr()
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def test_max_requests_recycles_a_worker(running: Any) -> None:
    sup = running(workers=1, max_requests=3, timeout=0.4)
    (first,) = sup.serving(1)
    answered = []
    for _ in range(40):
        answered.append(ask(sup.port))
        if answered[-1] != first:
            break
    assert answered[:3] == [first] * 3
    assert answered[-1] != first
    assert "reached max_requests" in sup.stderr()
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def test_ttin_ttou_and_usr1(running: Any) -> None:
    sup = running(workers=1)
    (first,) = sup.serving(1)
    sup.signal(signal.SIGTTIN)
    (second,) = sup.serving(1)
    sup.signal(signal.SIGUSR1)
    reopened = {int(sup.expect("REOPEN")[0]) for _ in range(3)}
    assert reopened == {sup.proc.pid, first, second}
    sup.signal(signal.SIGTTOU)
    worker_id, code = sup.expect("EXIT")
    assert (worker_id, code) == ("2", "0")  # the newest one drained
    assert wait_gone(second)
    assert ask(sup.port) == first
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


@pytest.mark.parametrize("model", ["sync", "threading", "forking", "pool", "green", "stdlib"])
def test_every_model_serves_and_drains(running: Any, model: str) -> None:
    sup = running(workers=2, model=model)
    pids = sup.serving(2)
    replies = [ask(sup.port) for _ in range(4)]
    if model == "forking":
        # A child of the worker answers: not a worker itself.
        assert not set(replies) & pids
    else:
        assert set(replies) <= pids
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0
    assert all(gone(pid) for pid in pids)


def test_hup_with_code_that_fails_keeps_the_old_workers(running: Any, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    sup = running(workers=2, fail_if=str(broken))
    old = sup.serving(2)
    broken.touch()
    sup.signal(signal.SIGHUP)
    # Both new workers end (one failed, the other is told to stop); no retry loop.
    codes = sorted(sup.expect("EXIT")[1] for _ in range(2))
    assert "3" in codes
    assert {ask(sup.port) for _ in range(6)} <= old
    err = sup.stderr()
    assert "reload failed" in err
    assert "RuntimeError: boom from make_server" in err
    # Fixed: the next HUP reloads.
    broken.unlink()
    sup.signal(signal.SIGHUP)
    new = sup.serving(2)
    assert not new & old
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0
    forks = [line for line in [*sup.lines, *sup.rest()] if line.startswith("FORK")]
    assert len(forks) == 6


def test_systemd_notifications(running: Any) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="ns-", dir="/tmp") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver,
    ):
        path = os.path.join(directory, "notify")
        receiver.bind(path)
        receiver.settimeout(WAIT)

        def until(field: str) -> list[str]:
            while True:
                fields = receiver.recv(4096).decode().split("\n")
                if field in fields:
                    return fields

        sup = running(env={"NOTIFY_SOCKET": path}, workers=2, notify=True, watchdog=0.4)
        sup.serving(2)
        assert "STATUS=2 workers serving" in until("READY=1")
        until("WATCHDOG=1")
        sup.signal(signal.SIGHUP)
        reloading = until("RELOADING=1")
        assert any(field.startswith("MONOTONIC_USEC=") for field in reloading)
        assert "STATUS=reloaded: 2 workers serving" in until("READY=1")
        sup.signal(signal.SIGTERM)
        until("STOPPING=1")
        assert sup.wait() == 0


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    # utime and stime, fields 14 and 15 of proc(5), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_supervisor_and_its_workers_sleep(running: Any) -> None:
    sup = running(workers=2, timeout=0.4)
    pids = sup.serving(2)
    before = {pid: _cpu_seconds(pid) for pid in {sup.proc.pid, *pids}}
    # Nothing to wait for: the point is to let time pass (heartbeats every 0.1 s).
    time.sleep(1.5)
    used = {pid: _cpu_seconds(pid) - spent for pid, spent in before.items()}
    assert all(seconds < 0.3 for seconds in used.values()), used
    assert ask(sup.port) in pids
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def test_reuse_port_spreads_connections_over_every_worker(running: Any) -> None:
    sup = running(workers=4, reuse_port=True)
    pids = sup.serving(4)
    # Each connection comes from a new port: the kernel's hash picks a slot.
    served = [ask(sup.port) for _ in range(200)]
    counts = {pid: served.count(pid) for pid in pids}
    assert set(served) <= pids
    assert min(counts.values()) >= 10, counts  # 50 each on average
    # A killed worker's replacement takes over its slot's listener: what was
    # queued on it meanwhile is answered, nothing is lost.
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    served = [ask(sup.port) for _ in range(100)]
    (replacement,) = sup.serving(1)
    assert replacement in served
    assert set(served) <= (pids - {victim}) | {replacement}
    # One slot fewer: its listener is closed, the others serve everything.
    sup.signal(signal.SIGTTOU)
    sup.expect("EXIT")
    served = [ask(sup.port) for _ in range(100)]
    assert len(set(served)) == 3
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0
