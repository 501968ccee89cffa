"""Processes that tests/test_systemd.py starts as a service manager would.

``python -m tests.systemd_child launch PID_MODE FDS``: a launcher in the manner
of ``sd_listen_fds(3)``: moves the descriptors FDS (comma-separated, inherited
through ``pass_fds``) to 3, 4, ..., sets ``LISTEN_PID`` (``self``: the pid of
the program it then execs, which is its own; ``parent``: another process's)
and execs ``receive``. The test sets ``LISTEN_FDS`` and ``LISTEN_FDNAMES``.

``receive``: calls ``netserve.systemd_listeners()`` and prints one JSON line:
each socket's name, family, type, descriptor and close-on-exec flag, the
``LISTEN_*`` variables left in the environment, or the error raised.

``serve MODEL``: takes the one activated socket (from the real
``systemd-socket-activate``), builds MODEL's server (``threading`` or
``green``, TCP or Unix by the socket's family) around it, answers one line
(serve_forever() until then) with ``<fd name> <LISTEN_* left> <line upper-cased>`` and exits.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading

import netserve


def launch(pid_mode: str, fds_text: str) -> None:
    fds = [int(fd) for fd in fds_text.split(",") if fd]
    # Out of the way first: a source may sit where another one must go.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for target, fd in enumerate(high, start=3):
        os.dup2(fd, target)  # inheritable, as a manager passes them
        os.close(fd)
    # exec keeps the pid: LISTEN_PID is the receiver's own, or another's.
    pid = os.getpid() if pid_mode == "self" else os.getppid()
    os.environ["LISTEN_PID"] = str(pid)
    os.execv(sys.executable, [sys.executable, "-m", "tests.systemd_child", "receive"])


def _listen_env() -> list[str]:
    return sorted(name for name in os.environ if name.startswith("LISTEN_"))


def receive() -> None:
    try:
        activated = netserve.systemd_listeners()
    except netserve.NetserveError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc), "env": _listen_env()}))
        return
    report = [
        {
            "name": a.name,
            "family": a.socket.family.name,
            "type": a.socket.type.name,
            "fd": a.socket.fileno(),
            "cloexec": bool(fcntl.fcntl(a.socket.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
        }
        for a in activated
    ]
    print(json.dumps({"sockets": report, "env": _listen_env()}))
    for a in activated:
        a.socket.close()


def serve(model: str) -> None:
    (activated,) = netserve.systemd_listeners()
    left = ",".join(_listen_env()) or "-"
    unix = activated.socket.family == socket.AF_UNIX
    server_class: type[netserve.TCPServer] = {
        ("threading", False): netserve.ThreadingTCPServer,
        ("threading", True): netserve.ThreadingUnixStreamServer,
        ("green", False): netserve.GreenTCPServer,
        ("green", True): netserve.GreenUnixStreamServer,
    }[model, unix]

    answered = threading.Event()

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline().decode()
            self.wfile.write(f"{activated.name} {left} {line.upper()}".encode())
            answered.set()

    with netserve.server_from_socket(server_class, activated.socket, Handler) as server:
        serving = threading.Thread(target=server.serve_forever)
        serving.start()
        try:
            answered.wait(30)
        finally:
            server.shutdown()
            serving.join()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"launch": launch, "receive": receive, "serve": serve}[mode](*args)
