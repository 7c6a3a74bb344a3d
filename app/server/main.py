"""The hongbao server: a supervisor, its SETs, and the HTTP control API.

Run it::

    python -m app.server --port 1025 --control 127.0.0.1:8989 --sets auto
    # or, installed: hongbao-server --sets 8 --journal-dir /var/lib/hongbao

Once every SET is ready it prints one line on stdout,
``hongbao-server listening port=<p> control=<host:port> sets=<S>``, which
scripts and tests read to learn the ports chosen for ``--port 0``.
"""

from __future__ import annotations

import logging
import socket
import sys
import time

import gevent

from app import settings
from app.httpapi import Api, HttpError, Request, now, serve
from app.metrics import system as sysmetrics
from app.metrics.statsd import Metrics
from app.server.ledger import sum_ledgers
from app.server.service import campaign_problem
from app.server.set_stats import SECONDS_KEPT
from app.server.supervisor import Supervisor
from app.shares import campaign_shares

log = logging.getLogger("hongbao.server")

RESULT_CODES = ("14", "15", "16", "17")
READY_TIMEOUT = 60.0  # plus 2 s per SET: 52 fresh interpreters take ~30 s on 2 busy cores


def merge_seconds(tables: list[dict[str, list[int]]], last: int, until: int) -> list[dict]:
    """Sum per-SET per-second rows; keep the ``last`` complete seconds before ``until``."""
    total: dict[int, list[int]] = {}
    for table in tables:
        for second, row in table.items():
            s = int(second)
            if s >= until:
                continue
            acc = total.setdefault(s, [0, 0, 0, 0])
            for i, n in enumerate(row):
                acc[i] += n
    seconds = sorted(total)[-last:] if last else []
    return [{"second": s, "shakes": sum(total[s]),
             "by_result": dict(zip(RESULT_CODES, total[s], strict=True))} for s in seconds]


def merge_health(tables: list[dict[str, list[float]]]) -> list[dict]:
    """Worst loop lag, GC pause and GC CPU time of any SET, per second."""
    worst: dict[int, list[float]] = {}
    for table in tables:
        for second, values in table.items():
            acc = worst.setdefault(int(second), [0.0, 0.0, 0.0])
            for i, value in enumerate(values):
                acc[i] = max(acc[i], value)
    return [{"second": s, "loop_lag_ms": v[0], "gc_pause_ms": v[1], "gc_cpu_ms": v[2]}
            for s, v in sorted(worst.items())]


def sum_counters(parts: list[dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counters in parts:
        for key, n in counters.items():
            total[key] = total.get(key, 0) + n
    return total


def check_group_range(qps: int, total: int, low: int, high: int, sets: int) -> None:
    """400 unless a group campaign can run: min <= max, and 3 users of every SET in range.

    Every SET picks each group's three recipients among its own users
    (``userid % S``) in ``[min, max]``; a range with fewer than 3 of some
    SET's users would leave that SET's share of the sum never generated.
    """
    if low > high:
        raise HttpError(400, f"min ({low}) must not exceed max ({high})")
    users = high - low + 1
    if qps and total and users < 3 * sets:
        raise HttpError(400, f"min..max ({low}..{high}) holds {users} users; every SET picks "
                             f"3 recipients among its own users in it, so {sets} SETs need "
                             f"at least {3 * sets}")


def build_api(sup: Supervisor) -> Api:
    config = sup.config
    api = Api(token=config.token, allow=config.allow)

    @api.route("/health")
    def health(request: Request) -> dict:
        failed = {h.set_id: h.failed for h in sup.handles if h.failed}
        alive = sup.alive()
        status = "stopping" if sup.stopping.is_set() else (
            "ok" if alive == sup.sets else "degraded")
        return {"status": status, "time": now(), "sets": sup.sets, "sets_alive": alive,
                "failed": failed, "port": sup.port, "uptime": round(time.time() - sup.started, 3),
                "restarts": sup.restarts()}

    @api.route("/stats")
    def stats(request: Request) -> dict:
        last = request.int_param("seconds", default=60, maximum=SECONDS_KEPT)
        audit = request.int_param("audit", default=0, maximum=1)
        until = int(time.time())
        since = until - last
        answers = sup.ask_all(lambda k: {"op": "stats", "audit": bool(audit), "since": since})
        up = [a for a in answers if a is not None]
        health = merge_health([a["health"] for a in up])
        per_set = [
            {"set": h.set_id, "up": a is not None, "restarts": h.restarts,
             "failed": h.failed, **({k: a[k] for k in ("pid", "connections", "sockets",
                                                        "ledger", "counters", "campaigns",
                                                        "journal", "reactor",
                                                        "budget_per_second")} if a else {})}
            for h, a in zip(sup.handles, answers, strict=True)
        ]
        counters = sum_counters([a["counters"] for a in up])
        ledger = sum_ledgers([a["ledger"] for a in up])
        if len(up) < sup.sets:
            ledger["complete"] = False  # a SET did not answer: the sum misses its part
        return {
            "time": now(),
            "sets": sup.sets,
            "sets_up": len(up),
            "connections": sum(a["connections"] for a in up),
            "per_second": merge_seconds([a["by_sent"] for a in up], last, until),
            "per_second_arrival": merge_seconds([a["by_arrival"] for a in up], last, until),
            "ledger": ledger,
            "group": {
                "created": ledger.get("groups_created", 0),
                "pushed": counters.get("group.pushed", 0),
                "claimed": ledger.get("claims_granted", 0),
                "expired": counters.get("group.expired", 0),
                "no_recipients": counters.get("group.no_recipients", 0),
            },
            "counters": counters,
            "health_per_second": health,
            "loop_lag_max_ms": max((h["loop_lag_ms"] for h in health), default=0.0),
            "gc_pause_max_ms": max((h["gc_pause_ms"] for h in health), default=0.0),
            "gc_cpu_max_ms": max((h["gc_cpu_ms"] for h in health), default=0.0),
            "per_set": per_set,
        }

    def broadcast(op: str, rate: int, total: int, **fields: int) -> dict:
        """Send every SET its share of a campaign; the shares add up to exactly rate and sum.

        Checked first against the settings by the SETs' own rule, so a campaign
        they would refuse is a 400 here and reaches no journal.
        """
        kind = {"yao": b"Y", "fa": b"F"}[op]
        why = campaign_problem(config, kind, (rate, total, *fields.values()))
        if why:
            raise HttpError(400, f"campaign refused: {why}")
        shares = campaign_shares(rate, total, sup.sets)
        answers = sup.ask_all(lambda k: {"op": op, "rate": shares[k][0], "sum": shares[k][1],
                                         **fields})
        refused = [a["error"] for a in answers if a and "error" in a]
        if refused:
            raise HttpError(400, f"campaign {refused[0]}")
        missing = [k for k, a in enumerate(answers) if not (a and a.get("ok"))]
        if missing:
            raise HttpError(503, f"SETs {missing} did not take the change (down?)")
        return {"ok": True, "rate": rate, "sum": total, **fields, "sets": sup.sets}

    @api.route("/yaohongbao", mutating=True)
    def yaohongbao(request: Request) -> dict:
        qps = request.int_param("qps", maximum=10_000_000)
        total = request.int_param("sum", maximum=2**40)
        return broadcast("yao", qps, total)

    @api.route("/fahongbao", mutating=True)
    def fahongbao(request: Request) -> dict:
        qps = request.int_param("qps", maximum=1_000_000)
        total = request.int_param("sum", maximum=2**40)
        low = request.int_param("min")  # 0 too: the prototype's users start at 0
        high = request.int_param("max")
        check_group_range(qps, total, low, high, sup.sets)
        return broadcast("fa", qps, total, min=low, max=high)

    return api


def main(argv: list[str] | None = None) -> int:
    config = settings.parse("server", argv, description=__doc__.splitlines()[0])
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s supervisor %(levelname)s %(message)s")
    try:
        sup = Supervisor(config)
    except settings.SettingError as exc:
        sys.stderr.write(f"hongbao-server: {exc}\n")
        return 2
    try:
        sup.start()
    except OSError as exc:
        log.error("cannot bind %s:%s: %s", config.host, config.port, exc)
        return 2
    # The server host's packets per second per interface (the classic used ethtool).
    net = Metrics(f"hongbao.net.{sysmetrics.sanitize(socket.gethostname())}",
                  config.statsd or None)
    if net.enabled:
        sysmetrics.start(net, gc=False, loop=False, net=True)
        net.start()
    try:
        http = serve(build_api(sup), config.control)
    except OSError as exc:
        log.error("cannot bind control API %s:%s: %s", *config.control, exc)
        sup.stop()
        return 2
    ready_timeout = READY_TIMEOUT + 2.0 * sup.sets
    if not sup.wait_ready(ready_timeout):
        log.error("not every SET became ready within %.0fs", ready_timeout)
    host, port = http.address[:2]
    print(f"hongbao-server listening port={sup.port} control={host}:{port} sets={sup.sets}",
          flush=True)
    sup.stopping.wait()
    http.stop(timeout=1)
    while not sup.stopped:
        gevent.sleep(0.05)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
