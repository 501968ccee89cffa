"""The same StreamRequestHandler, served by a bounded thread pool.

At most max_workers threads, reused; when all are busy and the small hand-off
queue is full, the server stops accepting and new connections wait in the
kernel's backlog. A connection takes a worker only once it has sent data.
"""

import socket
import threading

import netserve


class UpperEcho(netserve.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line.upper())


class PoolServer(netserve.ThreadPoolTCPServer):
    max_workers = 4
    queue_size = 2


if __name__ == "__main__":
    with PoolServer(("localhost", 0), UpperEcho) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        silent = [socket.create_connection(server.server_address) for _ in range(10)]
        with socket.create_connection(server.server_address) as sock:
            sock.sendall(b"hello pool\n")
            print("Received:", sock.recv(1024))
        stats = server.statistics()
        print("Parked silent connections:", stats.parked)
        for sock in silent:
            sock.close()
        server.shutdown()
        thread.join()
    # Leaving the with block ran server_close(), which waited for the workers,
    # so every request that reached one is counted.
    print("Handled:", server.statistics().handled)
