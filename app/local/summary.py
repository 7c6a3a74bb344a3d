"""What a smoke run saw: per-second records, the per-phase verdict, the table and graphs.

Kept apart from ``app.local.smoke`` (which starts and drives processes) so this part
is pure data in, data out, and tested without running anything.

Accuracy rule: a phase's steady seconds are its full seconds minus the first
(the change is stamped on the same wall-clock second on every host, but the
first second may still carry reconnect or start-up effects). A second passes
when its count is within ±2% of the target, once as the clients sent it
and once as the server counted it by the frames' timestamps. A loaded phase
passes when ≥ 95% of its steady seconds pass on both sides.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.client.histogram import Histogram

log = logging.getLogger("hongbao.smoke")

TOLERANCE = 0.02  # ±2% of the target per second
REQUIRED = 0.95  # share of steady seconds that must be within the tolerance


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


def build_seconds(server: dict[str, Any], clients: list[dict[str, Any]],
                  polled: dict[int, dict[str, Any]], start: int, end: int) -> list[dict[str, Any]]:
    """One record per second of the run; envelope and amount fields are cumulative."""
    by_second = {r["second"]: r for r in server.get("per_second", [])}
    by_arrival = {r["second"]: r["shakes"] for r in server.get("per_second_arrival", [])}
    hosts = [{r["second"]: r for r in c["per_second"]} for c in clients]
    records = []
    for t in range(start, end):
        rows = [h[t] for h in hosts if t in h]
        hist = Histogram()
        for row in rows:
            hist.merge(row.get("hist", {}))
        snap = _at(polled, t)
        ledger = snap.get("ledger", {})
        server_row = by_second.get(t, {})
        records.append({
            "t": t,
            "target_qps": sum(r["target"] for r in rows),
            "client_sent": sum(r["sent"] for r in rows),
            "client_answered": sum(r["answered"] for r in rows),
            "client_skipped": sum(r.get("skipped", 0) for r in rows),
            "server_shakes": server_row.get("shakes", 0),
            "server_by_result": server_row.get("by_result", {}),
            "server_shakes_arrival": by_arrival.get(t, 0),
            "connections": snap.get("connections", sum(r["connections"] for r in rows)),
            "client_connections": sum(r["connections"] for r in rows),
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


def phase_summary(phase: Phase, seconds: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [r for r in seconds if phase.start <= r["t"] < phase.end]
    steady = [r for r in rows if r["t"] > phase.start]
    hist = Histogram()
    for r in rows:
        hist.merge(r["_hist"])
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    out: dict[str, Any] = {
        "phase": phase.name, "target": phase.target, "seconds": len(rows),
        "steady_seconds": len(steady),
        "client_qps": round(sum(r["client_sent"] for r in steady) / len(steady), 1)
        if steady else 0.0,
        "server_qps": round(sum(r["server_shakes"] for r in steady) / len(steady), 1)
        if steady else 0.0,
        "client_within": None, "server_within": None, "server_arrival_within": None,
        "latency_p50_ms": hist.percentile(50), "latency_p99_ms": hist.percentile(99),
        "generated": last.get("envelopes_generated", 0) - first.get("envelopes_generated", 0),
        "granted": last.get("envelopes_granted", 0) - first.get("envelopes_granted", 0),
        "claimed": last.get("group_claimed", 0) - first.get("group_claimed", 0),
        "cpu_us_per_request": None, "cpu_percent": None,
    }
    if phase.target and steady:
        out["client_within"] = sum(_within(r["client_sent"], r["target_qps"])
                                   for r in steady) / len(steady)
        out["server_within"] = sum(_within(r["server_shakes"], r["target_qps"])
                                   for r in steady) / len(steady)
        # informational: the same by arrival second (in-flight requests move across)
        out["server_arrival_within"] = sum(_within(r.get("server_shakes_arrival", 0),
                                                   r["target_qps"]) for r in steady) / len(steady)
    if phase.cpu_start is not None and phase.cpu_end is not None:
        window = [r for r in seconds
                  if phase.cpu_start_time <= r["t"] + 1 and r["t"] < int(phase.cpu_end_time)]
        sent = sum(r["client_sent"] for r in window)
        cpu = phase.cpu_end - phase.cpu_start
        elapsed = phase.cpu_end_time - phase.cpu_start_time
        out["cpu_percent"] = round(100 * cpu / elapsed, 1) if elapsed > 0 else None
        out["cpu_us_per_request"] = round(cpu / sent * 1e6, 1) if sent else None
    return out


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
    accuracy_ok = all(r["client_within"] is not None and r["client_within"] >= REQUIRED
                      and r["server_within"] >= REQUIRED for r in rows if r["target"])
    return {
        "connections": config.connections, "hosts": config.hosts, "sets": config.sets,
        "peak_qps": config.qps, "pacing": config.pacing, "login_seconds": round(login_seconds, 1),
        "elapsed_seconds": round(elapsed, 1), "phases": rows, "ledger": ledger,
        "group": raw["server"].get("group", {}),
        "client_totals": [c.get("totals", {}) for c in raw["clients"]],
        "clock_offset_ms": [c.get("clock_offset_ms") for c in raw["clients"]],
        "accuracy_ok": accuracy_ok, "passed": accuracy_ok and ledger["balanced"],
        "phase_plan": [asdict(p) for p in phases],
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def write_table(summary: dict[str, Any], run_dir: Path, graphs: list[Path]) -> str:
    """The human summary printed at the end of the run."""
    s = summary
    lines = [f"hongbao smoke: {s['connections']} connections on {s['hosts']} hosts, "
             f"{s['sets']} SETs, peak {s['peak_qps']} QPS, pacing {s['pacing']}, "
             f"logged in in {s['login_seconds']}s, run {s['elapsed_seconds']}s", ""]
    head = ("phase", "target", "client/s", "server/s", "client±2%", "server±2%", "p50 ms",
            "p99 ms", "generated", "granted", "claimed", "CPU µs/req", "above idle")
    row = "{:<6}{:>8}{:>10}{:>10}{:>11}{:>11}{:>8}{:>8}{:>10}{:>9}{:>9}{:>12}{:>11}"
    lines.append(row.format(*head))
    for r in s["phases"]:
        lines.append(row.format(
            r["phase"], r["target"], _num(r["client_qps"]), _num(r["server_qps"]),
            _pct(r["client_within"]), _pct(r["server_within"]), _num(r["latency_p50_ms"]),
            _num(r["latency_p99_ms"]), r["generated"], r["granted"], r["claimed"],
            _num(r["cpu_us_per_request"]), _num(r.get("cpu_us_per_request_marginal"))))
    led = s["ledger"]

    def part(name: str) -> str:
        v = led.get(name) or {}
        return f"{name} {v.get('count', 0)} ({v.get('amount', 0)})"

    lines += ["", f"ledger: {part('generated')} = {part('granted')} + {part('waiting')} + "
                  f"{part('expired')}: {'BALANCED' if led['balanced'] else 'NOT BALANCED'}",
              f"group envelopes: {s['group']}",
              "server seconds within ±2% counted by arrival instead of send second: "
              + ", ".join(f"{r['phase']} {_pct(r['server_arrival_within'])}"
                          for r in s["phases"] if r["target"]),
              f"clock offset to server (ms, per host): {s['clock_offset_ms']}",
              f"QPS accuracy (≥{REQUIRED:.0%} of steady seconds within ±{TOLERANCE:.0%}): "
              f"{'ok' if s['accuracy_ok'] else 'MISSED'}",
              f"run dir: {run_dir}", f"graphs: {', '.join(p.name for p in graphs) or 'none'}",
              f"verdict: {'PASS' if s['passed'] else 'FAIL'}"]
    return "\n".join(lines)


def write_graphs(run_dir: Path) -> list[Path]:
    """The monitor's report when it is installed, else the basic PNGs drawn here."""
    try:
        from monitor.report import write_report
    except ImportError:
        write_report = None
    if write_report is not None:
        try:
            write_report(run_dir)
            return sorted(run_dir.glob("*.png")) + sorted(run_dir.glob("*.html"))
        except Exception as exc:  # the fallback below still gives the user graphs
            log.warning("monitor.report failed (%s: %s); drawing the basic graphs instead",
                        type(exc).__name__, exc)
    return draw_basic(run_dir)


def draw_basic(run_dir: Path) -> list[Path]:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "seconds.jsonl").read_text().splitlines()]
    if not rows:
        return []
    t0 = rows[0]["t"]
    x = [r["t"] - t0 for r in rows]
    charts = {
        "qps.png": ("SHAKEs per second", [("target", "target_qps"), ("client sent", "client_sent"),
                                          ("server (by send second)", "server_shakes")]),
        "connections.png": ("connections", [("server", "connections"),
                                            ("clients", "client_connections")]),
        "envelopes.png": ("envelopes (cumulative)", [("generated", "envelopes_generated"),
                                                     ("granted", "envelopes_granted"),
                                                     ("group claimed", "group_claimed")]),
        "latency.png": ("latency ms", [("p50", "latency_p50_ms"), ("p99", "latency_p99_ms")]),
    }
    out = []
    for name, (title, series) in charts.items():
        fig, ax = plt.subplots(figsize=(9, 3.5))
        for label, key in series:
            ax.plot(x, [r.get(key) if r.get(key) is not None else float("nan") for r in rows],
                    label=label)
        ax.set_title(title)
        ax.set_xlabel("seconds since the first phase")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=90)
        plt.close(fig)
        out.append(run_dir / name)
    return out
