"""The server's clock as the agent sees it: a tiny cooperative HTTP GET of ``/health``.

The agent stamps frames with wall-clock seconds; its offset to the server's
clock (NTP-style, from the sample with the smallest round trip) is reported
in ``/stats`` and as a gauge, so a drifting host shows before its counts do.
"""

from __future__ import annotations

import json
import time
from typing import Any

from gevent import socket


def get_json(address: tuple[str, int], path: str, timeout: float = 2.0) -> dict[str, Any]:
    """GET ``path`` from a control API (HTTP/1.0, cooperative); raises OSError or ValueError."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {address[0]}\r\n\r\n".encode())
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if b" " in head else b"?"
    if status != b"200":
        raise ValueError(f"GET {path}: HTTP {status.decode(errors='replace')}")
    return json.loads(body)


def clock_offset(address: tuple[str, int], samples: int = 3) -> tuple[float, float]:
    """``(offset, rtt)`` in seconds of the server's clock against ours, NTP-style.

    offset = server_time - (t_send + t_receive) / 2, taken from the sample with
    the smallest round trip (the one least disturbed by queueing).
    """
    best: tuple[float, float] | None = None
    for _ in range(samples):
        t0 = time.time()
        server_time = float(get_json(address, "/health")["time"])
        t1 = time.time()
        sample = (server_time - (t0 + t1) / 2, t1 - t0)
        if best is None or sample[1] < best[1]:
            best = sample
    assert best is not None
    return best
