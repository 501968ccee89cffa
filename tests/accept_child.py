"""Servers that tests/test_accept.py runs in a child process.

A lowered RLIMIT_NOFILE and a logging configuration must not touch pytest's own
process, so these scenarios run here: ``python -m tests.accept_child MODE ...``
from the repository root. The child and the test talk in lines: the child
prints what it has done on stdout, the test writes commands on stdin.

``emfile MODEL``: a server of MODEL (tests/models.py) under a limit of
``EMFILE_LIMIT`` descriptors, logging to stderr. It prints ``PORT <n>`` once a
first client has been served, then fills the descriptor table with /dev/null
(keeping them open) and prints ``FULL``. ``FREE`` closes them (``FREED``);
``STOP`` prints ``STATS <repr of statistics()>`` (``STATS none`` without
statistics()), stops the server and exits 0.

``hub-start``: a GreenTCPServer under a limit of ``HUB_LIMIT`` descriptors that
prints ``PORT <n>``, waits for ``GO`` before calling serve_forever() (so that the
test's clients wait in the backlog when it starts), and on ``STOP`` shuts down
and exits 0. If serve_forever() raises, the traceback goes to stderr and the
process exits 1 at once.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import sys
import threading
import traceback

import netserve
from tests.models import MODELS

# Room for the interpreter, the server and a few connections; filling the rest
# with /dev/null takes a moment at this size.
EMFILE_LIMIT = 256
# Low enough for the test's clients to fill the table (the limit of the report).
HUB_LIMIT = 64
# How long one profile event of the serving thread waits while it crawls.
CRAWL_S = 0.002
# The longest the first handler keeps the hub waiting for serve_forever's loop.
HOLD_HUB_S = 2.0


class EchoAndHold(netserve.StreamRequestHandler):
    """Echo one line, then hold the connection until the client closes it."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())
        self.rfile.read()


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def command() -> str:
    return sys.stdin.readline().strip()


def set_limit(soft: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def fill_descriptor_table() -> list[int]:
    """Open /dev/null until EMFILE; the descriptors are the caller's to close."""
    held: list[int] = []
    while True:
        try:
            held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            if exc.errno != errno.EMFILE:
                raise
            return held


def emfile(model: str) -> int:
    set_limit(EMFILE_LIMIT)
    logging.basicConfig(
        stream=sys.stderr, level=logging.DEBUG, format="%(name)s %(levelname)s %(message)s"
    )
    closed = threading.Event()

    class Server(MODELS[model].tcp):
        def close_request(self, request: object) -> None:
            super().close_request(request)
            closed.set()

    server = Server(("127.0.0.1", 0), EchoAndHold)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        # A first client, so that everything the model starts lazily (threads,
        # the hub, a child) has started before the table fills.
        with socket.create_connection(server.server_address, timeout=10) as first:
            first.sendall(b"first\n")
            # The end of input is what lets the handler finish: closing would
            # not do it under forking, whose child inherits this socket too.
            first.shutdown(socket.SHUT_WR)
            with first.makefile("rb") as reader:
                if reader.readline() != b"first\n":
                    raise RuntimeError("the first client got no echo")
        # Its descriptor must be closed before the table fills: one freed later
        # would let an accept() through and start a second episode.
        if not closed.wait(10):
            raise RuntimeError("the first request was never closed")
        say(f"PORT {server.server_address[1]}")
        held = fill_descriptor_table()
        say("FULL")
        while (line := command()) != "STOP":
            if line == "FREE":
                for fd in held:
                    os.close(fd)
                held = []
                say("FREED")
            else:
                raise RuntimeError(f"unknown command {line!r}")
        statistics = getattr(server, "statistics", None)
        say(f"STATS {statistics()!r}" if statistics is not None else "STATS none")
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    return 0


class HubStart:
    """The hub at start-up, with the scheduling that exposes a late allocation.

    Whatever serve_forever() allocates after the hub has started accepting
    fails when the clients waiting in the backlog fill the descriptor table
    first. That is a race (the serving thread usually wins it), so it is made
    to lose: the serving thread crawls (each profile event waits up to CRAWL_S)
    until the hub has run a first handler, and that handler keeps the hub, and
    so every accepted descriptor, until serve_forever()'s loop has run
    service_actions(). A serve_forever() that allocated everything before the
    hub accepted anything is not affected.
    """

    def __init__(self) -> None:
        self.first_handled = threading.Event()
        self.looping = threading.Event()
        hub = self

        class Reply(netserve.StreamRequestHandler):
            def handle(self) -> None:
                self.wfile.write(b"re: " + self.rfile.readline())
                if not hub.first_handled.is_set():
                    hub.first_handled.set()
                    hub.looping.wait(HOLD_HUB_S)

        class Server(netserve.GreenTCPServer):
            def service_actions(self) -> None:
                super().service_actions()
                hub.looping.set()

        self.server = Server(("127.0.0.1", 0), Reply)

    def crawl(self, *args: object) -> None:
        if not self.first_handled.is_set():
            self.first_handled.wait(CRAWL_S)

    def serve(self) -> None:
        sys.setprofile(self.crawl)
        try:
            self.server.serve_forever(poll_interval=0.05)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)  # at once: the test's clients then see their connections end


def hub_start() -> int:
    set_limit(HUB_LIMIT)
    scenario = HubStart()
    server = scenario.server
    say(f"PORT {server.server_address[1]}")
    if command() != "GO":
        raise RuntimeError("expected GO")
    thread = threading.Thread(target=scenario.serve)
    thread.start()
    if command() != "STOP":
        raise RuntimeError("expected STOP")
    server.shutdown()
    thread.join()
    server.server_close()
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["emfile"] and len(argv) == 2:
        return emfile(argv[1])
    if argv == ["hub-start"]:
        return hub_start()
    raise SystemExit(f"usage: python -m tests.accept_child (emfile MODEL | hub-start), not {argv}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
