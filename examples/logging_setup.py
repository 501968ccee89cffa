"""Seeing what netserve logs, and sending handler errors to logging too.

netserve logs through ``logging.getLogger("netserve.<part>")`` (accept, pool,
hub, stages) and gives the ``netserve`` logger only a NullHandler: nothing is
printed until the application configures logging. Exceptions raised by
handlers go to ``handle_error()``, which writes to stderr as the stdlib's
does; override it to log them instead.
"""

import logging
import logging.config
import socket
import threading

import netserve

LOGGING = {
    "version": 1,
    # netserve's loggers exist from its import on; the default (True) would
    # silence them unless "netserve" is named below.
    "disable_existing_loggers": False,
    "formatters": {"short": {"format": "%(name)s %(levelname)s %(message)s"}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": "short",
        },
    },
    "loggers": {
        # Accept errors, connections turned away, a handler's SystemExit.
        "netserve": {"level": "WARNING", "handlers": ["stdout"]},
        # A line for each connection closed in a stage (a bad header, a failed
        # handshake, a time-out): DEBUG, off here.
        "netserve.stages": {"level": "WARNING"},
        "myapp": {"level": "INFO", "handlers": ["stdout"]},
    },
}

log = logging.getLogger("myapp")


class Handler(netserve.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline()
        if line == b"fail\n":
            raise ValueError("asked to fail")
        if line == b"quit\n":
            raise SystemExit  # ends this request only: the worker carries on
        self.wfile.write(line.upper())


class Server(netserve.ThreadPoolTCPServer):
    def handle_error(self, request, client_address):
        log.exception("request from %s failed", client_address[0])


def ask(address, line):
    with socket.create_connection(address) as sock:
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(1024)


if __name__ == "__main__":
    logging.config.dictConfig(LOGGING)
    with Server(("localhost", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        print("Received:", ask(server.server_address, b"hello\n"))
        ask(server.server_address, b"fail\n")
        ask(server.server_address, b"quit\n")
        server.shutdown()
        thread.join()
    stats = server.statistics()
    print(f"Handled: {stats.handled}, errors: {stats.errors}")
