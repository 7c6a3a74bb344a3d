"""The client agent: one command per host, exact per-second load, no coordinator.

Run: ``python -m app.client --server 127.0.0.1:1025 --users 1-60000
--control 0.0.0.0:9090 --source 127.1.0.1 --hosts 17 --host-index 0``
(every flag also reads from ``--config`` TOML ``[client]`` and
``HONGBAO_<NAME>``; see ``app/settings.py``). Once serving it prints one line,
``hongbao-client listening control=HOST:PORT processes=P users=A-B
connections=N``, then logs on stderr only.

The agent is an ``app.arbiter.Arbiter`` (the process model the server's
supervisor shares): it splits the host's users over as many worker processes
(``app.client.worker``) as the descriptor limit needs (at most
``PER_PROCESS`` connections each), restarts a worker that dies or stops
reporting (the same backoff and liveness rule as a SET; a worker that cannot
boot halts the agent with exit 3), forwards QPS changes to every worker
stamped with the absolute tick they take effect at, and merges the workers'
per-second records into host-wide seconds served by ``/stats`` and flushed
to statsd (``hongbao.client.<host>.*``). ``/health`` and ``/stats`` report
the restarts.

The load rule lives in ``app.client.schedule``: in second t this host sends
exactly its share q, users chosen by the rotating window ``t*q mod n``.
Frames carry the second they belong to, so the server's per-second counts
(by frame timestamp) equal the sum of the hosts' shares.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import signal
import socket
import sys
import time
from collections import deque
from typing import Any

import gevent
import psutil
from gevent import subprocess
from gevent.event import AsyncResult, Event

from app import settings
from app.arbiter import EXIT_BOOT_ERROR, Arbiter, Slot
from app.client.api import build_api
from app.client.clock import clock_offset
from app.client.histogram import Histogram
from app.client.schedule import Timeline, split
from app.httpapi import serve
from app.metrics import system as sysmetrics
from app.metrics.statsd import Metrics

log = logging.getLogger("hongbao.client")

# Connections per worker: the 20,000 hard fd limit minus headroom (the worker keeps 64).
# Fewer, fuller workers wake less per request: at one million connections 3 workers a
# host instead of 4 (with COALESCE 10 ms) cut the clients' CPU from 29.1 to 24.6 µs a
# request at 30,000/s (scale bench, two runs of this session).
PER_PROCESS = 19_700
HISTORY = 900  # seconds of per-second records kept for /stats
CHANGE_LEAD_TICKS = 2  # an immediate /qps applies this many ticks ahead, so every worker has it
CLOCK_INTERVAL = 10.0  # seconds between clock-offset measurements
STOP_TIMEOUT = 3.0  # seconds a worker has to exit after "stop" before it is killed
COUNTERS = ("sent", "skipped", "answered", "served", "claims_sent", "claims_granted",
            "claim_amount", "shake_amount", "logins", "reconnects", "connects",
            "connect_failures", "lost", "errors", "ticks_skipped", "busy", "sent_late",
            "stalls", "stall_ms", "stall_cpu_ms")


class Child(Slot):
    """The master's record of one worker process (stable ``index`` across restarts)."""

    def __init__(self, index: int, begin: int, end: int) -> None:
        super().__init__(index, f"worker p{index}")
        self.begin = begin
        self.end = end
        self.last: dict[str, Any] = {}
        self.latency: dict[str, float | None] = {}
        self.coverage: AsyncResult | None = None


class Second:
    """One wall-clock second merged over the workers."""

    def __init__(self, t: int) -> None:
        self.t = t
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.results: dict[str, int] = {}
        self.hist = Histogram()
        self.connections = 0
        self.lag_ms = 0.0  # the latest worker's tick lag (its pacer woke that late)
        self.reported: set[int] = set()
        self.entry: dict[str, Any] = {}  # its record in the agent's history, once finished

    def add(self, record: dict[str, Any]) -> None:
        for key in COUNTERS:
            self.counts[key] += record.get(key, 0)
        for code, n in record.get("results", {}).items():
            self.results[code] = self.results.get(code, 0) + n
        self.hist.merge(record.get("hist", {}))
        self.connections += record.get("connections", 0)
        self.lag_ms = max(self.lag_ms, record.get("lag_ms", 0.0))
        self.reported.add(record["p"])


class Agent(Arbiter[Child]):
    """Workers, the qps timeline, merged seconds, metrics and the clock offset of one host."""

    def __init__(self, config: settings.Config) -> None:
        self.config = config
        first, last = config.users
        self.first = first
        self.n = last - first + 1
        if config.connections:
            self.n = min(self.n, config.connections)  # the first N users of the range
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        per_process = max(1, min(PER_PROCESS, hard - 300))
        processes = max(config.processes, math.ceil(self.n / per_process), 1)
        self.children = [Child(i, a, b) for i, (a, b) in enumerate(split(self.n, processes))]
        super().__init__(self.children, config.liveness_timeout, STOP_TIMEOUT)
        self.hosts = config.hosts
        self.host_index = config.host_index
        self.host = config.host_name or socket.gethostname().split(".")[0]
        self.qps = config.qps
        self.timeline = Timeline([(0, config.qps)])  # host QPS by the tick it applies from
        self.seconds: dict[int, Second] = {}  # waiting for every worker's record
        self.finished: dict[int, Second] = {}  # in history; a late record still merges in
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.totals = dict.fromkeys(COUNTERS, 0)
        self.results: dict[str, int] = {}
        self.hist = Histogram()
        self.offset: float | None = None
        self.rtt: float | None = None
        self.metrics = Metrics(f"hongbao.client.{sysmetrics.sanitize(self.host)}", config.statsd)
        self.net: Metrics | None = None
        self.quit = Event()  # set by signals and halt(); main() then calls stop()
        self.failed = ""

    # --- workers ----------------------------------------------------------------
    def spec(self, child: Child) -> dict[str, Any]:
        c = self.config
        now_tick = int(time.time() * c.ticks)
        return {"index": child.index, "first": self.first, "n": self.n, "begin": child.begin,
                "end": child.end, "server": list(c.server), "sources": list(c.source),
                "ticks": c.ticks, "pacing": c.pacing, "quiet_ms": c.quiet_ms,
                "changes": self.timeline.upcoming(now_tick),
                "connect_rate": c.connect_rate / len(self.children), "log_level": c.log_level}

    def spawn(self, child: Child) -> subprocess.Popen:
        child.last, child.latency = {}, {}  # a restarted worker starts with no connections
        known = len(self.timeline.changes)
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.client.worker", json.dumps(self.spec(child))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for tick, order, qps in self.timeline.changes:  # a /qps taken while it was starting
            if order >= known:
                proc.stdin.write((json.dumps({"qps": qps, "tick": tick}) + "\n").encode())
                proc.stdin.flush()
        gevent.spawn(self.read_reports, child, proc).name = f"reports-p{child.index}"
        log.info("worker p%d pid %d holds users %d-%d", child.index, proc.pid,
                 self.first + child.begin, self.first + child.end - 1)
        return proc

    def read_reports(self, child: Child, proc: subprocess.Popen) -> None:
        """Read the worker's per-second lines until it exits: each is a sign of life."""
        for line in proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("p%d: unreadable line %r", child.index, line[:80])
                continue
            if child.proc is proc:
                self.seen(child)
                child.ready.set()
            self.receive(child, record)

    def on_boot_error(self, child: Child, code: int) -> None:
        self.halt(f"worker p{child.index} cannot boot (exit {code})")

    def request_stop(self, child: Child) -> None:
        self.tell_one(child, {"stop": True})

    def tell_one(self, child: Child, message: dict[str, Any]) -> None:
        if child.running():
            try:
                child.proc.stdin.write((json.dumps(message) + "\n").encode())
                child.proc.stdin.flush()
            except OSError:
                pass  # it is dying; the arbiter restarts it

    def tell(self, message: dict[str, Any]) -> None:
        for child in self.children:
            self.tell_one(child, message)

    def set_qps(self, qps: int, at_second: int | None = None) -> dict[str, Any]:
        """Change this host's QPS from ``at_second`` (or from two ticks ahead)."""
        ticks = self.config.ticks
        soonest = int(time.time() * ticks) + CHANGE_LEAD_TICKS
        tick = soonest if at_second is None else max(soonest, at_second * ticks)
        previous, self.qps = self.qps, qps
        self.timeline.add(tick, qps)
        self.tell({"qps": qps, "tick": tick})
        log.info("qps %d -> %d from %.2f", previous, qps, tick / ticks)
        return {"qps": qps, "previous": previous, "from": tick / ticks, "tick": tick}

    def target(self, second: int) -> int:
        """The host QPS in effect at the start of ``second``."""
        return self.timeline.at(second * self.config.ticks)

    # --- per-second merge ---------------------------------------------------------
    def coverage(self, timeout: float = 5.0) -> dict[str, Any]:
        """How evenly the users were asked so far, summed over the workers."""
        for child in self.children:
            child.coverage = AsyncResult()
        self.tell({"coverage": True})
        parts = [c.coverage.get(timeout=timeout) for c in self.children if c.coverage]
        return {"users": sum(p["users"] for p in parts), "never": sum(p["never"] for p in parts),
                "asks_min": min(p["asks_min"] for p in parts),
                "asks_max": max(p["asks_max"] for p in parts),
                "oldest_second": min(p["oldest_second"] for p in parts)}

    def receive(self, child: Child, record: dict[str, Any]) -> None:
        if "coverage" in record:
            if child.coverage is not None:
                child.coverage.set(record["coverage"])
            return
        child.last = record
        child.latency = Histogram(record.get("hist")).summary((50, 99))
        self.account(record)
        t = record["t"]
        late = self.finished.get(t)
        if late is not None:  # a worker later than the grace below: fold it in, no duplicate
            late.add(record)
            late.entry.update(self.entry(late))
            return
        self.seconds.setdefault(t, Second(t)).add(record)
        live = {c.index for c in self.children if c.running()}
        for s in sorted(self.seconds):
            sec = self.seconds[s]
            if live <= sec.reported or s <= t - 2:  # complete, or a dead/late worker's gap
                self.finish(self.seconds.pop(s))

    def account(self, record: dict[str, Any]) -> None:
        """Totals and statsd counters take every record as it comes."""
        for key in COUNTERS:
            self.totals[key] += record.get(key, 0)
        for code, n in record.get("results", {}).items():
            self.results[code] = self.results.get(code, 0) + n
            self.metrics.incr(f"results.{code}", n)
        self.hist.merge(record.get("hist", {}))
        for key in ("sent", "answered", "reconnects", "logins", "stalls"):
            self.metrics.incr(key, record.get(key, 0))
        self.metrics.incr("claims.sent", record.get("claims_sent", 0))
        self.metrics.incr("claims.granted", record.get("claims_granted", 0))

    def entry(self, sec: Second) -> dict[str, Any]:
        """The /stats record of a merged second."""
        latency = sec.hist.summary((50, 99))
        return {"second": sec.t, "target": self.target(sec.t), "connections": sec.connections,
                "results": sec.results, "latency_p50_ms": latency["p50"],
                "latency_p99_ms": latency["p99"], "lag_ms": sec.lag_ms, "hist": sec.hist.to_json(),
                **sec.counts}

    def finish(self, sec: Second) -> None:
        sec.entry = self.entry(sec)
        self.history.append(sec.entry)
        self.finished[sec.t] = sec
        self.finished.pop(sec.t - HISTORY, None)
        m = self.metrics
        for child in self.children:
            m.gauge(f"p{child.index}.connections", child.last.get("connections", 0))
            m.gauge(f"p{child.index}.restarts", child.restarts)
            for p in ("p50", "p99"):
                if child.latency.get(p) is not None:
                    m.gauge(f"p{child.index}.latency_{p}_ms", child.latency[p])
            if self.offset is not None:
                m.gauge(f"p{child.index}.clock_offset_ms", round(self.offset * 1000, 3))
            if "lag_ms" in child.last:
                m.gauge(f"p{child.index}.loop_lag_ms", child.last["lag_ms"])

    @property
    def connections(self) -> int:
        return sum(c.last.get("connections", 0) for c in self.children)

    def health(self) -> dict[str, Any]:
        """What ``/health`` answers besides the clock: connections, workers, restarts."""
        return {"connections": self.connections, "target_connections": self.n,
                "processes": len(self.children),
                "restarts": self.restarts()}

    def cpu_seconds(self) -> float:
        """User+system CPU of the agent and its live workers (for µs per request)."""
        total = 0.0
        pids = [None] + [c.proc.pid for c in self.children if c.proc is not None]
        for pid in pids:
            try:
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def stats(self, since: int = 0, hist: bool = False) -> dict[str, Any]:
        """What ``/stats`` answers (per-second latency histograms only with ``hist``)."""
        seconds = [r for r in self.history if r["second"] >= since] if since else \
            list(self.history)[-60:]
        if not hist:
            seconds = [{k: v for k, v in r.items() if k != "hist"} for r in seconds]
        return {
            "host": self.host, "host_index": self.host_index, "hosts": self.hosts,
            "time": time.time(), "qps": self.qps, "pacing": self.config.pacing,
            "ticks": self.config.ticks, "quiet_ms": self.config.quiet_ms,
            "users": [self.first, self.first + self.n - 1],
            "connections": self.connections, "target_connections": self.n,
            "per_second": seconds, "totals": self.totals, "results": self.results,
            "latency_ms": self.hist.summary((50, 90, 99, 99.9)),
            "clock_offset_ms": None if self.offset is None else round(self.offset * 1000, 3),
            "clock_rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "cpu_seconds": round(self.cpu_seconds(), 3),
            "processes": [{"index": c.index, "pid": c.proc.pid if c.proc else None,
                           "users": [self.first + c.begin, self.first + c.end - 1],
                           "connections": c.last.get("connections", 0),
                           "restarts": c.restarts, "loop_lag_ms": c.last.get("lag_ms"),
                           **c.latency} for c in self.children],
        }

    # --- clock, lifecycle -----------------------------------------------------------
    def measure_clock(self) -> None:
        """Keep ``offset`` = server clock - ours (HTTP /health time, RTT/2)."""
        raw = self.config.server_control
        if not raw:
            return
        address = settings._address(raw)
        while not self.stopping.is_set():
            try:
                self.offset, self.rtt = clock_offset(address)
            except (OSError, ValueError, KeyError) as exc:
                log.debug("clock offset from %s failed: %s", raw, exc)
            self.stopping.wait(CLOCK_INTERVAL)

    def check_sources(self) -> None:
        """Warn when a source address must carry more than half the ephemeral ports.

        Measured here (kernel 6.18, range 32768-60999): connect() picks even
        ports first, so past ~14,000 connections from one address to one
        server port each connect() scans the used half and the login rate
        falls from ~4,500/s to ~150/s. More ``--source`` addresses fix it.
        """
        try:
            with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
                low, high = map(int, fh.read().split())
        except (OSError, ValueError):
            return
        per_source = math.ceil(self.n / max(1, len(self.config.source)))
        if per_source > (high - low + 1) // 2:
            log.warning("%d connections per source address exceed half the ephemeral port "
                        "range %d-%d: connecting will crawl; add --source addresses",
                        per_source, low, high)

    def start(self) -> tuple[str, int]:  # type: ignore[override]
        self.check_sources()
        super().start()
        self.metrics.start()
        if self.config.statsd:  # packets and bytes per interface, once per host
            self.net = Metrics(f"hongbao.net.{sysmetrics.sanitize(self.host)}",
                               self.config.statsd)
            sysmetrics.start(self.net, gc=False, loop=False, net=True)
            self.net.start()
        gevent.spawn(self.measure_clock).name = "clock"
        api = build_api(self, self.config.token, self.config.allow)
        self.http = serve(api, self.config.client_control)
        return self.http.address

    def halt(self, reason: str) -> None:
        self.failed = reason
        log.error("halting: %s", reason)
        self.quit.set()

    def stop(self) -> None:
        """Tell every worker to stop, wait a bounded time, then kill the rest by PID."""
        if self.stopping.is_set():
            return
        super().stop()
        if getattr(self, "http", None) is not None:
            self.http.stop(timeout=1)
        self.metrics.stop()
        if self.net is not None:
            self.net.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m app.client``: run the agent until SIGTERM/SIGINT."""
    config = settings.parse("client", argv, description=__doc__.split("\n")[0])
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s client %(levelname)s %(message)s")
    agent = Agent(config)
    host, port = agent.start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, agent.quit.set)  # handlers only enqueue
    print(f"hongbao-client listening control={host}:{port} processes={len(agent.children)} "
          f"users={agent.first}-{agent.first + agent.n - 1} connections={agent.n}", flush=True)
    agent.quit.wait()
    agent.stop()
    sys.exit(EXIT_BOOT_ERROR if agent.failed else 0)


if __name__ == "__main__":
    main()
