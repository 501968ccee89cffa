"""Faults that need a process of their own: descriptor exhaustion (the server of
tests/accept_child.py, under a low RLIMIT_NOFILE), a handler that blocks the
hub under the supervisor (tests/test_supervisor.py's script), and a TLS
handshake flood (a Harness server speaking TLS). Each ``run_*``
returns its figures; tests/reliability asserts bounds on them, scripts/soak
prints them."""

from __future__ import annotations

import math
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from tests.abuse import captured_stderr
from tests.abuse_scenarios import CI, Harness, limits
from tests.test_accept import Child, cpu_seconds, parse_statistics, recv_line

# Clients left waiting in the backlog while the descriptor table is full.
WAITING_CLIENTS = 3
# A client turned away while the server recovers tries again after this pause,
# as a real client would (the shedding pass that turned it away may still run).
RETRY_PAUSE_S = 0.05
RETRIES = 100


@dataclass
class EmfileFigures:
    #: The server's CPU time (user + system, s) over ``window`` s with the table full.
    cpu_s: float = math.nan
    window: float = 0.0
    #: From the descriptors' release to a new client's echo (s), and the tries it took.
    recovery_s: float = math.nan
    attempts: int = 0
    recovered: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    exit_status: int | None = None
    stderr: str = ""


def run_emfile(model: str, directory: Path, window: float = 2.0) -> EmfileFigures:
    """A server of the model whose descriptor table is full while clients wait;
    its CPU over ``window``; then the descriptors are freed and a new client
    connects (again after a short pause while it is turned away) until it gets
    its echo."""
    figures = EmfileFigures(window=window)
    child = Child(["emfile", model], directory / f"emfile-{model}.stderr")
    clients: list[socket.socket] = []
    try:
        address = ("127.0.0.1", int(child.expect("PORT")))
        child.expect("FULL")
        for _ in range(WAITING_CLIENTS):
            sock = socket.create_connection(address, timeout=10)
            clients.append(sock)
            sock.sendall(b"waiting\n")
        before = cpu_seconds(child.pid)
        time.sleep(window)  # a measurement window, not a wait for readiness
        figures.cpu_s = cpu_seconds(child.pid) - before
        for sock in clients:
            sock.close()
        clients.clear()
        child.send("FREE")
        child.expect("FREED")
        started = time.monotonic()
        deadline = started + 10.0
        for attempt in range(RETRIES):
            if attempt:
                time.sleep(RETRY_PAUSE_S)
            figures.attempts += 1
            with socket.create_connection(address, timeout=5) as after:
                try:
                    after.sendall(b"after\n")
                    answer = recv_line(after, deadline)
                except OSError:
                    answer = b""
            if answer == b"after\n":
                figures.recovered = True
                figures.recovery_s = time.monotonic() - started
                break
            if time.monotonic() >= deadline:
                break
        child.send("STOP")
        figures.stats = parse_statistics(child.expect("STATS")) or {}
        figures.exit_status = child.finish()
    finally:
        for sock in clients:
            sock.close()
        child.close()
        figures.stderr = child.stderr()
    return figures


@dataclass
class StallFigures:
    #: The hub's stall warnings logged by the blocked worker, and what they named.
    warnings: int = 0
    named: bool = False
    #: From the handler's start to the replacement worker serving (s).
    replaced_after: float = math.nan
    #: The replacement answered a new client; the blocked connection was ended.
    served_after: bool = False
    blocked_connection_ended: bool = False
    old_worker_gone: bool = False
    supervisor_exit: int | None = None
    stderr: str = ""


STALL_MESSAGE = "has held the hub's thread"


def run_stall(directory: Path, timeout: float = 1.0, sleep: float = 60.0) -> StallFigures:
    """A supervisor with one hub worker (liveness ``timeout``); a handler calls
    ``time.sleep(sleep)`` on the hub's thread. The worker logs the stall (the
    hub's watchdog, at its default threshold), goes silent, and is replaced."""
    from tests.test_supervisor import Running, ask, wait_gone

    figures = StallFigures()
    sup = Running(directory, None, workers=1, timeout=timeout, model="green")
    try:
        (pid,) = sup.serving(1)
        with (
            socket.create_connection(("127.0.0.1", sup.port), timeout=10) as sock,
            sock.makefile("rb") as reader,
        ):
            sock.sendall(b"sleep %g\n" % sleep)
            assert reader.readline().endswith(b" started\n")
            started = time.monotonic()
            (replacement,) = sup.serving(1)
            figures.replaced_after = time.monotonic() - started
            figures.served_after = replacement != pid and ask(sup.port) == replacement
            figures.blocked_connection_ended = reader.readline() == b""
        figures.old_worker_gone = wait_gone(pid, 10.0)
        sup.signal(signal.SIGTERM)
        figures.supervisor_exit = sup.wait()
    finally:
        sup.close()
        figures.stderr = sup.stderr()
    stalls = [line for line in figures.stderr.splitlines() if STALL_MESSAGE in line]
    figures.warnings = len(stalls)
    figures.named = bool(stalls) and all("Echo.handle() for ('127.0.0.1'," in s for s in stalls)
    figures.named = figures.named and "time.sleep(float(words[1]))" in figures.stderr
    return figures


__all__ = ["EmfileFigures", "StallFigures", "run_emfile", "run_stall"]


# -- a TLS handshake flood ---------------------------------------------------------------


@dataclass
class TLSFloodFigures:
    #: Handshakes the flooding clients completed, and those that failed.
    handshakes: int = 0
    flood_failures: int = 0
    #: Connections that sent a ClientHello's first bytes and stalled; of them,
    #: those the server closed (at its stage_timeout).
    stalled: int = 0
    stalled_closed: int = 0
    #: Requests of the legitimate clients (persistent TLS connections).
    legit_requests: int = 0
    legit_failures: int = 0
    legit_max_s: float = math.nan
    stats: Any = None
    #: What the server process held before and after (fds, threads, greenlets, RSS).
    before: Any = None
    after: Any = None
    all_closed: bool = False
    stderr: str = ""


def run_tls_flood(
    model: str,
    directory: Path,
    *,
    stalled: int = 100,
    flooders: int = 2,
    window: float = 2.0,
    stage_timeout: float = 1.0,
) -> TLSFloodFigures:
    """A server of ``model`` speaking TLS, under ``flooders`` clients that
    handshake and hang up as fast as they can and ``stalled`` connections
    stuck mid-handshake, for ``window`` seconds, beside two legitimate clients
    that send a line every 10 ms on one TLS connection each."""
    ca = trustme.CA()
    issued = ca.issue_cert("localhost")
    cert, key = directory / "cert.pem", directory / "key.pem"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    attrs = {
        **limits(model, CI),
        "tls_certfile": str(cert),
        "tls_keyfile": str(key),
        "stage_timeout": stage_timeout,
    }
    if model == "threading":
        attrs["max_connections_per_client"] = stalled + 100  # every client is 127.0.0.1
    else:
        attrs["max_connections_per_client"] = None
    figures = TLSFloodFigures(stalled=stalled)
    latencies: list[float] = []
    stop = threading.Event()

    def flood(address: Any) -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(address, timeout=5) as raw:
                    with client_context.wrap_socket(raw, server_hostname="localhost"):
                        figures.handshakes += 1
            except OSError:
                figures.flood_failures += 1

    def legitimate(address: Any) -> None:
        try:
            with socket.create_connection(address, timeout=5) as raw:
                with client_context.wrap_socket(raw, server_hostname="localhost") as tls:
                    while not stop.wait(0.01):
                        started = time.monotonic()
                        tls.sendall(b"ping\n")
                        reply = b""
                        while not reply.endswith(b"\n"):
                            chunk = tls.recv(100)
                            if not chunk:
                                raise ConnectionResetError("closed by the server")
                            reply += chunk
                        latencies.append(time.monotonic() - started)
        except OSError:
            figures.legit_failures += 1

    with captured_stderr() as err, Harness(model, attrs) as h:
        # One handshake first: what the server makes once (the hub's own
        # descriptors, a pool worker) is in the baseline.
        with socket.create_connection(h.address, timeout=5) as raw:
            with client_context.wrap_socket(raw, server_hostname="localhost"):
                pass
        h.wait_closed(10)
        figures.before = h.call("probe")
        stuck = []
        try:
            for _ in range(stalled):
                sock = socket.create_connection(h.address, timeout=stage_timeout + 10)
                stuck.append(sock)
                sock.sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello's record header
            threads = [
                threading.Thread(target=target, args=(h.address,))
                for target in [flood] * flooders + [legitimate] * 2
            ]
            for thread in threads:
                thread.start()
            stop.wait(window)
            stop.set()
            for thread in threads:
                thread.join(30)
            for sock in stuck:
                try:
                    figures.stalled_closed += sock.recv(100) == b""
                except OSError:
                    figures.stalled_closed += 1
        finally:
            stop.set()
            for sock in stuck:
                sock.close()
        figures.all_closed = h.wait_closed(10)
        figures.after = h.call("probe")
        figures.stats = h.statistics()
    figures.legit_requests = len(latencies)
    figures.legit_max_s = max(latencies, default=math.nan)
    figures.stderr = err.text
    return figures
