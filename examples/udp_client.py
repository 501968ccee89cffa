"""The documentation's UDP client (the port can be set with PORT)."""

import os
import socket
import sys

HOST, PORT = "localhost", int(os.environ.get("PORT", "9999"))
data = " ".join(sys.argv[1:])

# SOCK_DGRAM is the socket type to use for UDP sockets
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

# As you can see, there is no connect() call; UDP has no connections.
# Instead, data is directly sent to the recipient via sendto().
sock.sendto(bytes(data + "\n", "utf-8"), (HOST, PORT))
received = str(sock.recv(1024), "utf-8")
sock.close()

print("Sent:     {}".format(data))
print("Received: {}".format(received))
