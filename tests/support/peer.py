"""A packet peer for tests: ``serve PROTO PORT…`` answers every TCP connection or UDP
datagram with the source address it saw, on IPv4 and (where the namespace has it) IPv6;
``serve-port`` answers ``address:port`` (the source port it saw);
``ask PROTO HOST PORT TIMEOUT [SOURCE]`` prints that answer (exit 1 if nothing answered),
HOST and SOURCE of either family. A server stops by itself after KVMUFW_PEER_LIFETIME
seconds (default 1200): long enough for a whole lab module, bounded all the same."""

import os
import selectors
import socket
import sys
import time

LIFETIME = float(os.environ.get("KVMUFW_PEER_LIFETIME", "1200"))


def serve(proto: str, ports: list[int], with_port: bool = False) -> None:
    sel = selectors.DefaultSelector()
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    for port in ports:
        for sock in listeners(kind, port):
            if proto == "tcp":
                sock.listen(16)
            sel.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    deadline = time.monotonic() + LIFETIME

    def seen(addr: tuple) -> bytes:
        return (f"{addr[0]}:{addr[1]}\n" if with_port else f"{addr[0]}\n").encode()

    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            sock = key.fileobj
            if proto == "tcp":
                conn, addr = sock.accept()
                with conn:
                    conn.sendall(seen(addr))
            else:
                _data, addr = sock.recvfrom(2048)
                sock.sendto(seen(addr), addr)


def listeners(kind: int, port: int) -> list[socket.socket]:
    """One IPv4 socket, and a v6-only one beside it so IPv4 peers still read as a.b.c.d."""
    v4 = socket.socket(socket.AF_INET, kind)
    v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    v4.bind(("0.0.0.0", port))
    v6 = socket.socket(socket.AF_INET6, kind)
    try:
        v6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6.bind(("::", port))
    except OSError:  # IPv6 disabled in this namespace
        v6.close()
        return [v4]
    return [v4, v6]


def ask(proto: str, host: str, port: int, timeout: float, source: str | None = None) -> int:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        sock.settimeout(timeout)
        try:
            if source:
                sock.bind((source, 0))
            if proto == "tcp":
                sock.connect((host, port))
                data = sock.recv(256)
            else:
                sock.sendto(b"hello", (host, port))
                data, _ = sock.recvfrom(256)
        except OSError:
            return 1
    print(data.decode().strip())
    return 0


if __name__ == "__main__":
    if sys.argv[1] in ("serve", "serve-port"):
        serve(sys.argv[2], [int(p) for p in sys.argv[3:]], sys.argv[1] == "serve-port")
    else:
        sys.exit(ask(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]),
                     *sys.argv[6:7]))
