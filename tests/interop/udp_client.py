# The original Python 3 greet client, as the Rust example reproduces it.
# Usage: python3 udp_client.py [PORT]   (default 9999)
import socket
import sys

port = int(sys.argv[1]) if len(sys.argv) > 1 else 9999
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for data in [b'Michael', b'Tracy', b'Sarah']:
    s.sendto(data, ('127.0.0.1', port))
    print(s.recv(1024).decode('utf-8'))
s.close()
