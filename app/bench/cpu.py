"""CPU and memory of process groups and of the machine, read with psutil, for the benches."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _total(procs: list[psutil.Process], read: Callable[[psutil.Process], float]) -> float:
    """Sum of ``read(proc)`` over the processes still alive."""
    total = 0.0
    for proc in procs:
        try:
            total += read(proc)
        except psutil.NoSuchProcess:
            pass
    return total


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs`` so far (the ones still alive)."""
    return _total(procs, lambda p: sum(p.cpu_times()[:2]))


def machine_busy() -> float:
    """CPU seconds the whole machine spent not idle (all cores)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def rss_bytes(procs: list[psutil.Process]) -> int:
    """Resident memory of ``procs`` together."""
    return int(_total(procs, lambda p: p.memory_info().rss))


def wakeups(procs: list[psutil.Process]) -> int:
    """Voluntary context switches of ``procs`` so far: how often they slept and were woken."""
    return int(_total(procs, lambda p: p.num_ctx_switches().voluntary))


Mark = tuple[float, float, float, float, int, int]


def mark(server: list[psutil.Process], client: list[psutil.Process]) -> Mark:
    """(time, server CPU s, client CPU s, machine busy s, server wake-ups, client wake-ups)."""
    return (time.time(), cpu_seconds(server), cpu_seconds(client), machine_busy(),
            wakeups(server), wakeups(client))


def costs(start: Mark, end: Mark, requests: int) -> dict[str, float]:
    """CPU per request on each side, CPU shares, and wake-ups a second between two marks."""
    elapsed = max(end[0] - start[0], 1e-9)
    requests = requests or 1
    return {
        "server_cpu_us_per_request": round((end[1] - start[1]) / requests * 1e6, 1),
        "client_cpu_us_per_request": round((end[2] - start[2]) / requests * 1e6, 1),
        "server_cpu_percent": round(100 * (end[1] - start[1]) / elapsed),
        "client_cpu_percent": round(100 * (end[2] - start[2]) / elapsed),
        # of all cores: 100% means the machine had no CPU left to give
        "machine_cpu_percent": round(100 * (end[3] - start[3]) / elapsed
                                     / (os.cpu_count() or 1)),
        "server_wakeups_per_s": round((end[4] - start[4]) / elapsed),
        "client_wakeups_per_s": round((end[5] - start[5]) / elapsed),
    }
