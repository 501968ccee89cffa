"""The documentation's UDP server, on netserve.

As documented, except: ``import netserve as socketserver``; the port can be set
with the PORT environment variable (PORT=0 lets the OS choose), and the server
says which port it listens on.
"""

import os

import netserve as socketserver


class MyUDPHandler(socketserver.BaseRequestHandler):
    """
    This class works similar to the TCP handler class, except that
    self.request consists of a pair of data and client socket, and since
    there is no connection the client address must be given explicitly
    when sending data back via sendto().
    """

    def handle(self):
        data = self.request[0].strip()
        socket = self.request[1]
        print("{} wrote:".format(self.client_address[0]))
        print(data)
        socket.sendto(data.upper(), self.client_address)


if __name__ == "__main__":
    HOST, PORT = "localhost", int(os.environ.get("PORT", "9999"))
    with socketserver.UDPServer((HOST, PORT), MyUDPHandler) as server:
        print("Listening on port", server.server_address[1], flush=True)
        server.serve_forever()
