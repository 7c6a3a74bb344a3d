"""The agent's control API (``:9090``): routes only; the agent is passed in, never imported.

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
- ``GET /health`` — liveness, connections, workers and their restarts, the
  agent's clock.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import gevent

from app.client.schedule import share
from app.httpapi import Api, HttpError, Request


class Controlled(Protocol):
    """What the routes need of the agent (so this module does not import it)."""

    hosts: int
    host_index: int
    def set_qps(self, qps: int, at_second: int | None = None) -> dict[str, Any]: ...

    def stats(self, since: int = 0, hist: bool = False) -> dict[str, Any]: ...

    def coverage(self, timeout: float = 5.0) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]: ...


def build_api(agent: Controlled, token: str = "", allow: Any = ()) -> Api:
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
        return {"status": "ok", "time": time.time(), **agent.health()}

    return api
