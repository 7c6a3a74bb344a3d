"""The one-machine smoke run: server, simulated client hosts, phases, envelopes, a verdict.

Run: ``make smoke`` (or ``python -m app.local.smoke --connections 20000 --hosts 3
--qps 6000``). Embedded defaults: a server with 4 SETs on a free port, 3
client agents bound to 127.1.0.1, 127.1.0.2, ... holding 20,000 connections
in all, then the phases idle -> 30% -> 60% of the peak QPS (changed on the
same wall-clock second on every host with ``/qps?total=T&at=S``), shake
envelopes and group envelopes (with claims) during the loaded phases.

It writes ``runs/<timestamp>/seconds.jsonl`` (one object per second),
``summary.json``, the process logs and the graphs, prints a summary table,
and exits non-zero when the ledger does not balance or a loaded phase fails
(app.local.summary: fewer than 95% of its steady seconds served within ±2%
of the target at the server or the clients, or p99 >= 100 ms). Every
process it starts leads its own process group and is stopped by PID on the way
out, also on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app import settings
from app.local.runner import ROOT, LocalFleet, get_json, progress
from app.local.summary import (
    Phase,
    build_seconds,
    summarise,
    write_graphs,
    write_seconds,
    write_table,
)

log = logging.getLogger("hongbao.smoke")

LOGIN_TIMEOUT = 90.0  # seconds for every connection to log in
DRAIN_SECONDS = 2  # after the last phase: in-flight answers arrive, seconds complete
SHAKE_ENVELOPE_SHARE = 0.05  # shake envelopes generated per second, as a share of peak QPS
GROUPS_PER_SECOND = 20  # group envelopes created per second during the loaded phases
PER_SOURCE = 14_000  # connections per source address (see README, "Client agent")
PER_SET = 18_000  # connections per SET under the 20,000 descriptor limit


@dataclass
class Smoke:
    """One run: its local fleet, its phases and what it polled each second."""

    config: settings.Config
    run_dir: Path
    fleet: LocalFleet = field(init=False)
    phases: list[Phase] = field(default_factory=list)
    polled: dict[int, dict[str, Any]] = field(default_factory=dict)  # second -> server snapshot

    def __post_init__(self) -> None:
        self.fleet = LocalFleet(self.run_dir, self.config.log_level, self.config.statsd)

    def start(self) -> None:
        """The server (SETs sized for the connections) and the simulated client hosts."""
        c = self.config
        budget = max(100_000, c.qps * 2)  # the smoke measures accuracy, not overload
        if c.sources.get("shake_budget") != "default":  # asked for: a server slower than the rate
            budget = c.shake_budget
        sets = max(c.sets, math.ceil(c.connections / PER_SET))
        self.config = c.replace(sets=sets)
        self.fleet.start_server(sets, ["--shake-budget", str(budget),
                                       "--target-connections", str(c.connections)])
        self.fleet.start_hosts(c.connections, c.hosts, PER_SOURCE, "smoke", pacing=c.pacing,
                               ticks=c.ticks, quiet_ms=c.quiet_ms, connect_rate=c.connect_rate)

    def wait_logged_in(self) -> float:
        started = time.time()
        up = 0
        while time.time() - started < LOGIN_TIMEOUT:
            up = self.fleet.connections()
            progress(f"logging in: {up}/{self.config.connections} connections "
                     f"({time.time() - started:.0f}s)")
            if up >= self.config.connections:
                return time.time() - started
            self.fleet.check_alive()
            time.sleep(0.5)
        raise RuntimeError(f"only {up} of {self.config.connections} connections logged in "
                           f"within {LOGIN_TIMEOUT:.0f}s")

    def cpu_seconds(self) -> float:
        # a ``since`` in the future: the CPU figure without the per-second history
        return sum(get_json(a, f"/stats?since={2**39}", tries=3)["cpu_seconds"]
                   for a in self.fleet.client_apis)

    def run_phases(self) -> None:
        c = self.config
        plan = [("idle", 0, c.idle_seconds),
                ("30%", math.ceil(c.qps * 0.3), c.phase_seconds),
                ("60%", math.ceil(c.qps * 0.6), c.phase_seconds)]
        at = int(time.time()) + 2
        for name, total, seconds in plan:
            self.fleet.set_total(total, at)
            self.phases.append(Phase(name, total, at, at + seconds))
            at += seconds
        self.fleet.set_total(0, at)
        loaded = [p for p in self.phases if p.target]
        rate = max(1, int(c.qps * SHAKE_ENVELOPE_SHARE))
        envelopes_started = False
        while time.time() < at + DRAIN_SECONDS:
            now = time.time()
            if not envelopes_started and loaded and now >= loaded[0].start:
                span = loaded[-1].end - loaded[0].start
                self.fleet.start_envelopes(rate, rate * span * 4 // 5, GROUPS_PER_SECOND,
                                           GROUPS_PER_SECOND * (span - 5), c.connections)
                envelopes_started = True
            for phase in self.phases:
                if phase.start <= now < phase.end and phase.cpu_start is None \
                        and now >= phase.start + 1:
                    phase.cpu_start, phase.cpu_start_time = self.cpu_seconds(), now
                if phase.end <= now and phase.cpu_end is None and phase.cpu_start is not None:
                    phase.cpu_end, phase.cpu_end_time = self.cpu_seconds(), now
            self.poll_second(now)
            self.fleet.check_alive()
            time.sleep(max(0.05, 1.0 - (time.time() % 1.0) + 0.3))
        for phase in self.phases:  # a phase whose end the loop overslept
            if phase.cpu_start is not None and phase.cpu_end is None:
                phase.cpu_end, phase.cpu_end_time = self.cpu_seconds(), time.time()

    def poll_second(self, now: float) -> None:
        """Snapshot the server's cumulative ledger and connections; print the progress line."""
        snap = self.fleet.snapshot(self.polled, self.phases, now)
        if snap is None:
            return
        stats, last, phase = snap
        second = int(now)
        ledger = stats["ledger"]
        progress(f"t={second - self.phases[0].start:+4d}s phase {phase.name if phase else '-':>4} "
                 f"target {phase.target if phase else 0:>6} server {last['shakes']:>6}/s "
                 f"conns {stats['connections']:>6} generated {ledger['generated']['count']:>6} "
                 f"granted {ledger['granted']['count']:>6} "
                 f"ledger {'ok' if ledger.get('balanced') else 'OFF'}")

    def collect(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        # a busy SET can miss one /stats; its part must be in the verdict
        server = self.fleet.server_stats(300)
        clients = self.fleet.client_stats(self.phases[0].start - 1)
        seconds = build_seconds(server, clients, self.polled, self.phases[0].start,
                                self.phases[-1].end)
        return seconds, {"server": server, "clients": clients}


def main(argv: list[str] | None = None) -> int:
    """``python -m app.local.smoke``: run it all, print the summary, exit 0 only on a pass."""
    config = settings.parse("smoke", argv, description=__doc__.split("\n")[0])
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s smoke %(levelname)s %(message)s")
    run_dir = ROOT / config.run_dir / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir.mkdir(parents=True, exist_ok=True)
    smoke = Smoke(config, run_dir)

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    began = time.time()
    try:
        smoke.start()
        login_seconds = smoke.wait_logged_in()
        smoke.run_phases()
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        seconds, raw = smoke.collect()
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted; stopping everything\n")
        return 130
    except (RuntimeError, OSError, urllib.error.URLError) as exc:
        sys.stderr.write(f"\nsmoke failed: {exc}\n")
        return 1
    finally:
        smoke.fleet.stop()
    write_seconds(run_dir, seconds)
    summary = summarise(smoke.config, smoke.phases, seconds, raw, login_seconds,
                        time.time() - began)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    graphs = write_graphs(run_dir)
    print(write_table(summary, run_dir, graphs))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
