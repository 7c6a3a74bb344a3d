"""Benchmarks that print figures: ``server`` (per connection, per shake) and ``scale``.

Run it::

    python -m app.bench server --connections 5000 --qps 50000 --seconds 10
    python -m app.bench scale --connections 1000000 --hosts 17   # see app.bench.scale

``server`` loads one hongbao SET and, in the same run, a plain gevent
StreamServer (a greenlet per connection) from a separate load process with
identical client cost, and prints side by side: server RSS bytes per idle
logged-in connection, server CPU microseconds per shake, answers/s and
latency — plus the ratio, which stays stable on a noisy machine when the
absolute figures do not.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from app import settings
from app.bench.floor import syscall_floor
from app.local.runner import SERVER_READY, Service, get_json, server_command

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def process(name: str, cmd: list[str], ready: str, work: Path, timeout: float = 60.0):
    """Start ``cmd`` as a runner ``Service`` (stdin piped); yield it and its ready match."""
    service = Service(name, cmd, work / f"{name}.log", re.compile(ready), stdin=True)
    try:
        yield service, service.start(timeout)
    finally:
        service.stop()


def rss(pids: list[int]) -> int:
    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


def cpu(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pids``."""
    user = system = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        user += t.user
        system += t.system
    return user, system


def measure(port: int, pids: list[int], args: settings.Config, work: Path) -> dict:
    """Connect the load process, measure idle bytes per connection, then CPU per shake."""
    time.sleep(0.5)
    rss_empty = rss(pids)
    load_cmd = [sys.executable, "-m", "app.bench.load", "--port", str(port),
                "--connections", str(args.connections), "--qps", str(args.qps),
                "--seconds", str(args.seconds)]
    with process("load", load_cmd, r"ready (\d+)", work, timeout=120) as (load, match):
        logged_in = int(match.group(1))
        time.sleep(1.0)
        rss_idle = rss(pids)
        cpu_before = cpu(pids)
        load_before = cpu([load.pid])
        load.send_line("go")
        line = load.read_line(args.seconds + 120)
        if line is None:
            raise RuntimeError(f"the load process gave no result (exit {load.exited()})")
        result = json.loads(line)
        cpu_after = cpu(pids)
        load_cpu = sum(cpu([load.pid])) - sum(load_before)
    user, system = (after - before for after, before in zip(cpu_after, cpu_before, strict=True))
    answered = max(result["answered"], 1)
    return {
        "connections": logged_in,
        "rss_empty_mb": round(rss_empty / 2**20, 1),
        "bytes_per_connection": round((rss_idle - rss_empty) / max(logged_in, 1)),
        "cpu_us_per_shake": round((user + system) / answered * 1e6, 2),
        "user_us_per_shake": round(user / answered * 1e6, 2),
        "system_us_per_shake": round(system / answered * 1e6, 2),
        "answered_per_s": round(result["answered"] / args.seconds),
        "load_us_per_shake": round(load_cpu / answered * 1e6, 2),
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "sent": result["sent"],
        "answered": result["answered"],
    }


def bench_server(args: settings.Config) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "app.server", "--host", "127.0.0.1", "--port", "0",
               "--control", "127.0.0.1:0", "--sets", "1", "--journal-dir", tmp,
               "--shake-budget", str(10 * args.qps), "--log-level", "warning"]
        work = Path(tmp)
        cmd = server_command(work / "journal", 1, extra=[
            "--shake-budget", str(10 * args.qps), "--log-level", "warning",
            "--durability", args.durability])
        with process("server", cmd, SERVER_READY.pattern, work) as (_, match):
            port, control = int(match.group(1)), f"{match.group(2)}:{match.group(3)}"
            set_pid = get_json(control, "/stats")["per_set"][0]["pid"]
            if args.grant:  # a supply to match the offer: every batch journals its grants
                supply = int(args.qps * (args.seconds + 60))
                get_json(control, f"/yaohongbao?qps={args.qps}&sum={supply}")
            results["hongbao SET"] = measure(port, [set_pid], args, work)
        cmd = [sys.executable, "-m", "app.bench.baseline", "--port", "0"]
        with process("baseline", cmd, r"port=(\d+)", work) as (baseline, match):
            results["gevent StreamServer"] = measure(int(match.group(1)), [baseline.pid], args,
                                                     work)
    return results


def print_table(results: dict, args: settings.Config) -> None:
    names = list(results)
    rows = ["connections", "bytes_per_connection", "cpu_us_per_shake", "user_us_per_shake",
            "system_us_per_shake", "load_us_per_shake", "answered_per_s",
            "p50_ms", "p99_ms", "rss_empty_mb"]
    print(f"\nserver benchmark: {args.connections} connections, {args.qps} shakes/s offered, "
          f"{args.seconds:g} s, one process each, load from a separate process, "
          f"journal durability {args.durability}"
          f"{', every shake granted an envelope' if args.grant else ''}")
    floor = syscall_floor()
    print(f"syscall floor (read 16 B + write 28 B on loopback, no logic): "
          f"{floor['cpu_us_per_shake']} us per shake")
    results_floor = floor["cpu_us_per_shake"]
    print(f"{'':24}" + "".join(f"{n:>22}" for n in names) + f"{'ratio':>10}")
    for row in rows:
        values = [results[n][row] for n in names]
        ratio = (f"{values[0] / values[1]:.2f}" if len(values) == 2 and values[1] else "")
        print(f"{row:24}" + "".join(f"{v:>22}" for v in values) + f"{ratio:>10}")
    for name in names:
        over = results[name]["cpu_us_per_shake"] - results_floor
        print(f"{name}: {over:.2f} us per shake above the syscall floor")
        results[name]["us_above_floor"] = round(over, 2)
    results["syscall floor"] = floor


def main(argv: list[str] | None = None) -> int:
    """``python -m app.bench server ...`` (settings: table [server_bench])."""
    args = settings.parse("server_bench", sys.argv[1:] if argv is None else argv,
                          description=__doc__.splitlines()[0])
    results = bench_server(args)
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
