"""Free ports for the tests' own servers (broker nodes, Prometheus, metrics endpoints), taken
below the kernel's range for outgoing connections: a port from that range (what binding to port 0
gives) can be taken by some client's connection between the probe and the server binding it (seen
in CI: "cannot serve metrics on port 57616: Address already in use"). Above 20000, clear of the
ports the e2e pods (19100-19199) and the image tests (19200-19999) use."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

LOWEST = 20000


def port_block(count: int) -> int:
    """The first of `count` consecutive ports free on 127.0.0.1, drawn at random (so that tests in
    parallel workers rarely try the same ones)."""
    lowest_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(50):
        first = LOWEST + secrets.randbelow(lowest_ephemeral - LOWEST - count)
        sockets = []
        try:
            for port in range(first, first + count):
                bound = socket.socket()
                sockets.append(bound)
                bound.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for bound in sockets:
                bound.close()
    raise RuntimeError(f"no {count} consecutive free ports below {lowest_ephemeral}")


def free_port() -> int:
    return port_block(1)
