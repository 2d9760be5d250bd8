"""The one way tests pick free TCP ports on 127.0.0.1."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1, below 55535 (SeaweedFS puts gRPC at port+10000)."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        socks.append(s)
        if port < 55535 and port not in ports:
            ports.append(port)
    for s in socks:
        s.close()
    return ports


def free_port() -> int:
    """One free TCP port on 127.0.0.1."""
    return free_ports(1)[0]
