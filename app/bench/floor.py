"""The floor of the scale bench: the same traffic through a minimal C server and client.

Why: CPU per request on a shared two-core machine moves by tens of percent
between runs, so the bench judges hongbao against what the same traffic
costs programs with no Python and no logic, measured in the same run:
``floor.c`` compiled here with ``cc -O2`` into the run directory. The
layout mirrors the real run: one server process per ``SERVER_CONNECTIONS``
connections sharing the port with SO_REUSEPORT, each simulated host's users
split over as many client processes as the agent would start, the same
ticks a second, one write per request, source addresses with
IP_BIND_ADDRESS_NO_PORT. It runs before hongbao's processes start (never
both at once) and leaves no TIME_WAIT behind (its clients reset on exit).

Without a C compiler the bench falls back to the syscall floor
(``syscall_floor`` below): one read and one write per request.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from app import settings
from app.bench import cpu
from app.client.agent import PER_PROCESS
from app.client.histogram import Histogram
from app.client.schedule import quiet_ticks
from app.local.runner import Service, niced, stop_services
from app.local.summary import REQUIRED, TOLERANCE, loop_lag_seconds

log = logging.getLogger("hongbao.floor")

SOURCE = Path(__file__).with_name("floor.c")
SERVER_CONNECTIONS = 19_500  # per server process, as the reference measurement
ADDRESS_CONNECTIONS = 10_000  # per source address (the scale bench's figure)
CONNECT_RATE = 20_000  # attempts a second over all floor clients


def compile_floor(out_dir: Path) -> Path | None:
    """``floor.c`` built into ``out_dir``; None when there is no C compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    binary = out_dir / "floor"
    done = subprocess.run([cc, "-O2", "-o", str(binary), str(SOURCE)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        log.warning("floor.c did not compile (%s): %s", cc, done.stderr.strip()[-500:])
        return None
    return binary


def processes(services: list[Service]) -> list[psutil.Process]:
    """The live processes of ``services``, for CPU figures."""
    out = []
    for service in services:
        try:
            out.append(psutil.Process(service.pid))
        except psutil.NoSuchProcess:
            pass
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_layout(connections: int, hosts: int) -> list[tuple[int, int]]:
    """``(first userid, count)`` per client process: each host split as the agent splits it."""
    out = []
    for k in range(hosts):
        first = 1 + k * connections // hosts
        n = (k + 1) * connections // hosts - first + 1
        parts = max(1, math.ceil(n / PER_PROCESS))
        out += [(first + i * n // parts, (i + 1) * n // parts - i * n // parts)
                for i in range(parts)]
    return [(f, n) for f, n in out if n > 0]


def within_share(counts: dict[int, int], seconds: range, target: int) -> float:
    """Share of ``seconds`` whose count is within ±2% of ``target``."""
    return sum(abs(counts.get(t, 0) - target) <= TOLERANCE * target
               for t in seconds) / max(1, len(seconds))


@dataclass
class ExternalServer:
    """A server the floor's C clients load instead of the C servers (``measure``'s ``server``)."""

    port: int
    processes: Callable[[], list[psutil.Process]]
    arrivals: Callable[[], dict[int, int]]  # served per second, by arrival


class FloorRun:
    """One floor run: start, log everyone in, run the phases, read the figures."""

    def __init__(self, binary: Path, run_dir: Path, connections: int, hosts: int,
                 ticks: int, server: ExternalServer | None = None, client_nice: int = 0,
                 quiet: int = 0, groups_per_s: int = 0) -> None:
        self.binary, self.dir = binary, run_dir
        self.groups_per_s = groups_per_s  # group envelopes the C servers push, fleet-wide
        self.connections, self.hosts, self.ticks = connections, hosts, ticks
        self.quiet = quiet  # the last ticks of a second that send nothing, as hongbao's
        self.client_nice = client_nice  # as hongbao's co-located clients: the same scheduling
        self.external = server  # another server (hongbao's) instead of the C servers
        self.servers: list[Service] = []
        self.clients: list[Service] = []
        self.figures: dict[str, Any] = {}

    def server_processes(self) -> list[psutil.Process]:
        return self.external.processes() if self.external else processes(self.servers)

    def server_seconds(self) -> tuple[dict[int, int], dict[int, float]]:
        """Per second: requests served by arrival, and the servers' worst loop lag (ms).

        One pass over the C servers' files ("second arrivals lateness_us
        pushes claims"; the group totals go to ``figures``); with another
        server (``external``) its arrivals, and no loop lag of ours.
        """
        if self.external:
            return self.external.arrivals(), {}
        arrival: dict[int, int] = {}
        lag: dict[int, float] = {}
        group = self.figures.setdefault("group", {"pushed": 0, "claims_served": 0})
        for path in self.dir.glob("server*.txt"):
            for line in path.read_text().split("\n"):
                if line:
                    t, n, lag_us, pushed, claims = map(int, line.split())
                    arrival[t] = arrival.get(t, 0) + n
                    lag[t] = max(lag.get(t, 0.0), lag_us / 1000)
                    group["pushed"] += pushed
                    group["claims_served"] += claims
        return arrival, lag

    def _service(self, name: str, args: list[str], ready: str, nice: int = 0) -> Service:
        return Service(name, niced([str(self.binary), *args], nice), self.dir / f"{name}.log",
                       re.compile(ready), stdin=True)

    def start(self, connect_timeout: float) -> None:
        port = self.external.port if self.external else free_port()
        n_servers = 0 if self.external else max(1, math.ceil(self.connections / SERVER_CONNECTIONS))
        for k in range(n_servers):
            server = self._service(f"server{k}", ["server", str(port),
                                                  str(self.dir / f"server{k}.txt"),
                                                  str(self.groups_per_s), str(n_servers), str(k)],
                                   "^listening")
            self.servers.append(server)
            server.start(timeout=30)
        layout = client_layout(self.connections, self.hosts)
        rate = max(1, CONNECT_RATE // len(layout))
        started = time.time()
        for g, (first, n) in enumerate(layout):
            addresses = max(1, math.ceil(n / ADDRESS_CONNECTIONS))
            # 127.200+ never meets the scale run's 127.1+ sources
            sources = ",".join(f"127.{200 + g // 250}.{g % 250}.{i + 1}"
                               for i in range(addresses))
            client = self._service(
                f"client{g}", ["client", str(port), sources, str(first), str(n), str(self.ticks),
                               str(rate), str(len(layout)), str(g),
                               str(self.dir / f"client{g}.jsonl"), str(self.quiet)], "^ready",
                self.client_nice)
            self.clients.append(client)
            client.launch()
        for client in self.clients:  # every one logged in within connect_timeout, all told
            client.wait_ready(max(0.0, started + connect_timeout - time.time()))
        self.figures["login_seconds"] = round(time.time() - started, 1)
        self.figures["processes"] = {"servers": len(self.servers), "clients": len(self.clients)}

    def run_phases(self, phases: list[int], seconds: int) -> list[tuple[int, int, int]]:
        """Run every phase; return ``(qps, first second, end second)`` of each."""
        start = int(time.time()) + 2
        plan = " ".join(f"{q} {seconds}" for q in phases)
        for client in self.clients:
            client.send_line(f"{start} {plan}")
        spans, at = [], start
        for q in phases:
            spans.append((q, at, at + seconds))
            at += seconds
        marks: dict[int, cpu.Mark] = {}
        for q, first, end in spans:  # CPU over each phase from its second second to its end
            for when in (first + 1, end):
                time.sleep(max(0.0, when - time.time()))
                marks[when] = cpu.mark(self.server_processes(), processes(self.clients))
            self.figures.setdefault("cpu", {})[q] = (marks[first + 1], marks[end])
        for client in self.clients:
            client.proc.wait(timeout=60)
        return spans

    def stop(self) -> None:
        stop_services([*self.clients, *self.servers])

    def summarise(self, spans: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
        arrival, lag = self.server_seconds()
        answered: dict[int, int] = {}
        hists: dict[int, Histogram] = {}
        group = self.figures.setdefault("group", {})
        for path in self.dir.glob("client*.jsonl"):
            for line in path.read_text().split("\n"):
                if not line:
                    continue
                rec = json.loads(line)
                answered[rec["t"]] = answered.get(rec["t"], 0) + rec["answered"]
                for key in ("claims", "claimed"):  # sent by the clients, answered to them
                    group[key] = group.get(key, 0) + rec.get(key, 0)
                hists.setdefault(rec["t"], Histogram()).merge(rec["hist"])
        rows = []
        for q, first, end in spans:
            steady = range(first + 1, end)
            hist = Histogram()
            for t in range(first, end):
                hist.merge(hists.get(t, Histogram()))
            start_mark, end_mark = self.figures["cpu"][q]
            window = range(int(start_mark[0]), int(end_mark[0]))
            served = sum(answered.get(t, 0) for t in window)
            server_within = within_share(arrival, steady, q)
            client_within = within_share(answered, steady, q)
            rows.append({
                "target": q,
                "server_arrival_within": server_within, "client_answered_within": client_within,
                "passed": (min(server_within, client_within) >= REQUIRED
                           and (hist.percentile(99) or 0) < 100),
                "latency_p50_ms": hist.percentile(50), "latency_p99_ms": hist.percentile(99),
                # a SET's loop lag is taken over the whole phase too
                "loop_lag_max_ms": max((lag[t] for t in range(first, end) if t in lag),
                                       default=None),
                **loop_lag_seconds([lag[t] for t in range(first, end) if t in lag]),
                **cpu.costs(start_mark, end_mark, served),
            })
        return rows


def measure(run_dir: Path, connections: int, hosts: int, phases: list[int], seconds: int,
            ticks: int, connect_timeout: float = 600,
            server: ExternalServer | None = None, client_nice: int = 0,
            quiet_ms: int = 0, groups_per_s: int = 0) -> dict[str, Any]:
    """The floor's figures for this traffic, or the syscall floor without a compiler.

    ``groups_per_s``: group envelopes the C servers push while the phases
    run (each to three users, who claim it), as hongbao's bench generates:
    the same messages on both sides of the ratio. With ``server``, only the
    floor's C clients run, against that server: what a server serves when
    the load costs no more than the floor's.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    binary = compile_floor(run_dir)
    if binary is None:
        if server is not None:
            return {"kind": "none: no C compiler for the floor's clients", "phases": []}
        per = syscall_floor()["cpu_us_per_shake"]
        return {"kind": "syscall floor (no C compiler)",
                "phases": [{"target": q, "server_cpu_us_per_request": per,
                            "client_cpu_us_per_request": per} for q in phases]}
    run = FloorRun(binary, run_dir, connections, hosts, ticks, server, client_nice,
                   quiet_ticks(ticks, quiet_ms), groups_per_s)
    try:
        run.start(connect_timeout)
        spans = run.run_phases(phases, seconds)
    finally:
        run.stop()
    rows = run.summarise(spans)
    kind = ("the floor's C clients against another server" if server
            else "C epoll floor (app/bench/floor.c)")
    return {"kind": kind, **{k: v for k, v in run.figures.items() if k != "cpu"},
            "phases": rows}


def main(argv: list[str] | None = None) -> int:
    """``python -m app.bench.floor``: the floor alone, for comparing runs by hand."""
    import tempfile

    args = settings.parse("floor_bench", argv, description=__doc__.splitlines()[0])
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        result = measure(Path(tmp), args.connections, args.hosts, list(args.phases),
                         args.phase_seconds, args.ticks, quiet_ms=args.quiet_ms)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def syscall_floor(pairs: int = 500, rounds: int = 40) -> dict:
    """CPU of the two syscalls a shake costs any server here: read 16 B, write 28 B.

    No logic at all, loopback TCP, measured in this process: what a
    zero-overhead server would pay per shake on this machine (the kernel
    delivers a loopback write into the peer's socket inside the writer's
    syscall, so ``write`` carries most of it).
    """
    import resource
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(pairs)
    clients, servers = [], []
    for _ in range(pairs):
        c = socket.create_connection(listener.getsockname())
        s, _ = listener.accept()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clients.append(c)
        servers.append(s)
    request, answer = b"r" * 16, b"a" * 28
    spent = 0.0
    try:
        for _ in range(rounds):
            for c in clients:
                os.write(c.fileno(), request)
            before = resource.getrusage(resource.RUSAGE_SELF)
            for s in servers:
                os.read(s.fileno(), 4096)
                os.write(s.fileno(), answer)
            after = resource.getrusage(resource.RUSAGE_SELF)
            spent += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            for c in clients:
                os.read(c.fileno(), 4096)
    finally:
        for sock in (*clients, *servers, listener):
            sock.close()
    return {"cpu_us_per_shake": round(spent / (pairs * rounds) * 1e6, 2)}
