"""The same StreamRequestHandler, served by netserve's greenlet hub.

Needs the extra: pip install 'netserve[green]'. Every connection's handler runs
in a greenlet; a handler waiting on its socket (or in netserve.green_sleep)
lets the others run. Silent connections cost a socket, not a handler.
"""

import socket
import threading

import netserve


class UpperEcho(netserve.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            if line.startswith(b"nap"):
                netserve.green_sleep(0.1)  # cooperative: other clients carry on
            self.wfile.write(line.upper())


def ask(address, line):
    with socket.create_connection(address) as sock:
        sock.sendall(line)
        return sock.recv(1024)


if __name__ == "__main__":
    with netserve.GreenTCPServer(("localhost", 0), UpperEcho) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        napping = threading.Thread(target=ask, args=(server.server_address, b"nap\n"))
        napping.start()
        print("Received:", ask(server.server_address, b"hello hub\n"))
        napping.join()
        server.shutdown()
        thread.join()
