"""Does a server keep answering with many busy connections? (the stall scenario)

    python benchmarks/stall.py netserve-threading stdlib-threading --conns 2048
    python benchmarks/stall.py netserve-threading@/tmp/base netserve-threading --cold

For each side (a row of servers.py, optionally ``@TREE`` as in ab.py), in a
fresh server pinned to the first core, with this client on the second:

1. open CONNS connections; unless ``--cold``, get one reply on each first (the
   server has then accepted all of them and started their handlers);
2. a pingpong window: one line in flight on every connection, the next line as
   soon as the reply comes. Prints requests/s, how many connections got no reply
   in the window, when the last first reply came, and the listener's accept
   queue at the end (``ss``: connections the server has not accepted);
3. with those connections left open, a churn window: 16 clients, a new
   connection per request.

A server "stalls" when connections go unanswered for the whole window. With
``--cold`` the pingpong starts while the server is still accepting, as in
run.py's pingpong rows: a thread-per-connection server (netserve's and the
stdlib's alike) then leaves most of them in the accept queue, because its
serving thread waits in ``Thread.start()`` for each new thread to get the GIL
from the busy ones.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import socket
import subprocess
import sys
import time

import ab  # benchmarks/ab.py: the ROW@TREE sides
import run  # benchmarks/run.py

LINE = b"ping\n"


def open_all(port: int, n: int, deadline: float) -> list[socket.socket]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            err = s.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        with select.epoll() as ep:
            pending = {s.fileno(): s for s in socks}
            for fd in pending:
                ep.register(fd, select.EPOLLOUT)
            while pending and time.monotonic() < deadline:
                for fd, _ in ep.poll(0.1):
                    s = pending.pop(fd)
                    ep.unregister(fd)
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
        if pending:
            raise RuntimeError(f"{len(pending)} connections not established")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def one_reply_each(socks: list[socket.socket], deadline: float) -> int:
    """Send a line on each and wait for every reply; returns how many are missing."""
    by_fd = {s.fileno(): s for s in socks}
    with select.epoll() as ep:
        for fd, s in by_fd.items():
            s.send(LINE)
            ep.register(fd, select.EPOLLIN)
        waiting = set(by_fd)
        while waiting and time.monotonic() < deadline:
            for fd, _ in ep.poll(0.1):
                if by_fd[fd].recv(4096).endswith(b"\n"):
                    waiting.discard(fd)
                    ep.unregister(fd)
    return len(waiting)


def pingpong(socks: list[socket.socket], window: float) -> tuple[int, int, float | None]:
    """(replies, connections without a reply, seconds until the last first reply)."""
    by_fd = {s.fileno(): s for s in socks}
    first: dict[int, float] = {}
    replies = 0
    start = time.monotonic()
    end = start + window
    with select.epoll() as ep:
        for fd, s in by_fd.items():
            s.send(LINE)
            ep.register(fd, select.EPOLLIN)
        while (left := end - time.monotonic()) > 0:
            for fd, _ in ep.poll(min(left, 0.1)):
                s = by_fd[fd]
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                if not data:
                    ep.unregister(fd)
                    continue
                n = data.count(b"\n")
                replies += n
                first.setdefault(fd, time.monotonic() - start)
                s.send(LINE * n)
    unanswered = len(by_fd) - len(first)
    return replies, unanswered, (max(first.values()) if not unanswered else None)


def churn(port: int, clients: int, window: float) -> int:
    live: dict[int, socket.socket] = {}
    sent: set[int] = set()
    done = 0
    with select.epoll() as ep:

        def start() -> None:
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            live[s.fileno()] = s
            ep.register(s.fileno(), select.EPOLLOUT)

        try:
            for _ in range(clients):
                start()
            end = time.monotonic() + window
            while (left := end - time.monotonic()) > 0:
                for fd, _ in ep.poll(min(left, 0.1)):
                    s = live[fd]
                    if fd not in sent:
                        s.send(LINE)
                        sent.add(fd)
                        ep.modify(fd, select.EPOLLIN)
                        continue
                    try:
                        data = s.recv(4096)
                    except OSError:
                        data = b""
                    done += data.endswith(b"\n")
                    ep.unregister(fd)
                    sent.discard(fd)
                    del live[fd]
                    s.close()
                    start()
        finally:
            for s in live.values():
                s.close()
    return done


def accept_queue(port: int) -> str:
    """The listener's Recv-Q: connections waiting for accept()."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout.split()
    return out[1] if len(out) > 1 else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sides", nargs="+", help="rows of servers.py, optionally ROW@TREE")
    parser.add_argument("--conns", type=int, default=2048)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--setup", type=float, default=60.0, help="limit of the setup phase")
    parser.add_argument("--cold", action="store_true", help="no quiet setup: pingpong at once")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every side, in turns")
    parser.add_argument("--no-pin", action="store_true", help="server and client on any core")
    args = parser.parse_args()
    tools = run.build_tools()
    run.raise_fd_limit()
    server_core, client_core = (None, None) if args.no_pin else run.cores()
    if client_core is not None:
        os.sched_setaffinity(0, {client_core})
    order = [side for round_ in range(args.rounds) for side in args.sides[:: 1 - 2 * (round_ % 2)]]
    for side in order:
        with ab.serving(side, tools, server_core) as server:
            t0 = time.monotonic()
            socks = open_all(server.port, args.conns, t0 + args.setup)
            try:
                missing = 0 if args.cold else one_reply_each(socks, t0 + args.setup)
                setup_s = time.monotonic() - t0
                replies, unanswered, last_first = pingpong(socks, args.window)
                queue = accept_queue(server.port)
                churned = churn(server.port, 16, args.window)
            finally:
                for s in socks:
                    s.close()
            setup = "cold" if args.cold else f"setup {setup_s:.1f}s, {missing} missing"
            last = "-" if last_first is None else f"{last_first:.2f}s"
            print(
                f"{side}: {setup}; pingpong c={args.conns}: {replies / args.window:,.0f}/s, "
                f"unanswered {unanswered}, last first reply {last}, accept queue {queue}; "
                f"churn c=16: {churned / args.window:,.0f}/s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
