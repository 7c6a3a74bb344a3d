"""How much the stack costs, and whether it loses counts, at a given statsd update rate.

How to run (bounded: --seconds of load, then at most ~20 s of checking)::

    python -m monitor.bench                       # 60,000 updates/s for 20 s, own stack
    python -m monitor.bench --rate 20000 --names 200 --seconds 10
    python -m monitor.bench --running             # against `monitor.stack up`'s stack
    python -m monitor.bench --aggregate 25        # 25 processes' Metrics, as deployed

A sender process packs statsd lines into datagrams of <= 512 bytes (as the
``statsd`` package's pipeline does) and sends them paced in 100 ticks a
second to 127.0.0.1 only. ``--names`` counters share the rate (each name
gets the same number of updates) and ``--gauges`` gauges are set once per
tick. While it runs, the daemons' CPU time and resident memory are sampled
with psutil (gunicorn's workers included); afterwards Graphite's
per-second series must sum to exactly the updates sent.

This is the worst case: a hongbao process aggregates first and sends a
few hundred lines a second whatever its request rate (app.metrics.statsd), so
60,000 shakes/s reach statsd as ~1-2 thousand lines/s.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import psutil

from monitor.stack import Ports, Stack, fetch_series, running_stack

TICKS = 100  # sends per second
DATAGRAM = 512  # bytes, the statsd package's default maxudpsize


def datagrams(lines: list[str]) -> list[bytes]:
    """Pack lines into datagrams of at most DATAGRAM bytes."""
    out, current = [], ""
    for line in lines:
        if current and len(current) + 1 + len(line) > DATAGRAM:
            out.append(current.encode())
            current = ""
        current = f"{current}\n{line}" if current else line
    if current:
        out.append(current.encode())
    return out


def send_load(address: tuple[str, int], rate: int, names: int, gauges: int,
              seconds: float, prefix: str) -> dict[str, int]:
    """Send rate counter updates a second for seconds; return updates sent per name."""
    per_tick = rate // TICKS
    sent = dict.fromkeys(range(names), 0)
    # Each tick updates names round-robin, one line per update ("c<i>:1|c").
    order = [f"{prefix}.c{i}:1|c" for i in range(names)]
    gauge_lines = [f"{prefix}.g{i}:{i}|g" for i in range(gauges)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    start = time.time()
    cursor = 0
    tick = 0
    while True:
        due = start + tick / TICKS
        if due >= start + seconds:
            break
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        lines = []
        for _ in range(per_tick):
            lines.append(order[cursor])
            sent[cursor] += 1
            cursor = (cursor + 1) % names
        for payload in datagrams(lines + gauge_lines):
            sock.sendto(payload, address)
        tick += 1
    sock.close()
    return {f"{prefix}.c{i}": n for i, n in sent.items()}


def send_aggregated(address: tuple[str, int], rate: int, names: int, processes: int,
                    seconds: float, prefix: str) -> dict[str, int]:
    """The real shape: `processes` app.metrics.Metrics objects count rate events a second
    between them in memory and each flushes one batch a second (as SETs and agents do)."""
    import gevent

    from app.metrics.statsd import Metrics

    per_tick = max(1, rate // TICKS // processes)
    sent = dict.fromkeys(range(names), 0)
    metrics = [Metrics(prefix, f"{address[0]}:{address[1]}") for _ in range(processes)]

    def one(k: int, m: Metrics) -> None:
        start, tick, cursor = time.time(), 0, k % names
        while start + tick / TICKS < start + seconds:
            gevent.sleep(max(0.0, start + tick / TICKS - time.time()))
            for _ in range(per_tick):
                m.incr(f"c{cursor}")
                sent[cursor] += 1
                cursor = (cursor + 1) % names
            m.gauge(f"p{k}.connections", 19_000)
            tick += 1

    for m in metrics:
        m.start()
    gevent.joinall([gevent.spawn(one, k, m) for k, m in enumerate(metrics)])
    for m in metrics:
        m.stop()
    return {f"{prefix}.c{i}": n for i, n in sent.items()}


def sample(stack: Stack) -> dict[str, tuple[float, int]]:
    """{component: (cpu seconds, rss bytes)} over each daemon's whole process group."""
    out = {}
    for name, pid in stack.pids.items():
        try:
            procs = [psutil.Process(pid)]
            procs += procs[0].children(recursive=True)
            cpu = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
            rss = sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            cpu, rss = 0.0, 0
        out[name] = (cpu, rss)
    return out


def udp_receive_drops() -> int:
    """The kernel's count of UDP datagrams dropped for a full receive buffer (all sockets)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["RcvbufErrors"])


def run(stack: Stack, rate: int, names: int, gauges: int, seconds: float,
        aggregate: int = 0) -> dict:
    prefix = f"bench{int(time.time())}"
    start = int(time.time()) - 1
    drops = udp_receive_drops()
    load = psutil.getloadavg()[0]
    before = sample(stack)
    t0 = time.monotonic()
    address = ("127.0.0.1", stack.ports.statsd_port)
    if aggregate:
        sent = send_aggregated(address, rate, names, aggregate, seconds, prefix)
    else:
        sent = send_load(address, rate, names, gauges, seconds, prefix)
    elapsed = time.monotonic() - t0
    after = sample(stack)
    drops = udp_receive_drops() - drops
    expected = sum(sent.values())
    target = f"sumSeries(stats.counters.{prefix}.c*.count)"
    got = 0.0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        series = fetch_series(stack.graphite_url, target, start, int(time.time()) + 5)
        got = sum(v for s in series for v, _ in s["datapoints"] if v is not None)
        if got >= expected:
            break
        time.sleep(1)
    whisper = stack.root / "storage" / "whisper" / "stats" / "counters" / prefix
    return {
        "rate_per_s": rate, "names": names, "gauges": gauges, "seconds": round(elapsed, 2),
        "shape": f"aggregated by {aggregate} Metrics objects" if aggregate else "raw lines",
        "updates_sent": expected, "updates_in_graphite": int(got), "exact": got == expected,
        "cpu_percent": {n: round(100 * (after[n][0] - before[n][0]) / elapsed, 1)
                        for n in after},
        "rss_mib": {n: round(after[n][1] / 2**20, 1) for n in after},
        "udp_datagrams_dropped": drops, "load_average_1min": round(load, 1),
        "whisper_files": sum(1 for _ in whisper.rglob("*.wsp")) if whisper.exists() else 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitor.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=60_000, help="counter updates per second")
    parser.add_argument("--names", type=int, default=500, help="distinct counter names")
    parser.add_argument("--gauges", type=int, default=100, help="gauges set every tick")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--aggregate", type=int, default=0, metavar="N",
                        help="count in N app.metrics.Metrics objects, flushed once a second")
    parser.add_argument("--running", action="store_true",
                        help="use the stack `python -m monitor.stack up` started")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 300 or not 0 < args.rate <= 500_000:
        parser.error("keep it bounded: 0 < seconds <= 300, 0 < rate <= 500000")
    if args.running:
        stack = running_stack()
        if stack is None:
            print("monitor.bench: no running stack (python -m monitor.stack up)", file=sys.stderr)
            return 1
        print(json.dumps(run(stack, args.rate, args.names, args.gauges, args.seconds,
                             args.aggregate), indent=1))
        return 0
    with tempfile.TemporaryDirectory(prefix="hongbao-monitor-bench-") as tmp:
        stack = Stack(root=Path(tmp), ports=Ports.free(), retentions="1s:1h")
        stack.up()
        try:
            result = run(stack, args.rate, args.names, args.gauges, args.seconds,
                         args.aggregate)
        finally:
            stack.down()
    print(json.dumps(result, indent=1))
    return 0 if result["exact"] else 2


if __name__ == "__main__":
    sys.exit(main())
