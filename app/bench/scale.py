"""The scale benchmark: the classic experiment on one machine, every figure in one table.

Run it::

    make bench-scale    # = python -m app.bench scale (defaults below: the full run)
    python -m app.bench scale --connections 1000000 --hosts 17 \\
        --phases 30000,60000 --hold 60 --phase-seconds 60
    python -m app.bench scale --connections 50000 --hosts 3 --phases 3000 \\
        --hold 5 --phase-seconds 10          # a small rehearsal

It starts the server (SETs sized for the descriptor limit) and ``--hosts``
simulated client hosts on distinct loopback addresses (several per host, so
no address runs out of source ports), connects and logs in every user with a
progress line, holds, then runs each QPS phase with shake envelopes (83/s)
and group envelopes (200/s) being generated. It writes ``result.json``,
``seconds.jsonl`` and the report's graphs to ``runs/scale-<time>/`` and
prints connections held and dropped, bytes per connection (server user
space, client user space, kernel), CPU µs per request (server and clients),
per-phase QPS accuracy, latency p50/p99/p999, worst loop lag and GC pause,
errors by kind and the ledger.

As root it runs inside a network namespace it creates (and deletes), with
its own port range, accept queues and TCP established hash (sized for the
run); elsewhere in the current one.

Exit code: 0 every planned phase passed (a ``--ramp``'s steps above them are
reported, not judged); 3 the run completed and its verdict failed (the
reasons are printed); 2 stopped before memory or TCP memory ran out;
1 an error; 130 interrupted.

Safety: MemAvailable is watched every half second; below ``--mem-floor-mb``
the run stops cleanly and reports how far it got and which resource ran out.
Every process is stopped by PID on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from app import hotpath, settings
from app.bench import cpu, floor
from app.bench.cpu import rss_bytes, tree
from app.client.histogram import Histogram
from app.client.worker import STALL_S
from app.local import netns
from app.local.runner import ROOT, LocalFleet, get_json, progress
from app.local.summary import (
    REQUIRED,
    Phase,
    build_seconds,
    lag_share,
    ledger_check,
    loop_lag_seconds,
    percent,
    phase_summary,
    served,
    stall_share,
    verdict,
    verdict_lines,
    write_graphs,
    write_seconds,
)
from app.server.set_stats import SECONDS_KEPT

log = logging.getLogger("hongbao.scale")

# Connections per source address. connect() searches one half of the port
# range first for a free 4-tuple to the one server address: measured, a client
# worker stalled for 10 s at ~14k connections per address on the default range.
ADDRESS_CONNECTIONS = 10_000
SHAKE_ENVELOPES_PER_S = 83  # the classic's generation rate
GROUPS_PER_S = 200  # the classic's group sending rate
POLL = 0.5  # seconds between resource checks
TCP_MEM_STOP = 0.5  # stop well before the kernel resets everyone's sockets: at 1M connections
# it went from normal to past tcp_mem within one 1 s check


class OutOfResource(Exception):
    """The machine ran short of something; the run stops and reports how far it got."""


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    return out


RAMP_ATTEMPTS = 2  # a ramp step fails when it fails this many times in a row


TICKS, FEW_TICKS = 20, 10  # auto_ticks: below and from MANY_CONNECTIONS
QUIET_MS_MANY_TICKS, QUIET_MS_FEW_TICKS = 200, 100  # auto_quiet_ms
CLIENT_NICE, CLIENT_NICE_MANY = 10, 5  # auto_client_nice: below and from MANY_CONNECTIONS
MANY_CONNECTIONS = 500_000
EXIT_VERDICT_FAILED = 3  # exit code of a run that completed and failed its verdict


def tcp_ehash() -> int:
    """Buckets of the TCP established hash this run's sockets use (negative: shared)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_ehash_entries").read_text())
    except (OSError, ValueError):
        return 0


def tcp_memory() -> tuple[int, int]:
    """(pages the kernel's TCP stack holds now, the tcp_mem limit in pages).

    Global, not per namespace: past the limit the kernel resets sockets with
    queued data on the whole machine ("TCP: out of memory"), other jobs' too.
    """
    used = 0
    with open("/proc/net/sockstat") as fh:
        for line in fh:
            if line.startswith("TCP:"):
                fields = line.split()
                used = int(fields[fields.index("mem") + 1])
    try:
        with open("/proc/sys/net/ipv4/tcp_mem") as fh:
            limit = int(fh.read().split()[2])
    except FileNotFoundError:  # only the initial namespace shows it: the outer run passed it
        limit = int(os.environ.get("HONGBAO_TCP_MEM_LIMIT", "0"))
    return used, limit


def judged_rows(rows: list[dict[str, Any]], planned: int, ramped: bool) -> list[dict[str, Any]]:
    """The phase rows the run's verdict judges: the planned phases.

    With ``--ramp`` the steps above the planned phases measure where the
    machine stops, so the last of them fails by design; the ramp's own line
    and ``result["ramp"]`` report them. The last planned phase is the ramp's
    first step and is retried like one: it passes when its retry does.
    """
    if not ramped:
        return rows
    judged = rows[:planned]
    if (judged and len(rows) > planned and rows[planned]["target"] == judged[-1]["target"]
            and rows[planned]["passed"]):
        judged[-1] = rows[planned]
    return judged


class ScaleRun:
    """One run: its processes, what it measured, and why it stopped."""

    def __init__(self, args: settings.Config, run_dir: Path) -> None:
        self.args = args
        self.run_dir = run_dir
        self.fleet = LocalFleet(run_dir, log_level="warning")
        self.phases: list[Phase] = []
        self.polled: dict[int, dict[str, Any]] = {}
        self.figures: dict[str, Any] = {"stopped_by": None}
        self.cpu_marks: dict[str, cpu.Mark] = {}
        self.mem_floor = args.mem_floor_mb * 2**20

    # ------------------------------------------------------------- processes
    def start_server(self) -> None:
        a = self.args
        self.fleet.start_server(a.sets or "auto", [
            "--target-connections", str(a.connections),
            "--shake-budget", str(max(200_000, 2 * max(a.phases, default=0))),
            "--claim-ttl", "30"], timeout=300)
        self.sets = self.fleet.sets

    def start_clients(self) -> None:
        # Co-located clients run niced: on a real fleet the server has its own
        # cores. Unniced, 68 busy client workers left 51 SETs 12% of a core at
        # 30k QPS (the clients' writes also carry the server side's TCP work).
        a = self.args
        self.fleet.start_hosts(a.connections, a.hosts, ADDRESS_CONNECTIONS, "scale",
                               nice=a.client_nice, timeout=120, pacing=a.pacing,
                               ticks=a.ticks, quiet_ms=a.quiet_ms,
                               connect_rate=max(1, a.connect_rate // a.hosts))

    def server_procs(self) -> list[psutil.Process]:
        server = self.fleet.server
        return tree(server.proc.pid) if server and server.proc else []

    def client_procs(self) -> list[psutil.Process]:
        return [p for s in self.fleet.clients if s.proc for p in tree(s.proc.pid)]

    # ------------------------------------------------------------ watching
    def check(self) -> dict[str, int]:
        """Resources now; raise OutOfResource before the machine runs short."""
        mem = meminfo()
        if mem["MemAvailable"] < self.mem_floor:
            raise OutOfResource(f"memory: MemAvailable {mem['MemAvailable'] >> 20} MiB "
                                f"< floor {self.mem_floor >> 20} MiB")
        pages, limit = tcp_memory()
        self.figures["tcp_mem_peak_pages"] = max(self.figures.get("tcp_mem_peak_pages", 0), pages)
        if limit and pages > TCP_MEM_STOP * limit:
            raise OutOfResource(f"kernel TCP memory: {pages} pages of tcp_mem {limit} "
                                f"(answers queued faster than read)")
        try:
            self.fleet.check_alive()
        except RuntimeError as exc:
            raise OutOfResource(f"process: {exc}") from None
        return mem

    def connect_all(self) -> None:
        a = self.args
        started = time.time()
        last_n, last_t = 0, started
        while True:
            mem = self.check()
            n = self.fleet.connections()
            now = time.time()
            rate = (n - last_n) / max(now - last_t, 1e-6)
            last_n, last_t = n, now
            self.figures["connected"] = n
            progress(f"connecting: {n:>8}/{a.connections} ({100 * n / a.connections:5.1f}%) "
                     f"{rate:8.0f}/s  MemAvailable {mem['MemAvailable'] >> 20} MiB  "
                     f"{now - started:5.0f}s")
            if n >= a.connections:
                break
            if now - started > a.connect_timeout:
                raise OutOfResource(f"time: only {n} of {a.connections} connections logged "
                                    f"in after {a.connect_timeout}s")
            time.sleep(max(POLL, 1.0))
        self.figures["login_seconds"] = round(time.time() - started, 1)
        self.figures["connect_rate_per_s"] = round(a.connections / (time.time() - started))
        sys.stderr.write("\n")

    def hold(self) -> None:
        a = self.args
        end = time.time() + a.hold
        low = high = self.fleet.connections()
        server_low = get_json(self.fleet.server_api, "/stats?seconds=0", tries=3)["connections"]
        idle_start = cpu.mark(self.server_procs(), self.client_procs())
        while time.time() < end:
            self.check()
            n = self.fleet.connections()
            server_n = get_json(self.fleet.server_api, "/stats?seconds=0", tries=3)["connections"]
            low, high, server_low = min(low, n), max(high, n), min(server_low, server_n)
            progress(f"holding: {n} connections (server {server_n}), lowest {low}, "
                     f"{end - time.time():4.0f}s left")
            time.sleep(1.0)
        sys.stderr.write("\n")
        # What holding the connections costs with no load: the fixed part of
        # every phase's CPU (ticks, reports, housekeeping of every process).
        idle = cpu.costs(idle_start, cpu.mark(self.server_procs(), self.client_procs()), 0)
        self.figures["idle"] = {k: v for k, v in idle.items() if "per_request" not in k}
        self.figures["held"] = {"clients_lowest": low, "clients_highest": high,
                                "server_lowest": server_low, "seconds": a.hold,
                                "dropped": max(0, a.connections - min(low, server_low))}

    def add_phase(self, qps: int, at: int) -> Phase:
        name = f"{qps // 1000}k" if qps >= 1000 else str(qps)
        tries = sum(1 for p in self.phases if p.target == qps)
        phase = Phase(name + (f"#{tries + 1}" if tries else ""), qps, at,
                      at + self.args.phase_seconds)
        self.phases.append(phase)
        self.fleet.set_total(qps, at)
        return phase

    def run_phases(self) -> None:
        """The planned phases back to back, then (``--ramp``) steps up until one fails.

        A ramp step is judged two seconds after it ends (the figures must be
        in), the load staying at its rate meanwhile; only then does the next
        step start: a step higher if it passed, the same step once more if
        it failed for the first time (one noisy second on this machine
        fails a phase), else the ramp ends. The last planned phase is the
        ramp's first step.
        """
        a = self.args
        at = int(time.time()) + 3
        for qps in a.phases:
            self.add_phase(qps, at)
            at += a.phase_seconds
        ramping = a.ramp > 0
        if not ramping:
            self.fleet.set_total(0, at)
        span = at - self.phases[0].start + (a.ramp_steps * (a.phase_seconds + 4)
                                            if ramping else 0)
        self.fleet.start_envelopes(SHAKE_ENVELOPES_PER_S, SHAKE_ENVELOPES_PER_S * span,
                                   GROUPS_PER_S, GROUPS_PER_S * span, a.connections)
        cpu_marks: dict[str, cpu.Mark] = {}
        self.cpu_marks = cpu_marks  # kept up to date: a run stopped mid-phase still reports
        steps = failures = 0
        if ramping:
            self.figures["ramp"] = {"step": a.ramp, "attempts": RAMP_ATTEMPTS, "steps": [],
                                    "highest_passing": None, "first_failing": None}
        while time.time() < at + 2 or ramping:
            self.check()
            now = time.time()
            for phase in self.phases:
                # CPU over the phase's steady part: from its second second to its end
                if phase.name not in cpu_marks and now >= phase.start + 1:
                    cpu_marks[phase.name] = cpu.mark(self.server_procs(), self.client_procs())
                key = phase.name + ":end"
                if key not in cpu_marks and now >= phase.end and phase.name in cpu_marks:
                    cpu_marks[key] = cpu.mark(self.server_procs(), self.client_procs())
            if ramping and now >= at + 2:  # the last phase ended two seconds ago: judge it
                last = self.phases[-1]
                passed, reasons = self.judge(last)
                ramp = self.figures["ramp"]
                failures = 0 if passed else failures + 1
                if passed:
                    ramp["highest_passing"] = last.target
                # the last step too gets its retry: out of steps only once one passed
                if failures >= RAMP_ATTEMPTS or (passed and steps >= a.ramp_steps):
                    if not passed:
                        ramp["first_failing"], ramp["why"] = last.target, reasons
                    self.fleet.set_total(0, int(now) + 1)
                    at, ramping = int(now) + 1, False
                else:
                    target = last.target + (a.ramp if passed else 0)
                    at = int(now) + 1
                    self.add_phase(target, at)
                    at += a.phase_seconds
                    steps += 1
            self.poll_second(now)
            time.sleep(max(0.05, 1.0 - (time.time() % 1.0) + 0.3))
        sys.stderr.write("\n")

    def judge(self, phase: Phase) -> tuple[bool, list[str]]:
        """Whether a finished phase passed and why not, kept in figures["ramp"]."""
        stats = self.fleet.server_stats(int(time.time()) - phase.start + 2, tries=2, timeout=30)
        clients = self.fleet.client_stats(phase.start - 1, timeout=30)
        row = phase_summary(phase, build_seconds(stats, clients, self.polled, phase.start,
                                                 phase.end))
        self.figures["ramp"]["steps"].append({"phase": phase.name, "target": phase.target,
                                              "passed": row["passed"],
                                              "reasons": row["reasons"]})
        sys.stderr.write(f"\n{phase.name}: {'passed' if row['passed'] else 'FAILED'} "
                         f"{'; '.join(row['reasons'])}\n")
        return row["passed"], row["reasons"]

    def poll_second(self, now: float) -> None:
        snap = self.fleet.snapshot(self.polled, self.phases, now, timeout=5)
        if snap is None:
            return
        stats, last, phase = snap
        progress(f"phase {phase.name if phase else '-':>4} target "
                 f"{phase.target if phase else 0:>6} server {last['shakes']:>6}/s conns "
                 f"{stats['connections']:>8} ledger "
                 f"{'ok' if stats['ledger'].get('balanced') else 'OFF'}")

    # ------------------------------------------------------------- figures
    def measure_idle(self, key: str) -> None:
        mem = meminfo()
        clients = self.client_procs()
        # counted before the RSS is read: a connection made meanwhile is charged, not free
        connections = self.fleet.connections() if clients else 0
        self.figures[key] = {
            "server_rss": rss_bytes(self.server_procs()),
            "client_rss": rss_bytes(clients), "processes": len(clients),
            "connections": connections,
            "used": mem["MemTotal"] - mem["MemAvailable"],
            "slab": mem.get("Slab", 0),
        }

    def per_connection(self) -> None:
        before, after = self.figures.get("mem_empty"), self.figures.get("mem_connected")
        n = self.figures.get("connected", 0)
        if not (before and after and n):
            return
        server = after["server_rss"] - before["server_rss"]
        client = after["client_rss"] - before["client_rss"]
        # The client side per connection is its growth from the processes just
        # started (few connections yet) to all connected; the processes' own
        # interpreter is a fixed cost, shown apart.
        started = self.figures.get("mem_clients_started") or before
        grown = n - started.get("connections", 0)
        marginal = (after["client_rss"] - started["client_rss"]) / grown if grown > 0 else None
        # Kernel: the slab growth (socket structures of both ends, epoll items,
        # dentries) per client-server pair. "used" moves with whatever else runs
        # on the machine, so it is kept as a cross-check only.
        self.figures["bytes_per_connection"] = {
            "server_user": round(server / n),
            "client_user": round(marginal) if marginal is not None else None,
            "client_user_all_in": round(client / n),
            "client_process_mb": round(started["client_rss"] / max(1, started.get("processes", 1))
                                       / 2**20, 1),
            "kernel_pair": round((after["slab"] - before["slab"]) / n),
            "machine_used": round((after["used"] - before["used"]) / n),
        }
        self.figures["server_rss_total_mb"] = round(after["server_rss"] / 2**20)
        self.figures["client_rss_total_mb"] = round(after["client_rss"] / 2**20)

    def collect(self) -> dict[str, Any]:
        # every second since the first phase (the SETs keep SECONDS_KEPT of them)
        span = int(time.time() - self.phases[0].start) + 5 if self.phases else 60
        server = get_json(self.fleet.server_api, f"/stats?seconds={min(span, SECONDS_KEPT)}",
                          timeout=30, tries=5)
        since = self.phases[0].start - 1 if self.phases else int(time.time())
        clients = self.fleet.client_stats(since, timeout=30)
        rows = []
        if self.phases:
            seconds = build_seconds(server, clients, self.polled, self.phases[0].start,
                                    self.phases[-1].end)
            write_seconds(self.run_dir, seconds)
            for phase in self.phases:
                row = phase_summary(phase, seconds)
                hist = Histogram()
                for r in seconds:
                    if phase.start <= r["t"] < phase.end:
                        hist.merge(r["_hist"])
                row["latency_p999_ms"] = hist.percentile(99.9)
                row.update(self.phase_cpu(phase, seconds))
                health = [h for h in server.get("health_per_second", [])
                          if phase.start <= h["second"] < phase.end]
                row["loop_lag_max_ms"] = max((h["loop_lag_ms"] for h in health), default=None)
                row.update(loop_lag_seconds([h["loop_lag_ms"] for h in health]))
                row["gc_pause_max_ms"] = max((h["gc_pause_ms"] for h in health), default=None)
                rows.append(row)
        counters = server.get("counters", {})
        totals: dict[str, int] = {}
        for c in clients:
            for key, value in (c.get("totals") or {}).items():
                if isinstance(value, int):
                    totals[key] = totals.get(key, 0) + value
        ledger = ledger_check(server.get("ledger", {}))
        errors = {k: v for k, v in counters.items()
                  if k.startswith(("protocol_error", "close.", "handoff.failed", "accept_"))}
        errors.update({f"client.{k}": totals[k] for k in ("connect_failures", "lost", "errors",
                                                           "reconnects") if k in totals})
        # closed loop: asks skipped because that user's previous SHAKE was unanswered
        errors["client.busy_skipped"] = totals.get("busy", 0)
        return {
            "phases": rows,
            # each phase's seconds: the graphs' spans (a ramp's retry has its predecessor's rate)
            "phase_plan": [{"name": p.name, "target": p.target, "start": p.start, "end": p.end}
                           for p in self.phases],
            **verdict(judged_rows(rows, len(self.args.phases), self.args.ramp > 0), ledger),
            "ledger": ledger,
            "group": server.get("group", {}),
            "loop_lag_max_ms": server.get("loop_lag_max_ms"),
            "gc_pause_max_ms": server.get("gc_pause_max_ms"),
            "gc_cpu_max_ms": server.get("gc_cpu_max_ms"),
            "errors": errors,
            "sets": server.get("sets"),
            # SETs that answered the final /stats: fewer means the figures miss some
            "sets_up": server.get("sets_up"),
        }

    def phase_cpu(self, phase: Phase, seconds: list[dict[str, Any]]) -> dict[str, Any]:
        start, end = self.cpu_marks.get(phase.name), self.cpu_marks.get(phase.name + ":end")
        if not (start and end):
            return {}
        window = [r for r in seconds if start[0] <= r["t"] + 1 and r["t"] < int(end[0])]
        return cpu.costs(start, end, sum(r["client_answered"] for r in window))


def run_floor(args: settings.Config, out_dir: Path) -> dict[str, Any]:
    """The same connections and phases through the C floor, before hongbao starts."""
    seconds = args.floor_seconds or min(args.phase_seconds, 20)
    log.info("floor: %d connections, phases %s, %d s each", args.connections, args.phases,
             seconds)
    try:
        return floor.measure(out_dir, args.connections, args.hosts, args.phases, seconds,
                             args.ticks, client_nice=args.client_nice, quiet_ms=args.quiet_ms,
                             groups_per_s=GROUPS_PER_S)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        log.warning("floor run failed: %s", exc)
        return {"kind": f"failed: {exc}", "phases": []}


def server_under_c_clients(args: settings.Config, run: ScaleRun) -> dict[str, Any]:
    """Hongbao's server loaded by the floor's C clients (``--clients floor``).

    The same connections, phases and ticks, shake envelopes on; the C
    clients do not claim group envelopes, so none are started. Judged like
    every phase: served by arrival at the server, answered at the clients.
    """
    fleet = run.fleet
    span = len(args.phases) * args.phase_seconds + 60
    get_json(fleet.server_api, f"/yaohongbao?qps={SHAKE_ENVELOPES_PER_S}"
                               f"&sum={SHAKE_ENVELOPES_PER_S * span}", tries=3)

    def arrivals() -> dict[int, int]:
        stats = fleet.server_stats(300, tries=2, timeout=30)
        return {row["second"]: served(row["by_result"]) for row in stats["per_second_arrival"]}

    server = floor.ExternalServer(fleet.port, run.server_procs, arrivals)
    log.info("hongbao's server under the floor's C clients: %d connections, phases %s",
             args.connections, args.phases)
    figures = floor.measure(Path(args.run_dir) / "c-clients", args.connections, args.hosts,
                            list(args.phases), args.phase_seconds, args.ticks,
                            args.connect_timeout, server, args.client_nice, args.quiet_ms)
    stats = get_json(fleet.server_api, "/stats?seconds=0&audit=1", timeout=60, tries=3)
    ledger = ledger_check(stats.get("ledger", {}))
    phases = figures["phases"]
    reasons = [f"{r['target']}/s not served within the second" for r in phases
               if not r["passed"]]
    if not ledger.get("balanced"):
        reasons.append("the ledger does not balance")
    return {"c_clients": figures, "ledger": ledger, "passed": bool(phases) and not reasons,
            "reasons": reasons}


def c_client_lines(result: dict[str, Any]) -> list[str]:
    """Hongbao's server under C clients, its CPU per request against the C server's."""
    cc = result.get("c_clients")
    if not cc:
        return []
    floor_server = {r["target"]: r.get("server_cpu_us_per_request")
                    for r in result.get("floor", {}).get("phases", [])}
    lines = ["", "hongbao's server under the floor's C clients (--clients floor)"
                 + (f", logged in in {cc['login_seconds']} s" if "login_seconds" in cc else "")]
    fmt = "{:>8}{:>12}{:>11}{:>8}{:>8}{:>12}{:>12}{:>10}{:>16}"
    lines.append(fmt.format("target", "arrival±2%", "answer±2%", "p50", "p99", "srv µs/req",
                            "cli µs/req", "box CPU%", "srv/floor srv"))
    for r in cc.get("phases", []):
        theirs = floor_server.get(r["target"])
        ratio = (f"{r['server_cpu_us_per_request'] / theirs:.2f}x" if theirs else "-")
        lines.append(fmt.format(
            r["target"], percent(r["server_arrival_within"]),
            percent(r["client_answered_within"]), r.get("latency_p50_ms", "-"),
            r.get("latency_p99_ms", "-"), r["server_cpu_us_per_request"],
            r["client_cpu_us_per_request"], r.get("machine_cpu_percent", "-"), ratio))
        if not r["passed"]:
            lines.append(f"{'':>8}FAIL at {r['target']}/s: needs {100 * REQUIRED:.0f}% of "
                         "seconds within ±2% at both ends and p99 < 100 ms")
    return lines


def attach_floor(result: dict[str, Any]) -> None:
    """Give each phase row the floor's CPU per request and hongbao's multiple of it."""
    floors = {r["target"]: r for r in (result.get("floor") or {}).get("phases", [])}
    for row in result.get("phases", []):
        fl = floors.get(row["target"])
        if not fl or row.get("client_cpu_us_per_request") is None:
            continue
        floor_total = fl["server_cpu_us_per_request"] + fl["client_cpu_us_per_request"]
        total = row["server_cpu_us_per_request"] + row["client_cpu_us_per_request"]
        row["floor_server_cpu_us_per_request"] = fl["server_cpu_us_per_request"]
        row["floor_client_cpu_us_per_request"] = fl["client_cpu_us_per_request"]
        row["floor_ratio"] = round(total / floor_total, 2) if floor_total else None


def floor_lines(result: dict[str, Any]) -> list[str]:
    """The floor's rows and hongbao's CPU per request as a multiple of it."""
    fl = result.get("floor")
    if not fl:
        return []
    group = fl.get("group") or {}
    lines = ["", f"floor, same traffic in this run: {fl['kind']}"
                 + (f", {fl['processes']['servers']} server + {fl['processes']['clients']} "
                    f"client processes, logged in in {fl['login_seconds']} s"
                    if "processes" in fl else "")
                 + (f"; group envelopes pushed {group['pushed']:,}, claims sent "
                    f"{group.get('claims', 0):,}, served {group.get('claims_served', 0):,}, "
                    f"answered {group.get('claimed', 0):,}" if "pushed" in group else "")]
    head = ("target", "arrival±2%", "answer±2%", "p50", "p99", "srv µs/req", "cli µs/req",
            "box CPU%", "lag ms", "hongbao/floor")
    fmt = "{:>8}{:>12}{:>11}{:>8}{:>8}{:>12}{:>12}{:>10}{:>8}{:>15}"
    lines.append(fmt.format(*head))
    ours = {r["target"]: r for r in result.get("phases", [])}
    lags = []
    for r in fl["phases"]:
        lags.append(f"{r['target']} {lag_share(r)}")
        ratio = ours.get(r["target"], {}).get("floor_ratio")
        ratio = "-" if ratio is None else f"{ratio:.2f}x"
        lines.append(fmt.format(r["target"], percent(r.get("server_arrival_within")),
                                percent(r.get("client_answered_within")),
                                r.get("latency_p50_ms", "-"),
                                r.get("latency_p99_ms", "-"), r["server_cpu_us_per_request"],
                                r["client_cpu_us_per_request"], r.get("machine_cpu_percent", "-"),
                                "-" if r.get("loop_lag_max_ms") is None
                                else round(r["loop_lag_max_ms"], 1), ratio))
    lines.append("  the floor server's loop lag, each second by its worst tick: " + ", ".join(lags))
    return lines


def ledger_line(result: dict[str, Any]) -> str:
    ledger = result.get("ledger", {})
    return (f"ledger balanced: {ledger.get('balanced')}  generated {ledger.get('generated')} "
            f"granted {ledger.get('granted')} waiting {ledger.get('waiting')} expired "
            f"{ledger.get('expired')}")


def print_table(result: dict[str, Any]) -> str:
    f = result
    lines = [f"hongbao scale: {f['target_connections']} connections target on {f['hosts']} "
             f"hosts, {f.get('sets')} SETs, phases {f['phases_planned']}, "
             f"{f.get('ticks', '-')} ticks a second"
             + (f", the last {f['quiet_ms']} ms quiet" if f.get("quiet_ms") else "")
             + (f", clients at nice {f['client_nice']}" if f.get("client_nice") else ""),
             f"hot path: {f.get('hot_path', '-')}",
             f"stopped by: {f['stopped_by'] or 'nothing (completed)'}", ""]
    held = f.get("held", {})
    bpc = f.get("bytes_per_connection", {})
    if "c_clients" in f:  # hongbao's own clients never ran: only the C clients' table
        lines += [*floor_lines(f), *c_client_lines(f), "", ledger_line(f),
                  f"run dir: {f['run_dir']}", *(verdict_lines(f) if "passed" in f else [])]
        return "\n".join(lines)
    lines += [
        f"connections logged in     {f.get('connected', 0):>10}   in {f.get('login_seconds', '-')}"
        f" s ({f.get('connect_rate_per_s', '-')}/s)",
        f"held for {held.get('seconds', 0):>3} s              {held.get('server_lowest', '-'):>10}"
        f"   (lowest at the server; dropped {held.get('dropped', '-')})",
        f"bytes per connection      server user {bpc.get('server_user', '-')}, client user "
        f"{bpc.get('client_user', '-')} (+ {bpc.get('client_process_mb', '-')} MiB a client "
        f"process; all in {bpc.get('client_user_all_in', '-')}), kernel slab per pair "
        f"{bpc.get('kernel_pair', '-')} (whole machine {bpc.get('machine_used', '-')})",
        f"RSS totals                server {f.get('server_rss_total_mb', '-')} MiB, clients "
        f"{f.get('client_rss_total_mb', '-')} MiB; kernel TCP memory peak "
        f"{f.get('tcp_mem_peak_pages', '-')} pages",
        *([f"idle while held          server {idle['server_cpu_percent']}%, clients "
           f"{idle['client_cpu_percent']}% of a core, box {idle['machine_cpu_percent']}%; "
           f"wake-ups/s server {idle['server_wakeups_per_s']}, clients "
           f"{idle['client_wakeups_per_s']}"] if (idle := f.get("idle")) else []),
        f"worst loop lag / GC pause {f.get('loop_lag_max_ms', '-')} ms / "
        f"{f.get('gc_pause_max_ms', '-')} ms, of it the collector's own CPU "
        f"{f.get('gc_cpu_max_ms', '-')} ms (server SETs, last 300 s; per phase below)", ""]
    head = ("phase", "target", "served/s", "srv±2%", "cli±2%", "p50", "p99", "p999",
            "srv µs/req", "cli µs/req", "srv CPU%", "cli CPU%", "box CPU%", "srv wk/s",
            "cli wk/s", "lag ms", "cli lag", "GC ms")
    fmt = ("{:<6}{:>8}{:>10}{:>8}{:>8}{:>8}{:>8}{:>8}{:>11}{:>11}{:>9}{:>9}{:>9}{:>9}{:>9}"
           "{:>8}{:>8}{:>7}")
    lines.append("by arrival at the server and answer at the clients; µs/req and wake-ups "
                 "(voluntary context switches) over the phase's steady seconds; lag: the "
                 "SETs' worst loop lag, cli lag: the latest client pacer (sends that late)")
    lines.append(fmt.format(*head))

    for r in f.get("phases", []):
        within, answered = r.get("server_within"), r.get("client_within")
        r = {k: "-" if v is None else round(v, 1) if isinstance(v, float) else v
             for k, v in r.items()}
        lines.append(fmt.format(
            r["phase"], r["target"], r["server_qps"], percent(within), percent(answered),
            r.get("latency_p50_ms") or "-", r.get("latency_p99_ms") or "-",
            r.get("latency_p999_ms") or "-", r.get("server_cpu_us_per_request", "-"),
            r.get("client_cpu_us_per_request", "-"), r.get("server_cpu_percent", "-"),
            r.get("client_cpu_percent", "-"), r.get("machine_cpu_percent", "-"),
            r.get("server_wakeups_per_s", "-"), r.get("client_wakeups_per_s", "-"),
            r.get("loop_lag_max_ms", "-"), r.get("client_lag_max_ms", "-"),
            r.get("gc_pause_max_ms", "-")))
    late = [f"{r['phase']} {r.get('sent_late', 0):,}" for r in f.get("phases", [])]
    if late:
        lines.append("sent by the clients only after their second had ended (their pacer "
                     "that late; no server serves those within it): " + ", ".join(late))
        lines.append(f"client pacers stalled ({STALL_S * 1000:.0f} ms or more behind a tick): "
                     + ", ".join(f"{r['phase']} {stall_share(r)}" for r in f.get("phases", [])))
        lines.append("SETs' loop lag, each second by its worst tick: " + ", ".join(
            f"{r['phase']} {lag_share(r)}" for r in f.get("phases", [])))
    ramp = f.get("ramp")
    if ramp:
        lines.append(f"ramp (+{ramp['step']}/s a step, a failing step tried "
                     f"{ramp.get('attempts', 1)} times): highest passing rate "
                     f"{ramp['highest_passing'] or 'none'}/s at {f['target_connections']} "
                     f"connections; first failing step {ramp['first_failing'] or 'none'}"
                     + (f" ({'; '.join(ramp.get('why', []))})" if ramp.get("why") else "")
                     + "; the verdict judges the planned phases")
    lines += floor_lines(f)
    lines += ["", ledger_line(f),
              f"group envelopes: {f.get('group')}",
              f"errors by kind: {f.get('errors') or 'none'}",
              *([f"WARNING: only {f.get('sets_up')} of {f.get('sets')} SETs answered the final "
                 "/stats (saturated?): server figures are partial"]
                if f.get("sets_up") is not None and f.get("sets_up") != f.get("sets") else []),
              f"run dir: {f['run_dir']}",
              *(verdict_lines(f) if "passed" in f else [])]
    return "\n".join(lines)


def inner(args: settings.Config) -> int:
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = ScaleRun(args, run_dir)
    result: dict[str, Any] = {"target_connections": args.connections, "hosts": args.hosts,
                              "phases_planned": list(args.phases), "ticks": args.ticks,
                              "quiet_ms": args.quiet_ms, "client_nice": args.client_nice,
                              "run_dir": str(run_dir),
                              "netns": args.netns_name, "tcp_ehash_entries": tcp_ehash(),
                              "hot_path": hotpath.describe()}

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    code = 0
    try:
        if args.floor != "no" and args.phases:
            result["floor"] = run_floor(args, run_dir / "floor")
        run.start_server()
        result["sets"] = run.sets
        if args.clients == "floor":
            result.update(server_under_c_clients(args, run))
        else:
            time.sleep(1.0)
            run.measure_idle("mem_empty")
            run.start_clients()
            run.measure_idle("mem_clients_started")
            run.connect_all()
            time.sleep(2.0)
            run.measure_idle("mem_connected")
            run.per_connection()
            run.hold()
            if args.phases:
                run.run_phases()
    except OutOfResource as exc:
        run.figures["stopped_by"] = str(exc)
        sys.stderr.write(f"\nstopping early: {exc}\n")
        code = 2
    except KeyboardInterrupt:
        run.figures["stopped_by"] = "interrupted"
        code = 130
    except (RuntimeError, OSError) as exc:
        run.figures["stopped_by"] = f"error: {exc}"
        sys.stderr.write(f"\nscale run failed: {exc}\n")
        code = 1
    try:
        if run.fleet.server and run.fleet.server.exited() is None and args.clients != "floor":
            if "mem_connected" not in run.figures:  # stopped while connecting
                run.measure_idle("mem_connected")
                run.per_connection()
            result.update(run.collect())
    except (OSError, ValueError) as exc:
        log.warning("could not collect the final figures: %s", exc)
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        run.fleet.stop()
    result.update(run.figures)
    attach_floor(result)
    if result.get("stopped_by"):  # a run cut short passes nothing, whatever its phases did
        result["passed"] = False
        result["reasons"] = [*result.get("reasons", []),
                             f"stopped early: {result['stopped_by']}"]
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if (run_dir / "seconds.jsonl").exists():
        try:
            write_graphs(run_dir)
        except Exception as exc:  # the figures matter more than the pictures
            log.warning("graphs failed: %s", exc)
    print(print_table(result))
    if code == 0 and result.get("passed") is False:
        code = EXIT_VERDICT_FAILED  # ran to the end, and a phase was not served
    return code


def auto_ticks(connections: int) -> int:
    """Pacing ticks a second when ``--ticks auto``: fewer where many client processes tick.

    Every tick wakes every client worker, and each wake-up costs far more
    than its few writes on a box shared by ~100 processes. At one million
    connections (51 workers, 30,000/s, two runs each) 10 ticks instead of
    20 took the clients from 14.8-15.3 to 12.6-13.2 µs a request and the
    requests they sent only after their second from 8,252-16,782 to
    1,416-1,945; at 200k (17 workers) the same change doubled the p99 at
    30,000/s (19.5 -> 38.9 ms) for no gain, so 20 stays below 500k.
    """
    return FEW_TICKS if connections >= MANY_CONNECTIONS else TICKS


def auto_quiet_ms(ticks: int) -> int:
    """The quiet end of each second when ``--quiet-ms auto``: 200 ms at 20 ticks, else 100.

    17-68 client processes niced on the server's two cores stall 150-350 ms
    now and then. At 200k (20 ticks) and 60,000/s, with 100 ms all four
    40 s runs had requests sent after their second (394-2,558; 94.9% of
    seconds) and with 200 ms two of two had none (100.0%). At one million
    (10 ticks) 200 ms left 8 of 10 ticks to a second's load: 30,000/s
    failed twice in one run and 35,000/s twice in another, where 100 ms had
    passed up to 40,000/s (docs/benchmarks-history.rst, round of 1 December night).
    """
    return QUIET_MS_MANY_TICKS if ticks >= TICKS else QUIET_MS_FEW_TICKS


def auto_client_nice(connections: int) -> int:
    """The co-located clients' nice when ``--client-nice auto``: 10, or 5 from 500k connections.

    The clients are niced so that the SETs come first on the shared box. At
    one million the failing seconds are the clients' instead: 51 niced
    workers wait for a core past their ticks. Alternating runs at one
    million and 40,000/s (``--hold 10 --phase-seconds 60 --floor no``, two
    each): nice 10 served 64.4% and 86.4% of seconds within ±2%, its pacers
    1,754 and 1,771 times 100 ms or more late, 74,828 and 4,714 requests
    sent after their second; nice 5 96.6% and 93.2%, 1,077 and 1,062,
    1,048 and 2,882 — and cheaper on both sides (SETs 16.5-16.8 µs a
    request against 18.3-18.8, clients 11.4-11.7 against 12.3-14.0). At
    200k nice 5 measured within the noise of 10 (docs/benchmarks-history.rst),
    so 10 stays below 500k.
    """
    return CLIENT_NICE_MANY if connections >= MANY_CONNECTIONS else CLIENT_NICE


def parse(argv: list[str] | None) -> settings.Config:
    """The [scale] section of the settings table (flags, TOML, HONGBAO_SCALE_* ...)."""
    def hidden(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--netns-name", default="", help=argparse.SUPPRESS)

    config = settings.parse("scale", argv, description=__doc__.splitlines()[0], extra=hidden)
    if not config.ticks:
        config = config.replace(ticks=auto_ticks(config.connections))
    if config.quiet_ms < 0:
        config = config.replace(quiet_ms=auto_quiet_ms(config.ticks))
    if config.client_nice is None:
        config = config.replace(client_nice=auto_client_nice(config.connections))
    if not config.run_dir:
        run_dir = ROOT / "runs" / time.strftime("scale-%Y%m%d-%H%M%S", time.gmtime())
        config = config.replace(run_dir=str(run_dir))
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s scale %(levelname)s %(message)s")
    use_netns = args.netns == "yes" or (args.netns == "auto" and netns.available())
    if args.netns_name or not use_netns:
        return inner(args)
    name = f"hbscale{os.getpid()}"
    refused = netns.create(name, netns.SCALE_SYSCTLS, netns.ehash_size(args.connections))
    for line in refused:
        log.warning("netns sysctl not set: %s", line)
    argv_inner = [*(argv if argv is not None else sys.argv[1:]), "--netns-name", name,
                  "--run-dir", args.run_dir]
    cmd = netns.command_in(name, [sys.executable, "-m", "app.bench.scale", *argv_inner])
    log.info("running inside network namespace %s (deleted afterwards)", name)
    env = {**os.environ, "HONGBAO_TCP_MEM_LIMIT": str(tcp_memory()[1])}
    child = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        return child.wait()
    finally:
        netns.delete(name)


if __name__ == "__main__":
    sys.exit(main())
