"""Client agent costs, measured: CPU µs per request, idle CPU, bytes per connection, restart.

Run: ``make bench-client`` or ``python -m app.bench.client --users 19000
--qps 8000,15000 --seconds 10 [--restart] [--sources 127.1.0.9,127.1.0.10]``.

It starts a real server (4 SETs, loopback) and one client agent holding
``--users`` connections, waits for every login, then measures with psutil
over ``--seconds`` windows the user+system CPU of the agent and its workers:
first idle, then at each QPS (µs per request = CPU seconds / requests sent,
split into user and system). RSS per worker gives user-space bytes per
connection. With ``--restart`` it then stops the server with SIGTERM,
restarts it on the same port and reports how long the agent takes to get
every connection back and the most connect attempts it made in one second.
Everything it starts is stopped by PID on the way out.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from app import settings
from app.client.histogram import Histogram
from app.local.runner import (
    CLIENT_READY,
    SERVER_READY,
    Service,
    client_command,
    get_json,
    server_command,
)


def merged(rows: list[dict[str, Any]]) -> Histogram:
    total = Histogram()
    for row in rows:
        total.merge(row.get("hist", {}))
    return total


def cpu(procs: list[psutil.Process]) -> tuple[float, float]:
    user = system = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        user, system = user + t.user, system + t.system
    return user, system


class Bench:
    def __init__(self, args: settings.Config, work: Path) -> None:
        self.args = args
        self.work = work
        self.server: Service | None = None
        self.agent: Service | None = None
        self.port = 0

    def start_server(self) -> None:
        cmd = server_command(self.work / "journal", self.args.sets, self.port,
                             extra=["--shake-budget", "10000000"])
        self.server = Service("server", cmd, self.work / "server.log", SERVER_READY)
        self.port = int(self.server.start().group(1))

    def start_agent(self) -> str:
        a = self.args
        cmd = client_command(self.port, (1, a.users), a.source, qps=0,
                             connect_rate=a.connect_rate, pacing=a.pacing)
        self.agent = Service("agent", cmd, self.work / "agent.log", CLIENT_READY)
        match = self.agent.start()
        return f"{match.group(1)}:{match.group(2)}"

    def wait_connected(self, api: str, timeout: float = 120.0) -> float:
        started = time.time()
        while time.time() - started < timeout:
            if get_json(api, "/health")["connections"] >= self.args.users:
                return time.time() - started
            time.sleep(0.2)
        raise RuntimeError(f"not all {self.args.users} connections up in {timeout:.0f}s")

    def window(self, procs: list[psutil.Process], api: str) -> dict[str, Any]:
        """CPU rate over the window, divided by the request rate of its full seconds."""
        time.sleep(1.0 - time.time() % 1.0)  # start on a second boundary
        u0, s0 = cpu(procs)
        t0 = time.time()
        time.sleep(self.args.seconds)
        u1, s1 = cpu(procs)
        elapsed = time.time() - t0
        time.sleep(1.2)  # the window's last second reported
        stats = get_json(api, f"/stats?since={int(t0)}&hist=1")
        rows = [r for r in stats["per_second"] if r["second"] < int(t0 + elapsed)]
        rate = sum(r["sent"] for r in rows) / max(1, len(rows))
        user, system = (u1 - u0) / elapsed, (s1 - s0) / elapsed  # CPU seconds per second
        out = {"seconds": round(elapsed, 1), "sent_per_second": round(rate),
               "exact_seconds": sum(r["sent"] == r["target"] for r in rows),
               "ticks_skipped": sum(r.get("ticks_skipped", 0) for r in rows),
               "cpu_percent": round(100 * (user + system), 1)}
        if rate:
            out.update(us_per_request=round((user + system) / rate * 1e6, 1),
                       user_us=round(user / rate * 1e6, 1),
                       system_us=round(system / rate * 1e6, 1),
                       latency_ms=merged(rows).summary((50, 99, 99.9)))
        return out

    def restart(self, api: str) -> dict[str, Any]:
        lost = time.time()
        assert self.server is not None
        self.server.stop()
        time.sleep(2.0)
        self.start_server()
        back = time.time()
        self.wait_connected(api)
        done = time.time()
        time.sleep(1.2)
        rows = get_json(api, f"/stats?since={int(lost)}")["per_second"]
        return {"down_seconds": round(back - lost, 1),
                "all_back_after_server_returned_s": round(done - back, 1),
                "max_connects_per_second": max((r["connects"] for r in rows), default=0),
                "max_logins_per_second": max((r["logins"] for r in rows), default=0)}

    def run(self) -> dict[str, Any]:
        a = self.args
        self.start_server()
        api = self.start_agent()
        login = self.wait_connected(api)
        assert self.agent is not None and self.agent.proc is not None
        master = psutil.Process(self.agent.proc.pid)
        procs = [master, *master.children()]
        time.sleep(2)
        result: dict[str, Any] = {"users": a.users, "workers": len(procs) - 1,
                                  "login_seconds": round(login, 1),
                                  "idle": self.window(procs, api), "loaded": []}
        rss = [p.memory_info().rss for p in procs[1:]]
        result["worker_rss_mb"] = [round(r / 2**20, 1) for r in rss]
        for qps in a.qps:
            get_json(api, f"/qps?qps={qps}")
            time.sleep(2)
            result["loaded"].append({"qps": qps, **self.window(procs, api)})
        get_json(api, "/qps?qps=0")
        if a.restart:
            result["restart"] = self.restart(api)
        return result

    def stop(self) -> None:
        for service in (self.agent, self.server):
            if service is not None:
                service.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m app.bench.client``: print the agent's measured costs as lines and JSON."""
    args = settings.parse("client_bench", argv, description=__doc__.splitlines()[0])
    work = Path(tempfile.mkdtemp(prefix="hongbao-client-bench-"))
    bench = Bench(args, work)
    try:
        result = bench.run()
    finally:
        bench.stop()
    idle = result["idle"]
    print(f"agent with {result['users']} connections on {result['workers']} worker(s): "
          f"logged in in {result['login_seconds']}s, idle CPU {idle['cpu_percent']}% of a core, "
          f"worker RSS {result['worker_rss_mb']} MB")
    for row in result["loaded"]:
        print(f"qps {row['qps']:>6}: sent {row['sent_per_second']}/s ({row['exact_seconds']} "
              f"exact seconds, {row['ticks_skipped']} ticks skipped), CPU {row['cpu_percent']}%, "
              f"{row.get('us_per_request')} µs/request (user {row.get('user_us')}, system "
              f"{row.get('system_us')}), latency {row.get('latency_ms')}")
    if "restart" in result:
        print(f"server restart: {result['restart']}")
    print(json_line(result))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def json_line(result: dict[str, Any]) -> str:
    import json

    return json.dumps(result, separators=(",", ":"))


if __name__ == "__main__":
    sys.exit(main())
