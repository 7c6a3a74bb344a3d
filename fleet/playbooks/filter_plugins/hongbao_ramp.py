"""The verdict of ramp-qps.yml: was the asked rate served, second by second?

A second passes when the server *served* the rate in it, counted by the
second each SHAKE arrived (``per_second_arrival`` of the server's /stats;
results 14 and 15, an envelope or none left: 16 refused and 17 overload do
not serve), and the client agents got that many such answers in it (the
sum of every agent's ``served`` for that second, by the second each answer
arrived), both within the allowed deviation.  The count
by the second stamped in the frames (``per_second``) is exact however late
the server gets to a request, so it is shown as a separate "scheduled" line
and never decides.  Latency per second is the worst agent's p50/p99: an
upper bound of the fleet's (no host has more than 1% of its answers above
its own p99, so the fleet has none above the largest).
"""

from __future__ import annotations

# results that served the ask: app.client.fastpath.SERVED (Ansible loads this file alone)
SERVED_CODES = ("14", "15")


def _by_second(rows: list[dict] | None, key: str) -> dict[int, float]:
    return {int(r["second"]): r.get(key) or 0 for r in rows or []}


def ramp_verdict(server: dict, agents: list[dict], qps: int, first: int, count: int,
                 fraction: float, absolute: float = 1, max_p99_ms: float | None = None) -> dict:
    """Per-second figures of [first, first+count) and whether every one is in tolerance.

    server: the server's /stats; agents: every client agent's /stats (with
    ``per_second`` covering the seconds).  Returns the figures, ``ok`` and,
    when not ok, ``failures`` that say which second fell short and by how much.
    """
    qps, first, count = int(qps), int(first), int(count)
    allowed = max(qps * float(fraction), float(absolute))
    served = {int(r["second"]): sum((r.get("by_result") or {}).get(code, 0)
                                     for code in SERVED_CODES)
              for r in server.get("per_second_arrival") or []}
    scheduled = _by_second(server.get("per_second"), "shakes")
    answered: dict[int, int] = {}
    p50: dict[int, float] = {}
    p99: dict[int, float] = {}
    for agent in agents:
        for row in agent.get("per_second") or []:
            s = int(row["second"])
            answered[s] = answered.get(s, 0) + int(row.get("served") or 0)
            for table, key in ((p50, "latency_p50_ms"), (p99, "latency_p99_ms")):
                if row.get(key) is not None:
                    table[s] = max(table.get(s, 0.0), float(row[key]))
    seconds, failures = [], []
    for s in range(first, first + count):
        row = {"second": s, "served": int(served.get(s, 0)), "answered": answered.get(s, 0),
               "scheduled": int(scheduled.get(s, 0)), "p50_ms": p50.get(s), "p99_ms": p99.get(s)}
        seconds.append(row)
        for what in ("served", "answered"):
            if abs(row[what] - qps) > allowed:
                failures.append(f"second {s}: {what} {row[what]} (target {qps} ±{allowed:g}, "
                                f"off by {row[what] - qps:+d})")
        if max_p99_ms is not None and (row["p99_ms"] or 0) > float(max_p99_ms):
            failures.append(f"second {s}: p99 {row['p99_ms']} ms over {max_p99_ms} ms")
    column = {key: [r[key] for r in seconds]
              for key in ("served", "answered", "scheduled", "p50_ms", "p99_ms")}
    worst = max((v for v in column["p99_ms"] if v is not None), default=None)
    return {"qps": qps, "from": first, "allowed": allowed, "seconds": seconds,
            "ok": not failures, "failures": failures, "p99_max_ms": worst, **column}


class FilterModule:
    """Ansible's entry point for this file's filters."""

    def filters(self) -> dict:
        return {"hongbao_ramp_verdict": ramp_verdict}
