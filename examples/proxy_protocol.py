"""A server behind a load balancer that speaks the PROXY protocol.

The balancer (HAProxy's send-proxy, an AWS NLB, Envoy...) opens each connection
with a header naming the real client. netserve reads it before the handler
runs: self.client_address is the real client, and netserve.proxy_header()
gives the rest. Here the script plays the balancer itself, from 127.0.0.1.
"""

import socket
import threading

import netserve


class Hello(netserve.StreamRequestHandler):
    def handle(self):
        header = netserve.proxy_header(self.request)
        if header.command.name == "LOCAL":
            return  # the balancer's health check: nothing follows
        name = self.rfile.readline().strip().decode()
        self.wfile.write(f"hello {name}, from {self.client_address[0]}\n".encode())


class Server(netserve.ThreadingTCPServer):
    proxy_protocol = "any"  # v1 or v2, as the balancer sends
    proxy_trusted = ("127.0.0.1", "10.0.0.0/8")  # the balancers; anyone else is refused


def ask(address, data):
    with socket.create_connection(address) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return sock.makefile("rb").read().decode()


if __name__ == "__main__":
    with Server(("127.0.0.1", 0), Hello) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        # Version 1: one text line, then the client's own bytes.
        v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 443\r\n"
        print(ask(server.server_address, v1 + b"ada\n"), end="")
        # Version 2's LOCAL, as a health check sends it.
        print(repr(ask(server.server_address, b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")))
        server.shutdown()
        thread.join()
    stats = server.statistics()
    print("handled:", stats.handled, "failed headers:", stats.stage_failures)
