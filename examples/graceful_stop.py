"""A server that stops in bounded time: close, wait with a deadline, then abort.

Run it, connect with ``nc localhost 9999``, type a line, leave the connection
open, and press Ctrl-C (or send SIGTERM). The server stops accepting at once,
gives the requests in progress GRACE seconds (5) to finish, ends the ones
left, and prints its statistics. The first argument chooses the model:
threading (the default), forking, pool or hub. PORT=0 lets the OS choose the
port; the server says which one it listens on.
"""

import os
import signal
import sys

import netserve

MODELS = {
    "threading": netserve.ThreadingTCPServer,
    "forking": netserve.ForkingTCPServer,
    "pool": netserve.ThreadPoolTCPServer,
    "hub": netserve.GreenTCPServer,
}


class UpperEcho(netserve.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line.upper())


def stop(server, grace, force_wait=5.0):
    """Stop accepting, give the requests in progress ``grace`` seconds, then
    end the ones left. Returns whether every connection is gone."""
    server.close()  # the listener and parked connections close; never waits
    print(f"Stopped accepting; waiting up to {grace} s", flush=True)
    if not server.wait_closed(grace):
        print(f"Aborting {server.statistics().active} connection(s) still open", flush=True)
        server.abort_connections()
        if not server.wait_closed(force_wait):
            # A handler is blocked on something other than its connection (a
            # lock, a sleep, another socket): server_close() would wait for it.
            return False
    server.server_close()  # nothing is left to wait for: returns at once
    return True


if __name__ == "__main__":
    model = sys.argv[1] if len(sys.argv) > 1 else "threading"
    grace = float(os.environ.get("GRACE", "5"))
    port = int(os.environ.get("PORT", "9999"))
    server = MODELS[model](("localhost", port), UpperEcho)
    serving_pid = os.getpid()

    def request_stop(signum, frame):
        if os.getpid() != serving_pid:
            # A forked child inherits this handler, and abort_connections()
            # sends it SIGTERM: end the child's request.
            raise SystemExit(1)
        server.shutdown()  # from a signal handler too: serve_forever() returns

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print("Listening on port", server.server_address[1], flush=True)
    server.serve_forever()
    if not stop(server, grace):
        print("Some handlers did not end; leaving without them", flush=True)
        os._exit(1)
    print(server.statistics())
