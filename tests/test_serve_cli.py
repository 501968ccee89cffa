"""``netserve MODULE:ATTR``: the command serves a user's handler (issue 12, section 1).

Each test writes a handler module into a temporary directory, runs the
command there as a subprocess, reads the address it prints, and talks to it.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import connect, recv_all

APP = r"""
import os
import time
import netserve

class Echo(netserve.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line.upper())

class Slow(netserve.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline()
        self.wfile.write(b"started\n")
        time.sleep(0.5)
        self.wfile.write(line.upper())

class Datagrams(netserve.DatagramRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.read().upper())

class Client(netserve.StreamRequestHandler):
    def handle(self):
        self.wfile.write(repr(self.client_address).encode() + b" " + self.rfile.readline())

class EchoServer(netserve.ThreadingTCPServer):
    RequestHandlerClass = Echo

def factory(sock):
    return netserve.server_from_socket(netserve.ThreadingTCPServer, sock, Echo)

not_servable = 42

class BadHooks:
    post_fork = "not a function"
"""

BANNER = re.compile(r"netserve: serving (\S+) \((\w+) model\) on (\S+)")


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "broken.py").write_text("import os\nraise RuntimeError('boom at import')\n")
    return tmp_path


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError("no line from the command in time")
    return proc.stdout.readline()


@contextmanager
def serving(app_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Any]:
    """Run ``netserve ARGS`` in ``app_dir``; yield (process, [(host, port), ...])."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "netserve", *args],
        cwd=app_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        line = _read_line(proc, 20)
        match = BANNER.match(line)
        assert match, line + (proc.stderr.read() if proc.stderr else "")
        shown = match[3]
        if shown.startswith("unix:"):
            yield proc, match, shown[len("unix:") :]
        else:
            host, _, port = shown.rpartition(":")
            yield proc, match, (host.strip("[]"), int(port))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_serves_a_handler_and_drains_on_sigterm(app_dir: Path) -> None:
    with serving(app_dir, "app:Echo", "--bind", "127.0.0.1:0") as (proc, match, address):
        assert match[1] == "app:Echo"
        assert match[2] == "pool"  # the default model
        with connect(address) as client:
            client.sendall(b"hello\n")
            assert client.recv(100) == b"HELLO\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.endswith("netserve: stopped\n")


@pytest.mark.parametrize("model", ["sync", "threading", "forking", "pool", "green"])
def test_sigterm_lets_the_requests_in_flight_finish(app_dir: Path, model: str) -> None:
    with serving(app_dir, "app:Slow", "-b", "127.0.0.1:0", "--model", model) as (
        proc,
        match,
        address,
    ):
        assert match[2] == model
        count = 1 if model == "sync" else 3
        clients = [connect(address) for _ in range(count)]
        try:
            for i, client in enumerate(clients):
                client.sendall(b"slow %d\n" % i)
            for client in clients:
                assert client.recv(8) == b"started\n"
            # Every request is in its handler: the drain lets each finish.
            proc.send_signal(signal.SIGTERM)
            for i, client in enumerate(clients):
                assert recv_all(client) == b"SLOW %d\n" % i
        finally:
            for client in clients:
                client.close()
        proc.communicate(timeout=30)
        assert proc.returncode == 0


def test_a_server_class_and_a_factory_are_served(app_dir: Path) -> None:
    for target in ("app:EchoServer", "app:factory"):
        with serving(app_dir, target, "-b", "127.0.0.1:0") as (proc, _, address):
            with connect(address) as client:
                client.sendall(b"x\n")
                assert client.recv(100) == b"X\n"
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
            assert proc.returncode == 0


def test_udp_unix_and_environment_options(app_dir: Path) -> None:
    with serving(app_dir, "app:Datagrams", "-b", "127.0.0.1:0", "--udp") as (proc, _, address):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(b"dgram", address)
            assert client.recv(100) == b"DGRAM"
        proc.send_signal(signal.SIGTERM)
    path = str(app_dir / "s.sock")
    env = {"NETSERVE_MODEL": "threading", "NETSERVE_BIND": f"unix:{path}"}
    with serving(app_dir, "app:Echo", env=env) as (proc, match, _):
        assert match[2] == "threading"
        with connect(path, socket.AF_UNIX) as client:
            client.sendall(b"u\n")
            assert client.recv(100) == b"U\n"
        proc.send_signal(signal.SIGTERM)


@pytest.mark.parametrize("target", ["app:Client", "app:EchoServer"])
def test_proxy_protocol_options(app_dir: Path, target: str) -> None:
    args = ["-b", "127.0.0.1:0", "--proxy-protocol", "v1", "--proxy-trusted", "10.0.0.0/8"]
    env = {"NETSERVE_PROXY_TRUSTED": "192.0.2.1, 127.0.0.1"}  # ignored: the option wins
    with serving(app_dir, target, *args, "--proxy-trusted", "127.0.0.1", env=env) as (
        proc,
        _,
        address,
    ):
        with connect(address) as client:
            client.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\nhi\n")
            expected = b"('203.0.113.7', 5555) hi\n" if target == "app:Client" else b"HI\n"
            assert client.recv(100) == expected
        proc.send_signal(signal.SIGTERM)
    env = {"NETSERVE_PROXY_PROTOCOL": "v1", "NETSERVE_PROXY_TRUSTED": "10.0.0.0/8, 127.0.0.1"}
    with serving(app_dir, target, "-b", "127.0.0.1:0", env=env) as (proc, _, address):
        with connect(address) as client:
            client.sendall(b"PROXY TCP4 203.0.113.8 192.0.2.1 5556 80\r\nho\n")
            assert client.recv(100).endswith(b"HO\n" if target == "app:EchoServer" else b"ho\n")
        proc.send_signal(signal.SIGTERM)


def run(app_dir: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "netserve", *args],
        cwd=app_dir,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nothere:Echo"], "no module named 'nothere'"),
        (["app:Nope"], "'app' has no attribute 'Nope'"),
        (["app"], "is not MODULE:ATTR"),
        (["app:not_servable"], "is neither a request handler class"),
        (["app:Echo", "--model", "sync", "--threads", "4"], "--threads is for --model pool"),
        (["app:Echo", "--bogus"], "unrecognized arguments: --bogus"),
        (["app:Echo", "--model", "nope"], "invalid choice: 'nope'"),
        (["app:Echo", "-b", "127.0.0.1:99999"], "between 0 and 65535"),
        (["app:Echo", "--umask", "9z"], "is not an octal number"),
        (["app:Echo", "--proxy-protocol", "v1"], "needs --proxy-trusted"),
        (["app:Echo", "--hooks", "nothere:x"], "--hooks: no module named 'nothere'"),
        (["app:Echo", "--hooks", "app:Nope"], "--hooks: 'app' has no attribute 'Nope'"),
        (["app:Echo", "--hooks", "app:not_servable"], "has none of post_fork, worker_start"),
        (["app:Echo", "--hooks", "app:BadHooks"], "post_fork is 'not a function', not a"),
        (["app:Echo", "--user", "no-such-user-here"], "--user no-such-user-here: no such user"),
        (["app:Echo", "--group", "no-such-group-here"], "no such group"),
        (["app:Echo", "--proxy-trusted", "10.0.0.0/8"], "is for --proxy-protocol"),
        (["app:Echo", "--proxy-protocol", "v3", "--proxy-trusted", "::1"], "invalid choice"),
        (
            ["app:Echo", "-b", "127.0.0.1:0", "--proxy-protocol", "v2", "--proxy-trusted", "x"],
            "'x' is not an address",
        ),
        (
            ["app:factory", "--proxy-protocol", "v2", "--proxy-trusted", "127.0.0.1"],
            "not a factory",
        ),
        (["app:Echo", "--udp"], "Echo is a stream handler: --udp needs a DatagramRequestHandler"),
        (["app:Datagrams"], "Datagrams is a datagram handler: serve it with --udp"),
        # --check checks what serving would.
        (
            ["app:Echo", "--check", "--proxy-protocol", "v1", "--proxy-trusted", "x"],
            "'x' is not an address",
        ),
    ],
)
def test_a_mistake_is_one_line_and_status_2(app_dir: Path, args: list[str], message: str) -> None:
    result = run(app_dir, *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("NETSERVE_WORKERS", "abc", "NETSERVE_WORKERS: argument -w/--workers: 'abc' is not a"),
        ("NETSERVE_MODEL", "turbo", "NETSERVE_MODEL: argument --model: invalid choice: 'turbo'"),
        ("NETSERVE_DRAIN_DELAY", "-3", "NETSERVE_DRAIN_DELAY: argument --drain-delay: '-3' must"),
        ("NETSERVE_LOG_FORMAT", "xml", "NETSERVE_LOG_FORMAT: argument --log-format: invalid"),
        ("NETSERVE_LOG_LEVEL", "loud", "NETSERVE_LOG_LEVEL: argument --log-level: invalid"),
        ("NETSERVE_UDP", "maybe", "NETSERVE_UDP='maybe': a flag's variable is one of"),
        ("NETSERVE_BIND", "nonsense", "NETSERVE_BIND: argument -b/--bind: 'nonsense' is not"),
    ],
)
def test_a_mistake_in_a_variable_is_one_line_naming_it(
    app_dir: Path, variable: str, value: str, message: str
) -> None:
    result = run(app_dir, "app:Echo", "--check", env={variable: value})
    assert (result.returncode, result.stderr.count("\n")) == (2, 1), result.stderr
    assert result.stderr.startswith("netserve: " + message), result.stderr


def test_variables_are_checked_and_the_command_line_wins(app_dir: Path) -> None:
    env = {"NETSERVE_MODEL": "green", "NETSERVE_UDP": "0", "NETSERVE_WORKERS": "x"}
    result = run(app_dir, "app:Echo", "--check", "--workers", "2", env=env)
    assert result.returncode == 0, result.stderr  # --workers given: its variable unused
    assert result.stdout == "netserve: app:Echo is servable with the green model\n"
    result = run(app_dir, "app:Echo", "--check", env={"NETSERVE_UDP": "yes"})
    assert "is a stream handler" in result.stderr  # the flag is on


def test_an_address_in_use_is_one_line_and_status_2(app_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run(app_dir, "app:Echo", "-b", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert result.stderr == f"netserve: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_an_import_error_shows_the_users_traceback(app_dir: Path) -> None:
    result = run(app_dir, "broken:Handler")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "netserve: importing 'broken' failed: RuntimeError: boom at import"
    assert lines[1] == "Traceback (most recent call last):"
    assert "broken.py" in lines[2]
    assert "netserve" not in "\n".join(lines[1:-1])  # only the user's frames
    assert lines[-1] == "RuntimeError: boom at import"


def test_check_imports_and_validates_then_exits(app_dir: Path) -> None:
    result = run(app_dir, "app:Echo", "--check", "--model", "threading")
    assert result.returncode == 0
    assert result.stdout == "netserve: app:Echo is servable with the threading model\n"
    assert run(app_dir, "--version").stdout.startswith("netserve ")


def test_pid_file_is_written_and_removed(app_dir: Path) -> None:
    pidfile = app_dir / "netserve.pid"
    with serving(app_dir, "app:Echo", "-b", "127.0.0.1:0", "--pid", str(pidfile)) as (
        proc,
        _,
        _address,
    ):
        assert pidfile.read_text() == f"{proc.pid}\n"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert not pidfile.exists()


def test_served_from_an_inherited_descriptor(app_dir: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        fd = listener.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-m", "netserve", "app:Echo", "-b", f"fd://{fd}"],
            cwd=app_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=[fd],
        )
        try:
            assert BANNER.match(_read_line(proc, 20))
            with connect(listener.getsockname()) as client:
                client.sendall(b"fd\n")
                assert client.recv(100) == b"FD\n"
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
            assert proc.returncode == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)


def test_a_stale_unix_file_is_replaced_and_abstract_names_work(app_dir: Path) -> None:
    path = str(app_dir / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # as a killed server leaves it: bound, nothing accepts
    stale.close()
    with serving(app_dir, "app:Echo", "-b", f"unix:{path}") as (proc, _, address):
        assert address == path
        with connect(path, socket.AF_UNIX) as client:
            client.sendall(b"s\n")
            assert client.recv(100) == b"S\n"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert not os.path.exists(path)  # removed as the command stopped
    name = f"netserve-cli-{os.getpid()}"
    with serving(app_dir, "app:Echo", "-b", f"unix:@{name}") as (proc, _, address):
        assert address == f"@{name}"
        with connect("\0" + name, socket.AF_UNIX) as client:
            client.sendall(b"a\n")
            assert client.recv(100) == b"A\n"
        proc.send_signal(signal.SIGTERM)


VERSIONED = """
import os
import netserve

VERSION = b"{version}"

class Version(netserve.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(VERSION + b" %d\\n" % os.getpid())
"""


def ask(address: Any) -> tuple[bytes, int]:
    with connect(address) as client:
        client.sendall(b"?\n")
        version, pid = recv_all(client).split()
    return version, int(pid)


def test_workers_serve_and_hup_reloads_the_code_afresh(app_dir: Path) -> None:
    (app_dir / "versioned.py").write_text(VERSIONED.format(version="v1"))
    args = ("versioned:Version", "-b", "127.0.0.1:0", "--workers", "2", "--model", "threading")
    # No .pyc: a rewrite within the same second, of the same size, would look
    # unchanged to the byte-code cache.
    with serving(app_dir, *args, env={"PYTHONDONTWRITEBYTECODE": "1"}) as (proc, _, address):
        version, first_pid = ask(address)
        assert version == b"v1"
        assert first_pid != proc.pid  # a worker answers, not the supervisor
        # Code that no longer imports: the reload fails, the old workers serve on.
        (app_dir / "versioned.py").write_text("raise RuntimeError('broken')\n")
        log = LogLines(proc)
        proc.send_signal(signal.SIGHUP)
        log.until("reload failed")
        assert ask(address)[0] == b"v1"
        # New code: new workers import it; the old ones drain and go.
        (app_dir / "versioned.py").write_text(VERSIONED.format(version="v2"))
        proc.send_signal(signal.SIGHUP)
        log.until("reload done")
        # An old worker may take a connection or two before its drain starts:
        # those still get whole replies (from v1); then only v2 answers.
        replies = [ask(address) for _ in range(50)]
        assert replies[-1][0] == b"v2"
        assert {version for version, _ in replies} <= {b"v1", b"v2"}
        assert replies[-1][1] != first_pid
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0


class LogLines:
    """The command's stderr, line by line, each waited for at most 20 s.

    Read from the descriptor with our own buffer: a line already in a file
    object's buffer is one a wait on the descriptor would never see."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self.fd = proc.stderr.fileno()
        self.buffer = b""

    def next(self) -> str:
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], 20)
            if not ready:
                raise AssertionError("no log line in time")
            data = os.read(self.fd, 65536)
            if not data:
                raise AssertionError("the command's stderr ended")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def matches(self, pattern: str | re.Pattern[str], count: int = 1) -> list[re.Match[str]]:
        """The matches of the next ``count`` lines matching ``pattern``."""
        found: list[re.Match[str]] = []
        for _ in range(500):  # lines: bounded
            match = re.search(pattern, self.next())
            if match:
                found.append(match)
                if len(found) == count:
                    return found
        raise AssertionError(f"no {count} lines matching {pattern}: {found}")

    def until(self, pattern: str, count: int = 1) -> list[str]:
        """The first group of each of the next ``count`` lines matching ``pattern``."""
        return [m[1] if m.groups() else m[0] for m in self.matches(pattern, count)]


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SERVING = re.compile(r"worker (\d+) \(pid (\d+)\) serving")


def test_hooks_run_in_every_worker_in_replacements_and_after_hup(tmp_path: Path) -> None:
    # The example's hooks open a journal per worker (worker-PID.log, in the
    # current directory) and report each exit in the supervisor.
    args = ["serve_hooks:Journaled", "--hooks", "serve_hooks:Hooks", "-w", "2", "-b", "127.0.0.1:0"]
    env = {"PYTHONPATH": str(EXAMPLES), "NETSERVE_MODEL": "threading"}
    with serving(tmp_path, *args, env=env) as (proc, _, address):
        log = LogLines(proc)
        first = {int(m[2]): m[1] for m in log.matches(SERVING, 2)}
        with connect(address) as client:
            client.sendall(b"one\n")
            client.shutdown(socket.SHUT_WR)
            answered, line = recv_all(client).split()
        assert int(answered) in first
        assert line == b"one"
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        (replaced,) = log.matches(SERVING, 1)
        proc.send_signal(signal.SIGHUP)
        second = {int(m[2]): m[1] for m in log.matches(SERVING, 2)}
        log.until("reload done")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
    pids = {**first, int(replaced[2]): replaced[1], **second}
    assert len(pids) == 5
    journals = {
        int(p.name[len("worker-") : -len(".log")]): p for p in tmp_path.glob("worker-*.log")
    }
    assert set(journals) == set(pids)
    for pid, worker_id in pids.items():
        text = journals[pid].read_text()
        assert text.startswith(f"worker {worker_id} forked\nserving 1 socket(s)\n"), text
    assert journals[int(answered)].read_text().endswith("one\n")
    # worker_exit, in the supervisor: once per worker, with its status.
    exits = dict(re.findall(r"^worker (\d+) exited with (-?\d+)$", out, re.MULTILINE))
    assert exits == {**dict.fromkeys(pids.values(), "0"), first[victim]: "-9"}


IDENTITY_APP = """
import os
import netserve

class Who(netserve.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"%d %d %d\\n" % (os.getuid(), os.getgid(), os.getpid()))
"""


def test_workers_run_as_user_and_group_the_supervisor_keeps_its_rights() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: this test must run")
        pytest.skip("switching the workers' identity needs root")
    nobody, nogroup = pwd.getpwnam("nobody"), grp.getgrnam("nogroup")  # Debian's names
    # A directory the workers can read (pytest's own are root's alone): they
    # import the module afresh, as nobody.
    with tempfile.TemporaryDirectory(prefix="ns-priv-", dir="/tmp") as directory:
        os.chmod(directory, 0o755)
        app_dir = Path(directory)
        (app_dir / "who.py").write_text(IDENTITY_APP)
        pidfile, path = app_dir / "netserve.pid", str(app_dir / "who.sock")
        args = ["who:Who", "-w", "2", "-b", "127.0.0.1:0", "-b", f"unix:{path}"]
        args += ["--user", "nobody", "--group", "nogroup", "--pid", str(pidfile)]
        with serving(app_dir, *args) as (proc, _, address):
            assert proc.stdout is not None
            assert BANNER.match(proc.stdout.readline())  # the Unix socket's line
            replies = []
            for where, family in ((address, socket.AF_INET), (path, socket.AF_UNIX)):
                with connect(where, family) as client:
                    client.sendall(b"?\n")
                    replies.append([int(word) for word in recv_all(client).split()])
            for uid, gid, pid in replies:
                assert (uid, gid) == (nobody.pw_uid, nogroup.gr_gid)
                assert _ids(pid) == (nobody.pw_uid, nogroup.gr_gid, [nogroup.gr_gid])
            # The supervisor keeps root; what it made is root's.
            assert _ids(proc.pid)[:2] == (0, 0)
            assert pidfile.read_text() == f"{proc.pid}\n"
            assert (pidfile.stat().st_uid, os.stat(path).st_uid) == (0, 0)
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
            assert proc.returncode == 0
        # Removed as it stopped, by the supervisor that made them.
        assert not pidfile.exists()
        assert not os.path.exists(path)


def _ids(pid: int) -> tuple[int, int, list[int]]:
    """A process's real uid, real gid and supplementary groups, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return int(fields["Uid"][0]), int(fields["Gid"][0]), [int(g) for g in fields["Groups"]]
