"""The agent's control API (``:9090``) and the tiny HTTP GET it uses to read the server's clock.

Routes (JSON; ``/qps`` changes state, so it needs the token or an allowed
address):

- ``GET /qps?qps=N`` — this host sends N SHAKEs a second.
  ``GET /qps?total=T`` — the fleet sends T; this host takes its share
  ``T//H + (1 if I < T%H else 0)`` (H = ``--hosts``, I = ``--host-index``;
  ``&hosts=`` and ``&index=`` override them). ``&at=UNIX_SECOND`` applies
  the change from that second on (every host the same second); without it
  the change applies from the tick after next (within ~20 ms).
- ``GET /stats?since=UNIX_SECOND[&hist=1]`` — connections, sent/answered per
  second (the last 60 s without ``since``), results by code, latency
  percentiles (and per-second histograms with ``hist=1``), reconnects, clock
  offset, CPU seconds of the agent's processes.
- ``GET /coverage`` — how evenly users were asked: users never asked, the
  fewest and most asks per user, the oldest last-asked second (O(users):
  for checks, not for polling under load).
- ``GET /health`` — liveness and the agent's clock.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import gevent
from gevent import socket

from app.client.schedule import share
from app.httpapi import Api, HttpError, Request

if TYPE_CHECKING:
    from app.client.agent import Agent


def build_api(agent: Agent, token: str = "", allow: Any = ()) -> Api:
    """The agent's routes over the shared ``httpapi.Api``."""
    api = Api(token=token, allow=allow)

    @api.route("/qps", mutating=True)
    def qps(request: Request) -> dict[str, Any]:
        if "total" in request.query:
            total = request.int_param("total")
            hosts = request.int_param("hosts", agent.hosts, minimum=1)
            index = request.int_param("index", agent.host_index, maximum=hosts - 1)
            value = share(total, hosts, index)
        elif "qps" in request.query:
            value = request.int_param("qps")
        else:
            raise HttpError(400, "give qps=N (this host) or total=T (the fleet)")
        at = request.query.get("at")
        try:
            at_second = int(at) if at else None
        except ValueError:
            raise HttpError(400, f"parameter 'at' must be a unix second, got {at!r}") from None
        return agent.set_qps(value, at_second)

    @api.route("/stats")
    def stats(request: Request) -> dict[str, Any]:
        since = request.int_param("since", 0, maximum=2**40)
        return agent.stats(since, hist=bool(request.int_param("hist", 0, maximum=1)))

    @api.route("/coverage")
    def coverage(request: Request) -> dict[str, Any]:
        try:
            return agent.coverage()
        except gevent.Timeout:  # a BaseException: it must be named to be caught
            raise HttpError(503, "a worker did not answer within 5 s") from None

    @api.route("/health")
    def health(request: Request) -> dict[str, Any]:
        return {"status": "ok", "time": time.time(), "connections": agent.connections,
                "target_connections": agent.n, "processes": len(agent.children)}

    return api


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
