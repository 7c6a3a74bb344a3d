"""The one-machine smoke run: server, simulated client hosts, phases, envelopes, a verdict.

Run: ``make smoke`` (or ``python -m app.local.smoke --connections 20000 --hosts 3
--qps 6000``). Embedded defaults: a server with 4 SETs on a free port, 3
client agents bound to 127.1.0.1, 127.1.0.2, ... holding 20,000 connections
in all, then the phases idle -> 30% -> 60% of the peak QPS (changed on the
same wall-clock second on every host with ``/qps?total=T&at=S``), shake
envelopes and group envelopes (with claims) during the loaded phases.

It writes ``runs/<timestamp>/seconds.jsonl`` (one object per second),
``summary.json``, the process logs and the graphs, prints a summary table,
and exits non-zero when the ledger does not balance or a loaded phase has
fewer than 95% of its steady seconds within ±2% of the target (at the
client and at the server). Every process it starts runs in its own session
and is stopped by PID on the way out, also on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import logging
import math
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from app import settings
from app.local.procs import stop_group
from app.local.summary import (
    Phase,
    build_seconds,
    summarise,
    write_graphs,
    write_seconds,
    write_table,
)

log = logging.getLogger("hongbao.smoke")

ROOT = Path(__file__).resolve().parents[2]
SERVER_READY = re.compile(r"hongbao-server listening port=(\d+) control=([\d.]+):(\d+)")
CLIENT_READY = re.compile(r"hongbao-client listening control=([\d.]+):(\d+)")
START_TIMEOUT = 60.0  # seconds for a process to print its ready line
LOGIN_TIMEOUT = 90.0  # seconds for every connection to log in
STOP_TIMEOUT = 10.0  # seconds a process has after SIGTERM before SIGKILL of its group
DRAIN_SECONDS = 2  # after the last phase: in-flight answers arrive, seconds complete
SHAKE_ENVELOPE_SHARE = 0.05  # shake envelopes generated per second, as a share of peak QPS
GROUPS_PER_SECOND = 20  # group envelopes created per second during the loaded phases
PER_SOURCE = 14_000  # connections per source address (see README, "Client agent")
PER_SET = 18_000  # connections per SET under the 20,000 descriptor limit


@dataclass
class Service:
    """A child process in its own session, known by PID, stopped by PID."""

    name: str
    cmd: list[str]
    log_path: Path
    ready: re.Pattern[str]
    proc: subprocess.Popen | None = None
    match: re.Match[str] | None = None

    def start(self, timeout: float = START_TIMEOUT) -> re.Match[str]:
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                         stderr=log_file, start_new_session=True, text=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            # wait for a line with a timeout: a process that hangs silently must not hang us
            readable, _, _ = select.select([self.proc.stdout], [], [], deadline - time.time())
            if not readable:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            self.match = self.ready.search(line)
            if self.match:
                return self.match
        raise RuntimeError(f"{self.name} did not start within {timeout:.0f}s; "
                           f"see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM by PID, a bounded wait, then SIGKILL of its process group."""
        if self.proc is not None:
            stop_group(self.proc, STOP_TIMEOUT, self.name)


def stop_services(services: list[Service | None]) -> None:
    """Stop each service in turn; one that fails to stop does not spare the others."""
    for service in services:
        if service is not None:
            try:
                service.stop()
            except Exception:
                log.exception("stopping %s", service.name)


def process_figures(roots: list[int]) -> tuple[float, int]:
    """(CPU seconds, resident bytes) of the processes ``roots`` and all their children."""
    cpu, rss = 0.0, 0
    for pid in roots:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                with proc.oneshot():
                    times, memory = proc.cpu_times(), proc.memory_info()
            except psutil.Error:
                continue
            cpu += times.user + times.system
            rss += memory.rss
    return round(cpu, 3), rss


def host_counters() -> dict[str, dict[str, int]]:
    """This machine's packets and bytes in/out over all interfaces, cumulative.

    The smoke run's simulated hosts share this machine (and its loopback), so
    the run has one host to show: the one the server and the clients run on.
    """
    c = psutil.net_io_counters()
    return {socket.gethostname(): {"packets_in": c.packets_recv, "packets_out": c.packets_sent,
                                   "bytes_in": c.bytes_recv, "bytes_out": c.bytes_sent}}


def snapshot(server_api: str, polled: dict[int, dict[str, Any]], phases: list[Phase],
             now: float, timeout: float = 10.0, server_pid: int | None = None,
             client_pids: tuple[int, ...] = ()) -> tuple[dict, dict, Phase | None] | None:
    """Record second ``now``: the server's cumulative ledger and connections, and
    (with the PIDs) CPU seconds and resident memory of both ends and the host's
    packet counters, for the per-second records.

    Returns (stats, the last complete second's row, its phase), or None when
    /stats failed: a missed snapshot is covered by the next one.
    """
    try:
        stats = get_json(server_api, "/stats?seconds=3", timeout=timeout)
    except (OSError, ValueError) as exc:
        log.warning("server /stats failed: %s", exc)
        return None
    record = {"connections": stats["connections"], "ledger": stats["ledger"],
              "group": stats["group"], "time": time.time(), "net": host_counters()}
    if server_pid is not None:
        record["server_cpu_seconds"], record["server_rss_bytes"] = process_figures([server_pid])
        record["client_cpu_seconds"], record["client_rss_bytes"] = process_figures(
            list(client_pids))
    polled[int(now)] = record
    last = stats["per_second"][-1] if stats["per_second"] else {"second": 0, "shakes": 0}
    phase = next((p for p in phases if p.start <= last["second"] < p.end), None)
    return stats, last, phase


def get_json(address: str, path: str, timeout: float = 10.0, tries: int = 1) -> dict[str, Any]:
    """GET a control API's JSON; ``tries`` > 1 retries errors (a busy server may answer 500)."""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
            if attempt == tries - 1:
                raise
            log.warning("GET %s%s failed (%s); retrying", address, path, exc)
            time.sleep(0.5)
    raise AssertionError("unreachable")


@dataclass
class Smoke:
    """One run: its services, its phases and what it polled each second."""

    config: settings.Config
    run_dir: Path
    server: Service | None = None
    clients: list[Service] = field(default_factory=list)
    server_api: str = ""
    client_apis: list[str] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    polled: dict[int, dict[str, Any]] = field(default_factory=dict)  # second -> server snapshot

    def start_server(self) -> None:
        c = self.config
        budget = max(100_000, c.qps * 2)  # the smoke measures accuracy, not overload
        if c.sources.get("shake_budget") != "default":  # asked for: a server slower than the rate
            budget = c.shake_budget
        sets = max(c.sets, math.ceil(c.connections / PER_SET))
        self.config = c.replace(sets=sets)
        self.server = Service("server", [
            sys.executable, "-m", "app.server", "--host", "127.0.0.1", "--port", "0",
            "--control", "127.0.0.1:0", "--sets", str(sets), "--journal-dir",
            str(self.run_dir / "journal"), "--shake-budget", str(budget),
            "--target-connections", str(c.connections), "--log-level", c.log_level,
            *(["--statsd", c.statsd] if c.statsd else [])],
            self.run_dir / "server.log", SERVER_READY)
        match = self.server.start()
        self.port = int(match.group(1))
        self.server_api = f"{match.group(2)}:{match.group(3)}"

    def start_clients(self) -> None:
        c = self.config
        for k in range(c.hosts):
            first = 1 + k * c.connections // c.hosts
            last = (k + 1) * c.connections // c.hosts
            # host k binds 127.1.0.(k+1), and 127.1.1.(k+1), ... when it needs more ports
            sources = ",".join(f"127.1.{i}.{k + 1}"
                               for i in range(math.ceil((last - first + 1) / PER_SOURCE)))
            service = Service(f"client{k}", [
                sys.executable, "-m", "app.client", "--server", f"127.0.0.1:{self.port}",
                "--server-control", self.server_api, "--users", f"{first}-{last}",
                "--control", "127.0.0.1:0", "--source", sources,
                "--host-name", f"smoke{k}", "--hosts", str(c.hosts), "--host-index", str(k),
                "--qps", "0", "--pacing", c.pacing, "--ticks", str(c.ticks),
                "--connect-rate", str(c.connect_rate), "--log-level", c.log_level,
                *(["--statsd", c.statsd] if c.statsd else [])],
                self.run_dir / f"client{k}.log", CLIENT_READY)
            self.clients.append(service)
            match = service.start()
            self.client_apis.append(f"{match.group(1)}:{match.group(2)}")

    def stop_all(self) -> None:
        stop_services([*self.clients, self.server])

    def wait_logged_in(self) -> float:
        started = time.time()
        while time.time() - started < LOGIN_TIMEOUT:
            up = sum(get_json(a, "/health")["connections"] for a in self.client_apis)
            progress(f"logging in: {up}/{self.config.connections} connections "
                     f"({time.time() - started:.0f}s)")
            if up >= self.config.connections:
                return time.time() - started
            self.check_alive()
            time.sleep(0.5)
        raise RuntimeError(f"only {up} of {self.config.connections} connections logged in "
                           f"within {LOGIN_TIMEOUT:.0f}s")

    def check_alive(self) -> None:
        for service in [self.server, *self.clients]:
            if service is not None and service.proc is not None and service.proc.poll() is not None:
                raise RuntimeError(f"{service.name} exited with {service.proc.returncode}; "
                                   f"see {service.log_path}")

    def set_total(self, total: int, at: int) -> None:
        for address in self.client_apis:
            get_json(address, f"/qps?total={total}&at={at}", tries=3)

    def cpu_seconds(self) -> float:
        # a ``since`` in the future: the CPU figure without the per-second history
        return sum(get_json(a, f"/stats?since={2**39}", tries=3)["cpu_seconds"]
                   for a in self.client_apis)

    def run_phases(self) -> None:
        c = self.config
        plan = [("idle", 0, c.idle_seconds),
                ("30%", math.ceil(c.qps * 0.3), c.phase_seconds),
                ("60%", math.ceil(c.qps * 0.6), c.phase_seconds)]
        at = int(time.time()) + 2
        for name, total, seconds in plan:
            self.set_total(total, at)
            self.phases.append(Phase(name, total, at, at + seconds))
            at += seconds
        self.set_total(0, at)
        loaded = [p for p in self.phases if p.target]
        rate = max(1, int(c.qps * SHAKE_ENVELOPE_SHARE))
        envelopes_started = False
        while time.time() < at + DRAIN_SECONDS:
            now = time.time()
            if not envelopes_started and loaded and now >= loaded[0].start:
                span = loaded[-1].end - loaded[0].start
                get_json(self.server_api, f"/yaohongbao?qps={rate}&sum={rate * span * 4 // 5}",
                         tries=3)
                get_json(self.server_api, f"/fahongbao?qps={GROUPS_PER_SECOND}&sum="
                                          f"{GROUPS_PER_SECOND * (span - 5)}&min=1"
                                          f"&max={c.connections}", tries=3)
                envelopes_started = True
            for phase in self.phases:
                if phase.start <= now < phase.end and phase.cpu_start is None \
                        and now >= phase.start + 1:
                    phase.cpu_start, phase.cpu_start_time = self.cpu_seconds(), now
                if phase.end <= now and phase.cpu_end is None and phase.cpu_start is not None:
                    phase.cpu_end, phase.cpu_end_time = self.cpu_seconds(), now
            self.poll_second(now)
            self.check_alive()
            time.sleep(max(0.05, 1.0 - (time.time() % 1.0) + 0.3))
        for phase in self.phases:  # a phase whose end the loop overslept
            if phase.cpu_start is not None and phase.cpu_end is None:
                phase.cpu_end, phase.cpu_end_time = self.cpu_seconds(), time.time()

    def poll_second(self, now: float) -> None:
        """Snapshot the server's cumulative ledger and connections; print the progress line."""
        snap = snapshot(self.server_api, self.polled, self.phases, now,
                        server_pid=self.server.proc.pid,
                        client_pids=tuple(c.proc.pid for c in self.clients))
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
        since = self.phases[0].start - 1
        for _ in range(5):  # a busy SET can miss one /stats; its part must be in the verdict
            server = get_json(self.server_api, "/stats?seconds=300", tries=5)
            if server.get("sets_up", server.get("sets")) == server.get("sets"):
                break
            time.sleep(1.0)
        clients = [get_json(a, f"/stats?since={since}&hist=1", tries=3)
                   for a in self.client_apis]
        seconds = build_seconds(server, clients, self.polled, self.phases[0].start,
                                self.phases[-1].end)
        return seconds, {"server": server, "clients": clients}


_last_progress = [0.0]


def progress(text: str) -> None:
    """One line that rewrites itself on a terminal, a line every 5 s in a log."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K" + text)
        sys.stderr.flush()
    elif time.time() - _last_progress[0] >= 5:
        _last_progress[0] = time.time()
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


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
        smoke.start_server()
        smoke.start_clients()
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
        smoke.stop_all()
    write_seconds(run_dir, seconds)
    summary = summarise(smoke.config, smoke.phases, seconds, raw, login_seconds,
                        time.time() - began)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    graphs = write_graphs(run_dir)
    print(write_table(summary, run_dir, graphs))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
