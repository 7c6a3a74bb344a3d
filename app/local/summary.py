"""What a run saw: per-second records, the per-phase verdict and the summary table.

Kept apart from ``app.local.smoke`` (which starts and drives processes) so this part
is pure data in, data out, and tested without running anything. The scale bench
judges its phases with the same functions.

How a rate is judged: by what was *served* in each wall-clock second -- the
SHAKEs the server answered with 14 or 15 in the second they arrived, and the
answers with 14 or 15 the clients received in that second. A server that falls
behind shows here as a short second followed by a long one, however exact the
clients' sending was. A phase's steady seconds are its full seconds minus the
first (the change is stamped on the same second on every host, but the first
second may carry start-up effects). A loaded phase passes when >= 95% of its
steady seconds are within ±2% of the target at both ends and its p99 latency is
under 100 ms.

The count by the second stamped in each frame (the second the client *scheduled*
the request) is a separate check: every request the clients sent in the phase
was counted by the server, whenever it got to it.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app import hotpath
from app.client.fastpath import SERVED
from app.client.histogram import Histogram

log = logging.getLogger("hongbao.smoke")

TOLERANCE = 0.02  # ±2% of the target per second
REQUIRED = 0.95  # share of steady seconds that must be within the tolerance
P99_LIMIT_MS = 100.0  # a phase's p99 latency must be under this
# an envelope, or none left (16 refused and 17 overload are not): as the clients count them
SERVED_CODES = tuple(str(code) for code in sorted(SERVED))
REPORT_TIMEOUT = 300.0  # seconds monitor.report may take to draw a run
LAG_TARGET_MS = 10.0  # a SET's loop lag should stay under this (each second's worst tick)


@dataclass
class Phase:
    name: str
    target: int  # fleet-wide SHAKEs per second
    start: int  # first unix second
    end: int  # first second after it
    cpu_start: float | None = None  # client CPU seconds, for µs per request
    cpu_start_time: float = 0.0
    cpu_end: float | None = None
    cpu_end_time: float = 0.0


def _at(polled: dict[int, dict[str, Any]], second: int) -> dict[str, Any]:
    """The last server snapshot taken at or before ``second`` (else the first)."""
    earlier = [s for s in polled if s <= second]
    key = max(earlier) if earlier else min(polled, default=None)
    return polled.get(key, {}) if key is not None else {}


def served(by_result: dict[str, int]) -> int:
    """Answers that served the request: 14 (an envelope) and 15 (none left)."""
    return sum(by_result.get(code, 0) for code in SERVED_CODES)


def net_rates(polled: dict[int, dict[str, Any]], second: int) -> dict[str, dict[str, float]]:
    """{host: packets/bytes in/out per second} around ``second`` from the host counters.

    A snapshot of second t is taken a fraction into t, so the counters' change
    from the last snapshot at or before t to the next one after it is mostly
    second t's traffic; a second whose snapshot was missed (a busy machine)
    gets the rate over the longer interval.
    """
    before = [s for s in polled if s <= second and "net" in polled[s]]
    after = [s for s in polled if s > second and "net" in polled[s]]
    if not before or not after:
        return {}
    now, later = polled[max(before)], polled[min(after)]
    elapsed = later.get("time", 0.0) - now.get("time", 0.0)
    if elapsed <= 0:
        return {}
    rates = {}
    for host, counters in later["net"].items():
        earlier = now["net"].get(host)
        if earlier is not None:
            rates[host] = {k: round(max(v - earlier.get(k, v), 0) / elapsed, 1)
                           for k, v in counters.items()}
    return rates


def build_seconds(server: dict[str, Any], clients: list[dict[str, Any]],
                  polled: dict[int, dict[str, Any]], start: int, end: int) -> list[dict[str, Any]]:
    """One record per second of the run; envelope, amount and CPU fields are cumulative."""
    scheduled = {r["second"]: r["shakes"] for r in server.get("per_second", [])}
    by_arrival = {r["second"]: r for r in server.get("per_second_arrival", [])}
    health = {h["second"]: h for h in server.get("health_per_second", [])}
    hosts = [{r["second"]: r for r in c["per_second"]} for c in clients]
    records = []
    for t in range(start, end):
        rows = [h[t] for h in hosts if t in h]
        hist = Histogram()
        for row in rows:
            hist.merge(row.get("hist", {}))
        snap = _at(polled, t)
        ledger = snap.get("ledger", {})
        arrived = by_arrival.get(t, {})
        by_result = arrived.get("by_result", {})
        records.append({
            "t": t,
            "target_qps": sum(r["target"] for r in rows),
            # served in this second, by arrival at the server / answer at the clients
            "server_served": served(by_result),
            "client_served": sum(r.get("served", 0) for r in rows),
            "server_arrived": arrived.get("shakes", 0),
            "server_by_result": by_result,
            "client_answered": sum(r["answered"] for r in rows),
            # scheduled in this second: sent by the clients, counted by the frames' stamp
            "client_sent": sum(r["sent"] for r in rows),
            # ... of which sent only after this second had ended (a late client pacer)
            "client_sent_late": sum(r.get("sent_late", 0) for r in rows),
            "server_scheduled": scheduled.get(t, 0),
            "client_skipped": sum(r.get("skipped", 0) for r in rows),
            "connections": snap.get("connections", sum(r["connections"] for r in rows)),
            "client_connections": sum(r["connections"] for r in rows),
            "loop_lag_ms": health.get(t, {}).get("loop_lag_ms"),
            # the latest client pacer that second: requests sent late arrive late
            "client_lag_ms": max((r.get("lag_ms", 0.0) for r in rows), default=None),
            # pacers that fell STALL_S behind a tick, how late in all, their own CPU meanwhile
            "client_stalls": sum(r.get("stalls", 0) for r in rows),
            "client_stall_ms": round(sum(r.get("stall_ms", 0.0) for r in rows), 3),
            "client_stall_cpu_ms": round(sum(r.get("stall_cpu_ms", 0.0) for r in rows), 3),
            "gc_pause_ms": health.get(t, {}).get("gc_pause_ms"),
            "gc_cpu_ms": health.get(t, {}).get("gc_cpu_ms"),  # the collector's own CPU
            "net": net_rates(polled, t),
            "server_cpu_seconds": snap.get("server_cpu_seconds"),
            "client_cpu_seconds": snap.get("client_cpu_seconds"),
            "server_rss_bytes": snap.get("server_rss_bytes"),
            "client_rss_bytes": snap.get("client_rss_bytes"),
            "envelopes_generated": ledger.get("generated", {}).get("count", 0),
            "envelopes_granted": ledger.get("granted", {}).get("count", 0),
            "group_claimed": snap.get("group", {}).get("claimed", 0),
            "amount_generated": ledger.get("generated", {}).get("amount", 0),
            "amount_granted": ledger.get("granted", {}).get("amount", 0),
            "latency_p50_ms": hist.percentile(50),
            "latency_p99_ms": hist.percentile(99),
            "_hist": hist.to_json(),
        })
    return records


def _within(value: int, target: int) -> bool:
    return abs(value - target) <= TOLERANCE * target


def _share(rows: list[dict[str, Any]], key: str) -> float:
    """Share of ``rows`` whose ``key`` is within ±2% of that second's target."""
    return sum(_within(r.get(key, 0), r["target_qps"]) for r in rows) / len(rows)


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return round(sum(r.get(key, 0) for r in rows) / len(rows), 1) if rows else 0.0


def _per_request(rows: list[dict[str, Any]], key: str) -> float | None:
    """CPU µs per served request over ``rows`` from a cumulative CPU-seconds field."""
    if len(rows) < 2 or rows[0].get(key) is None or rows[-1].get(key) is None:
        return None
    # the snapshot of record t is taken early in t: the change to the last one
    # covers the seconds from the first up to the one before the last
    answered = sum(r.get("client_served", 0) for r in rows[:-1])
    cpu = rows[-1][key] - rows[0][key]
    return round(cpu / answered * 1e6, 1) if answered else None


def _per_connection(rows: list[dict[str, Any]], key: str) -> int | None:
    """Resident bytes per connection at the end of ``rows`` (whole processes, base included)."""
    last = rows[-1] if rows else {}
    n = last.get("connections") or 0
    return round(last[key] / n) if last.get(key) is not None and n else None


def phase_summary(phase: Phase, seconds: list[dict[str, Any]]) -> dict[str, Any]:
    """One phase's figures and its verdict (``passed`` and the ``reasons`` it failed)."""
    rows = [r for r in seconds if phase.start <= r["t"] < phase.end]
    steady = [r for r in rows if r["t"] > phase.start]
    hist = Histogram()
    for r in steady:
        hist.merge(r["_hist"])
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    out: dict[str, Any] = {
        "phase": phase.name, "target": phase.target, "seconds": len(rows),
        "steady_seconds": len(steady),
        "server_qps": _mean(steady, "server_served"), "client_qps": _mean(steady, "client_served"),
        "server_within": None, "client_within": None,
        "scheduled_qps": _mean(steady, "client_sent"), "scheduled_within": None,
        "scheduled_sent": sum(r.get("client_sent", 0) for r in rows),
        "scheduled_counted": sum(r.get("server_scheduled", 0) for r in rows),
        "sent_late": sum(r.get("client_sent_late", 0) for r in steady),
        "client_stalls": sum(r.get("client_stalls", 0) for r in steady),
        "client_stall_ms": round(sum(r.get("client_stall_ms", 0.0) for r in steady), 3),
        "client_stall_cpu_ms": round(sum(r.get("client_stall_cpu_ms", 0.0) for r in steady), 3),
        "latency_p50_ms": hist.percentile(50), "latency_p99_ms": hist.percentile(99),
        "generated": last.get("envelopes_generated", 0) - first.get("envelopes_generated", 0),
        "granted": last.get("envelopes_granted", 0) - first.get("envelopes_granted", 0),
        "claimed": last.get("group_claimed", 0) - first.get("group_claimed", 0),
        "cpu_us_per_request": None, "cpu_percent": None,
        "server_cpu_us_per_request": _per_request(steady, "server_cpu_seconds"),
        "server_bytes_per_connection": _per_connection(rows, "server_rss_bytes"),
        "client_bytes_per_connection": _per_connection(rows, "client_rss_bytes"),
        "loop_lag_max_ms": max((r["loop_lag_ms"] for r in rows
                                if r.get("loop_lag_ms") is not None), default=None),
        # a request its client sent late also arrives late: tell the two apart
        "client_lag_max_ms": max((r["client_lag_ms"] for r in rows
                                  if r.get("client_lag_ms") is not None), default=None),
        "gc_pause_max_ms": max((r["gc_pause_ms"] for r in rows
                                if r.get("gc_pause_ms") is not None), default=None),
        "passed": True, "reasons": [],
    }
    if phase.target and steady:
        out["server_within"] = _share(steady, "server_served")
        out["client_within"] = _share(steady, "client_served")
        out["scheduled_within"] = _share(steady, "server_scheduled")
    if phase.cpu_start is not None and phase.cpu_end is not None:
        window = [r for r in seconds
                  if phase.cpu_start_time <= r["t"] + 1 and r["t"] < int(phase.cpu_end_time)]
        sent = sum(r["client_sent"] for r in window)
        cpu = phase.cpu_end - phase.cpu_start
        elapsed = phase.cpu_end_time - phase.cpu_start_time
        out["cpu_percent"] = round(100 * cpu / elapsed, 1) if elapsed > 0 else None
        out["cpu_us_per_request"] = round(cpu / sent * 1e6, 1) if sent else None
    out["reasons"] = phase_reasons(out)
    out["passed"] = not out["reasons"]
    return out


def phase_reasons(row: dict[str, Any]) -> list[str]:
    """Why a phase failed, one sentence a shortfall, with its size; [] when it passed."""
    if not row["target"]:
        return []
    name, target = row["phase"], row["target"]
    if not row["steady_seconds"]:
        return [f"{name}: no steady seconds recorded"]
    reasons = []
    late = row.get("sent_late", 0)
    # requests the clients sent after their second: no server serves them within it
    blame = (f"; the clients sent {late:,} of them only after their second had ended"
             if late else "")
    for key, who in (("server_within", "the server served"),
                     ("client_within", "the clients got answered")):
        share = row[key]
        if share < REQUIRED:
            qps = row["server_qps" if key == "server_within" else "client_qps"]
            steady = row["steady_seconds"]  # counted, not a rounded share: 37 of 39 fails
            reasons.append(f"{name}: {who} {target:,}/s ±{TOLERANCE:.0%} in "
                           f"{round(share * steady)} of {steady} steady seconds ({share:.1%}; "
                           f"needs {REQUIRED:.0%}; mean {qps:,.0f}/s, {qps / target - 1:+.1%}"
                           f"{blame})")
    p99 = row["latency_p99_ms"]
    if p99 is None or p99 >= P99_LIMIT_MS:
        shown = "none" if p99 is None else f"{p99:,.1f} ms"
        reasons.append(f"{name}: p99 latency {shown} (needs < {P99_LIMIT_MS:.0f} ms)")
    if row["scheduled_counted"] != row["scheduled_sent"]:
        reasons.append(f"{name}: scheduled check: the server counted "
                       f"{row['scheduled_counted']:,} of the {row['scheduled_sent']:,} "
                       f"requests sent in the phase")
    return reasons


def verdict(rows: list[dict[str, Any]], ledger: dict[str, Any] | None) -> dict[str, Any]:
    """The run's verdict: every loaded phase passed and (when given) the ledger balances."""
    reasons = [reason for r in rows for reason in r.get("reasons", [])]
    if ledger is not None and not ledger.get("balanced"):
        reasons.append("ledger: generated != granted + waiting + expired (or a SET's part "
                       "is missing)")
    return {"passed": not reasons, "reasons": reasons}


def ledger_check(ledger: dict[str, Any]) -> dict[str, Any]:
    """generated = granted + waiting + expired, in count and amount, and the server agrees."""
    parts = ("granted", "waiting", "expired")
    ok = bool(ledger.get("balanced")) and ledger.get("complete", True)
    for unit in ("count", "amount"):
        generated = ledger.get("generated", {}).get(unit, 0)
        ok = ok and generated == sum(ledger.get(p, {}).get(unit, 0) for p in parts)
    return {"balanced": ok, **{k: ledger.get(k) for k in ("generated", *parts)}}


def summarise(config: Any, phases: list[Phase], seconds: list[dict[str, Any]],
              raw: dict[str, Any], login_seconds: float, elapsed: float) -> dict[str, Any]:
    rows = [phase_summary(p, seconds) for p in phases]
    idle = next((r["cpu_percent"] for r in rows if not r["target"] and r["cpu_percent"]), None)
    for r in rows:  # per request above the idle cost of holding the connections
        r["cpu_us_per_request_marginal"] = None
        if r["target"] and idle is not None and r["cpu_percent"] is not None and r["client_qps"]:
            r["cpu_us_per_request_marginal"] = round(
                (r["cpu_percent"] - idle) / 100 / r["client_qps"] * 1e6, 1)
    ledger = ledger_check(raw["server"].get("ledger", {}))
    judged = verdict(rows, ledger)
    return {
        "connections": config.connections, "hosts": config.hosts, "sets": config.sets,
        "peak_qps": config.qps, "pacing": config.pacing, "login_seconds": round(login_seconds, 1),
        "elapsed_seconds": round(elapsed, 1), "hot_path": hotpath.describe(),
        "phases": rows, "ledger": ledger,
        "group": raw["server"].get("group", {}),
        "client_totals": [c.get("totals", {}) for c in raw["clients"]],
        "clock_offset_ms": [c.get("clock_offset_ms") for c in raw["clients"]],
        "passed": judged["passed"], "reasons": judged["reasons"],
        "phase_plan": [asdict(p) for p in phases],
    }


def write_seconds(run_dir: Path, seconds: list[dict[str, Any]]) -> None:
    """``seconds.jsonl``: one record a line, without the merged latency histogram."""
    with open(run_dir / "seconds.jsonl", "w") as fh:
        for record in seconds:
            public = {k: v for k, v in record.items() if k != "_hist"}
            fh.write(json.dumps(public, separators=(",", ":")) + "\n")


def loop_lag_seconds(worst_by_second: list[float]) -> dict[str, Any]:
    """How a phase's seconds sit against ``LAG_TARGET_MS``, each by its worst tick (ms).

    The worst of a whole phase is one second's stall (on this box the
    whole machine stalls 100-200 ms every few seconds); how many seconds
    stayed under the target, and the median second, say how the loop ran.
    """
    return {"loop_lag_seconds": len(worst_by_second),
            "loop_lag_under_target": sum(lag < LAG_TARGET_MS for lag in worst_by_second),
            "loop_lag_p50_ms": (round(statistics.median(worst_by_second), 1)
                                if worst_by_second else None)}


def lag_share(row: dict[str, Any]) -> str:
    """``loop_lag_seconds``' figures as text: "23 of 30 s under 10 ms (median 4.1 ms)"."""
    if not row.get("loop_lag_seconds"):
        return "-"
    return (f"{row['loop_lag_under_target']} of {row['loop_lag_seconds']} s under "
            f"{LAG_TARGET_MS:g} ms (median {row['loop_lag_p50_ms']} ms)")


def stall_share(row: dict[str, Any]) -> str:
    """A phase's client pacer stalls as text: "57 (12.9 s behind in all, their own CPU 4% of it)".

    A small share means the workers waited for a CPU (the box was busy),
    not that their own work took the time.
    """
    stalls, late_ms = row.get("client_stalls", 0), row.get("client_stall_ms", 0.0)
    if not stalls or not late_ms:
        return str(stalls)
    cpu = row.get("client_stall_cpu_ms", 0.0) / late_ms
    return f"{stalls:,} ({late_ms / 1000:.1f} s behind in all, their own CPU {cpu:.0%} of it)"


def percent(x: float | None) -> str:
    """A share with one decimal: 94.9% of seconds, never a rounded 95% that missed 95%."""
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """PASS/FAIL and, on a failure, every reason on its own line."""
    lines = [f"verdict: {'PASS' if summary['passed'] else 'FAIL'}"]
    return lines + [f"  - {reason}" for reason in summary.get("reasons", [])]


def write_table(summary: dict[str, Any], run_dir: Path, graphs: list[Path]) -> str:
    """The human summary printed at the end of the run."""
    s = summary
    lines = [f"hongbao smoke: {s['connections']} connections on {s['hosts']} hosts, "
             f"{s['sets']} SETs, peak {s['peak_qps']} QPS, pacing {s['pacing']}, "
             f"logged in in {s['login_seconds']}s, run {s['elapsed_seconds']}s",
             f"hot path: {s.get('hot_path', '-')}",
             "served per second: by arrival at the server, by answer at the clients; "
             f"±2% = share of steady seconds within ±{TOLERANCE:.0%} of the target", ""]
    head = ("phase", "target", "server/s", "client/s", "server±2%", "client±2%", "p50 ms",
            "p99 ms", "generated", "granted", "claimed", "CPU µs/req", "above idle")
    row = "{:<6}{:>8}{:>10}{:>10}{:>11}{:>11}{:>8}{:>8}{:>10}{:>9}{:>9}{:>12}{:>11}"
    lines.append(row.format(*head))
    for r in s["phases"]:
        lines.append(row.format(
            r["phase"], r["target"], _num(r["server_qps"]), _num(r["client_qps"]),
            percent(r["server_within"]), percent(r["client_within"]), _num(r["latency_p50_ms"]),
            _num(r["latency_p99_ms"]), r["generated"], r["granted"], r["claimed"],
            _num(r["cpu_us_per_request"]), _num(r.get("cpu_us_per_request_marginal"))))
    led = s["ledger"]

    def part(name: str) -> str:
        v = led.get(name) or {}
        return f"{name} {v.get('count', 0)} ({v.get('amount', 0)})"

    lines += ["", f"ledger: {part('generated')} = {part('granted')} + {part('waiting')} + "
                  f"{part('expired')}: {'BALANCED' if led['balanced'] else 'NOT BALANCED'}",
              f"group envelopes: {s['group']}",
              "scheduled (by the frames' send second): "
              + ", ".join(f"{r['phase']} {r['scheduled_counted']}/{r['scheduled_sent']} counted,"
                          f" {percent(r['scheduled_within'])} of seconds within ±2%"
                          for r in s["phases"] if r["target"]),
              f"clock offset to server (ms, per host): {s['clock_offset_ms']}",
              f"run dir: {run_dir}", report_line(run_dir, graphs),
              *verdict_lines(s)]
    return "\n".join(lines)


def report_line(run_dir: Path, files: list[Path]) -> str:
    """Where to look: the report page, or why there is none."""
    pages = [f for f in files if f.suffix == ".html"]
    if not pages:
        return "report: none (see the warning above)"
    n = sum(f.suffix == ".png" for f in files)
    return f"report: {pages[0]} ({n} graph{'' if n == 1 else 's'})"


def write_graphs(run_dir: Path) -> list[Path]:
    """The report page and its graphs, drawn by ``python -m monitor.report --run DIR``.

    A subprocess, not an import: app must not depend on monitor (the report is an
    optional layer with its own dependencies), and a report that fails or hangs
    costs the run its pictures, never its verdict. Returns the files written.
    """
    # Graphite only when this run sent its metrics there (make smoke sets the variable
    # exactly then); else the run's own records, never whatever a running stack holds.
    graphite = os.environ.get("HONGBAO_GRAPHITE_URL", "")
    cmd = [sys.executable, "-m", "monitor.report", "--run", str(run_dir), "--graphite", graphite]
    try:
        done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True,
                              text=True, timeout=REPORT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("the report was not drawn (%s); run: %s", exc, " ".join(cmd))
        return []
    if done.returncode != 0:
        log.warning("the report failed (exit %s): %s; run: %s", done.returncode,
                    done.stderr.strip()[-500:], " ".join(cmd))
    return sorted(run_dir.glob("*.png")) + sorted(run_dir.glob("*.html"))
