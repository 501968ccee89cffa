"""A real load balancer drains an instance (issue 14, section 3).

HAProxy runs examples/haproxy/haproxy.cfg as it is, in front of two instances
of ``netserve echo:LineEcho --workers 2 --metrics-bind ... --drain-delay ...``,
health-checking each instance's /readyz. Clients keep load on HAProxy while one
instance gets SIGTERM: no client request may fail, HAProxy's own statistics
show the server DOWN while the instance still accepts, the instance exits 0,
and started again on the same ports it is marked UP and gets connections.

Everything is waited for through an event: a log line of HAProxy's (a state
change is a warning on its stderr under ``-db``) or of the instance's, a count
of the clients'. HAProxy's frontend listens on a socket the test binds to port
0 and hands over (``fd@N``), so the clients may connect before it is up.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import connect, recv_all, tool
from tests.test_health import ADMIN, SERVING, get
from tests.test_serve_cli import LogLines, serving

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "haproxy"
# Above the config's fall x inter (2 x 250 ms) with room for a busy machine.
DRAIN_DELAY = 3
CLIENTS = 3
REQUESTS_PER_CONNECTION = 3
# Bounds on the load: connections per client, and seconds, whichever first.
MAX_CONNECTIONS = 4000
MAX_SECONDS = 40
# A pause between one client's connections, so that the load does not starve
# the health checks on a two-core machine (a pace, not a wait for anything).
PACE_S = 0.005


@contextmanager
def instance(*args: str) -> Iterator[dict[str, Any]]:
    """``netserve echo:LineEcho`` from the example's directory; its address,
    its admin address and its log."""
    with serving(
        EXAMPLE,
        "echo:LineEcho",
        "--workers",
        "2",
        "--drain-delay",
        str(DRAIN_DELAY),
        "--graceful-timeout",
        "5",
        *args,
    ) as (proc, _, address):
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = ADMIN.match(line)
        assert match, line
        log = LogLines(proc)
        # /readyz answers 503 "starting" until the workers serve.
        log.until(SERVING, 2)
        yield {"proc": proc, "address": address, "admin": (match[1], int(match[2])), "log": log}


class Load:
    """Client threads, each making connections of a few checked requests
    through HAProxy until told to stop; every failure is kept, none retried."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.done = 0  # connections whose every reply came back right
        self.failures: list[str] = []
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(CLIENTS)
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
            assert not thread.is_alive()

    def _client(self, n: int) -> None:
        deadline = threading.Event()
        timer = threading.Timer(MAX_SECONDS, deadline.set)
        timer.start()
        try:
            for count in range(MAX_CONNECTIONS):
                if self.stop.is_set() or deadline.is_set():
                    return
                failure = self._connection(b"client %d connection %d" % (n, count))
                with self.changed:
                    if failure is None:
                        self.done += 1
                    else:
                        self.failures.append(failure)
                    self.changed.notify_all()
                self.stop.wait(PACE_S)
        finally:
            timer.cancel()
            timer.join()
            with self.changed:
                self.changed.notify_all()

    def _connection(self, name: bytes) -> str | None:
        try:
            with connect(self.address) as sock, sock.makefile("rb") as replies:
                for request in range(REQUESTS_PER_CONNECTION):
                    line = name + b" request %d\n" % request
                    sock.sendall(line)
                    reply = replies.readline()
                    if reply != line:
                        return f"{line!r} came back as {reply!r}"
        except OSError as exc:
            return f"{name!r}: {exc!r}"
        return None

    def wait_for(self, more: int) -> int:
        """Wait until ``more`` connections more than now have succeeded."""
        with self.changed:
            target = self.done + more
            self.changed.wait_for(
                lambda: self.done >= target or not any(t.is_alive() for t in self.threads),
                timeout=MAX_SECONDS,
            )
            assert self.done >= target, (self.done, target, self.failures)
            return self.done


def show_stat(path: str) -> dict[str, dict[str, str]]:
    """HAProxy's ``show stat`` CSV for the backend's servers, by name."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"show stat\n")
        text = recv_all(sock).decode()
    header, *rows = text.splitlines()
    names = header.lstrip("# ").split(",")
    servers = {}
    for row in rows:
        fields = dict(zip(names, row.split(","), strict=False))
        if fields.get("pxname") == "instances" and fields["svname"] in ("a", "b"):
            servers[fields["svname"]] = fields
    assert set(servers) == {"a", "b"}, text
    return servers


@contextmanager
def haproxy(environment: dict[str, str], frontend: socket.socket) -> Iterator[LogLines]:
    proc = subprocess.Popen(
        [tool("haproxy"), "-f", str(EXAMPLE / "haproxy.cfg"), "-db"],
        env={**os.environ, **environment},
        pass_fds=[frontend.fileno()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield LogLines(proc)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_haproxy_takes_a_draining_instance_out_before_it_stops_accepting() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="ns-lb-") as directory,
        socket.socket() as frontend,
        instance("-b", "127.0.0.1:0", "--metrics-bind", "0") as b,
    ):
        frontend.bind(("127.0.0.1", 0))
        frontend.listen(64)
        stats = os.path.join(directory, "stats.sock")
        with instance("-b", "127.0.0.1:0", "--metrics-bind", "0") as a:
            environment = {
                "LB_BIND": f"fd@{frontend.fileno()}",
                "LB_STATS": stats,
                "INSTANCE_A": "{}:{}".format(*a["address"]),
                "INSTANCE_B": "{}:{}".format(*b["address"]),
                "ADMIN_A": str(a["admin"][1]),
                "ADMIN_B": str(b["admin"][1]),
            }
            with haproxy(environment, frontend) as balancer, Load(frontend.getsockname()) as load:
                # Replies came through HAProxy: its stats socket exists by now.
                load.wait_for(30)
                before = show_stat(stats)
                # "UP", or "UP 1/2" before a server's first check (HAProxy
                # starts servers up and spreads the first checks over inter).
                assert before["a"]["status"].startswith("UP"), before["a"]
                assert before["b"]["status"].startswith("UP"), before["b"]
                assert int(before["a"]["stot"]) > 0
                assert int(before["b"]["stot"]) > 0

                a["proc"].send_signal(signal.SIGTERM)
                a["log"].until(f"draining in {DRAIN_DELAY} s")
                balancer.until(r"Server instances/a is DOWN")
                down = show_stat(stats)
                # HAProxy says DOWN while the instance still serves: it has
                # not begun its drain, and it answers a client of its own.
                assert down["a"]["status"] == "DOWN", down["a"]
                # Taken out by the readiness check's 503 (a layer 7 status).
                assert (down["a"]["check_status"], down["a"]["check_code"]) == ("L7STS", "503")
                assert down["b"]["status"] == "UP", down["b"]
                assert get(a["admin"], "/readyz") == (503, "draining\n")
                with connect(a["address"]) as direct:
                    direct.sendall(b"still here\n")
                    assert direct.recv(100) == b"still here\n"
                a["log"].until("graceful stop")
                _, err = a["proc"].communicate(timeout=30)
                assert a["proc"].returncode == 0, err
                load.wait_for(30)  # served by b alone
                after = show_stat(stats)
                # No connection went to a once it was down.
                assert after["a"]["stot"] == down["a"]["stot"]
                assert int(after["b"]["stot"]) > int(down["b"]["stot"])

                # The same instance, started again on the same ports, is
                # checked back UP and given connections again.
                with instance(
                    "-b", "{}:{}".format(*a["address"]), "--metrics-bind", str(a["admin"][1])
                ) as again:
                    balancer.until(r"Server instances/a is UP")
                    load.wait_for(30)
                    back = show_stat(stats)
                    assert back["a"]["status"] == "UP"
                    assert int(back["a"]["stot"]) > int(after["a"]["stot"])
                    load.stop.set()
                    # Both stop at once (each waits out its drain delay).
                    for proc in (again["proc"], b["proc"]):
                        proc.send_signal(signal.SIGTERM)
                    for proc in (again["proc"], b["proc"]):
                        _, err = proc.communicate(timeout=30)
                        assert proc.returncode == 0, err
            assert load.failures == []


HAPROXY_BLOCK = re.compile(r"^```haproxy\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_the_config_shown_in_the_docs_is_the_one_tested() -> None:
    config = (EXAMPLE / "haproxy.cfg").read_text()
    page = (EXAMPLE.parent.parent / "docs" / "load-balancers.md").read_text()
    blocks = HAPROXY_BLOCK.findall(page)
    assert blocks
    for block in blocks:
        assert block in config, block
