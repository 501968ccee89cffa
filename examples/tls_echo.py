"""An echo server over TLS, and a client that checks its certificate.

Any netserve stream server speaks TLS once it has a certificate: here a
throw-away CA and certificate from ``trustme`` (a test dependency; in
production, your certificate files). The handshake runs before the handler,
off the accept path; the handler reads and writes as over plain TCP.
"""

import os
import socket
import ssl
import tempfile
import threading

import trustme

import netserve


class Echo(netserve.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(f"{self.request.version()}: ".encode() + line.upper())


def main():
    ca = trustme.CA()
    with tempfile.TemporaryDirectory() as directory:
        certfile = os.path.join(directory, "server.pem")
        keyfile = os.path.join(directory, "server.key")
        cafile = os.path.join(directory, "ca.pem")
        cert = ca.issue_cert("localhost")
        cert.cert_chain_pems[0].write_to_path(certfile)
        cert.private_key_pem.write_to_path(keyfile)
        ca.cert_pem.write_to_path(cafile)

        class Server(netserve.ThreadPoolTCPServer):
            tls_certfile = certfile
            tls_keyfile = keyfile
            tls_alpn = ("echo/1",)

        with Server(("127.0.0.1", 0), Echo) as server:
            threading.Thread(target=server.serve_forever, daemon=True).start()
            context = ssl.create_default_context(cafile=cafile)
            context.set_alpn_protocols(["echo/1"])
            raw = socket.create_connection(server.server_address)
            with context.wrap_socket(raw, server_hostname="localhost") as client:
                client.sendall(b"hello tls\n")
                print(client.recv(100).decode().strip())
                print("alpn:", client.selected_alpn_protocol())
                client.unwrap().close()  # close_notify both ways
            server.shutdown()
        stats = server.statistics()
        print("handled:", stats.handled, "failed handshakes:", stats.stage_failures)


if __name__ == "__main__":
    main()
