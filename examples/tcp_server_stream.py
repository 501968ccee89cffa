"""The documentation's TCP server with StreamRequestHandler, on netserve.

As documented, except: ``import netserve as socketserver``; the port can be set
with the PORT environment variable (PORT=0 lets the OS choose), and the server
says which port it listens on.
"""

import os

import netserve as socketserver


class MyTCPHandler(socketserver.StreamRequestHandler):
    def handle(self):
        # self.rfile is a file-like object created by the handler;
        # we can now use e.g. readline() instead of raw recv() calls
        self.data = self.rfile.readline().strip()
        print("{} wrote:".format(self.client_address[0]))
        print(self.data)
        # Likewise, self.wfile is a file-like object used to write back
        # to the client
        self.wfile.write(self.data.upper())


if __name__ == "__main__":
    HOST, PORT = "localhost", int(os.environ.get("PORT", "9999"))

    with socketserver.TCPServer((HOST, PORT), MyTCPHandler) as server:
        print("Listening on port", server.server_address[1], flush=True)
        server.serve_forever()
