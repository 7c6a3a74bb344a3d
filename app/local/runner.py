"""The local-fleet runner: start, query, snapshot and stop the processes of a run.

One way to run hongbao's processes on this machine, shared by the smoke run
(``app.local.smoke``), the benchmarks (``app.bench``) and the tests:

- ``Service`` starts a command in its own process group (its PID is the
  group's), waits for its ready line under a deadline (a process that hangs
  silently cannot hang the caller), and stops it by PID then process group.
- ``get_json`` / ``request_json`` read a control API.
- ``LocalFleet`` is a server plus simulated client hosts on loopback
  addresses; the smoke run and the scale bench are two configurations of it.
- ``snapshot`` records the server's cumulative ledger for one second.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from app.local.procs import stop_group

log = logging.getLogger("hongbao.runner")

ROOT = Path(__file__).resolve().parents[2]
SERVER_READY = re.compile(r"hongbao-server listening port=(\d+) control=([\d.]+):(\d+) sets=(\d+)")
CLIENT_READY = re.compile(r"hongbao-client listening control=([\d.]+):(\d+)")
START_TIMEOUT = 60.0  # seconds for a process to print its ready line
STOP_TIMEOUT = 10.0  # seconds a process has after SIGTERM before SIGKILL of its group


@dataclass
class Service:
    """A child process in its own process group, known by PID, stopped by PID then group.

    Its own group, not its own session: with the kernel's autogroup scheduling
    (``/proc/sys/kernel/sched_autogroup_enabled``, on by default) every session
    is a scheduling group with one equal share of the CPU, and nice values
    count only inside a group. Measured (200k connections, 30,000/s, 11 SETs,
    17 client agents each in a session of its own): the 11 SETs together got
    the share of one agent and waited 322 ms a second each for a CPU, while the
    niced clients waited less than they did. In the launcher's session nice
    means what it says.

    Its stdout is read for the ready line (and later lines, with ``read_line``)
    through the raw descriptor with a deadline; its stderr goes to ``log_path``.
    """

    name: str
    cmd: list[str]
    log_path: Path
    ready: re.Pattern[str]
    stdin: bool = False  # give it a pipe on stdin (else /dev/null)
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    match: re.Match[str] | None = None
    _pending: bytes = b""

    def start(self, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Start it and return the ready line's match; RuntimeError (and stopped) if none."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process (``wait_ready`` then waits for its ready line)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                self.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file,
                stdin=subprocess.PIPE if self.stdin else subprocess.DEVNULL,
                process_group=0, env=self.env)

    def wait_ready(self, timeout: float) -> re.Match[str]:
        """The ready line's match within ``timeout`` s; else it is stopped and RuntimeError."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.read_line(deadline - time.monotonic())
            if line is None:
                break
            self.match = self.ready.search(line)
            if self.match:
                return self.match
        code = self.stop()
        raise RuntimeError(f"{self.name} did not start within {timeout:.0f}s (exit {code}); "
                           f"see {self.log_path}:\n{tail(self.log_path)}")

    def read_line(self, timeout: float) -> str | None:
        """The next stdout line within ``timeout`` seconds; None on timeout or end of file."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 65536)
            if not data:
                return None
            self._pending += data
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode(errors="replace")

    def send_line(self, text: str) -> None:
        """Write one line to its stdin (a ``stdin=True`` service)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> int | None:
        """Its exit status once it has ended, else None."""
        return None if self.proc is None else self.proc.poll()

    def check(self) -> None:
        """RuntimeError when it has ended (a run must not go on without it)."""
        code = self.exited()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with {code}; see {self.log_path}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM by PID, a bounded wait, then SIGKILL of its process group. Idempotent."""
        proc = self.proc
        if proc is None:
            return None
        code = stop_group(proc, timeout, self.name)
        for pipe in (proc.stdout, proc.stdin):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        return code


def stop_services(services: Sequence[Service | None]) -> None:
    """Stop each service in turn; one that fails to stop does not spare the others."""
    for service in services:
        if service is not None:
            try:
                service.stop()
            except Exception:
                log.exception("stopping %s", service.name)


def tail(path: Path, chars: int = 3000) -> str:
    """The end of a log, for an error message."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def request_json(address: str, path: str, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    """GET a control API: (HTTP status, JSON body), also for 4xx/5xx answers."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body else {}


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


def server_command(journal_dir: Path, sets: int | str = 4, port: int = 0,
                   control: str = "127.0.0.1:0", extra: Sequence[str] = ()) -> list[str]:
    """``python -m app.server`` on loopback with the given SETs and journal."""
    return [sys.executable, "-m", "app.server", "--host", "127.0.0.1", "--port", str(port),
            "--control", control, "--sets", str(sets), "--journal-dir", str(journal_dir),
            *extra]


def client_command(server_port: int, users: tuple[int, int], sources: Sequence[str],
                   server_control: str = "", **flags: object) -> list[str]:
    """``python -m app.client`` for ``users`` (FIRST, LAST); ``flags`` become --flag value."""
    cmd = [sys.executable, "-m", "app.client", "--server", f"127.0.0.1:{server_port}",
           "--users", f"{users[0]}-{users[1]}", "--control", "127.0.0.1:0",
           "--source", ",".join(sources)]
    if server_control:
        cmd += ["--server-control", server_control]
    for name, value in flags.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def niced(cmd: list[str], nice: int) -> list[str]:
    """``cmd`` run at ``nice`` (unchanged at 0): co-located load yields to the server."""
    return ["nice", "-n", str(nice), *cmd] if nice else cmd


def host_sources(k: int, addresses: int) -> list[str]:
    """Source addresses of simulated host ``k``: 127.1.0.(k+1), 127.1.1.(k+1), ...

    One address per ``per_source`` connections keeps connect() off the
    crowded half of the ephemeral ports (README, "Client agent").
    """
    return [f"127.{1 + k // 250}.{i}.{k % 250 + 1}" for i in range(addresses)]


@dataclass
class LocalFleet:
    """A server and simulated client hosts on this machine, each a ``Service``."""

    run_dir: Path
    log_level: str = "info"
    statsd: str = ""
    server: Service | None = None
    clients: list[Service] = field(default_factory=list)
    port: int = 0
    server_api: str = ""
    sets: int = 0
    client_apis: list[str] = field(default_factory=list)

    def start_server(self, sets: int | str, extra: Sequence[str] = (),
                     timeout: float = START_TIMEOUT) -> None:
        shared = ["--log-level", self.log_level, *(["--statsd", self.statsd] if self.statsd
                                                   else [])]
        self.server = Service("server", server_command(self.run_dir / "journal", sets,
                                                       extra=[*extra, *shared]),
                              self.run_dir / "server.log", SERVER_READY)
        match = self.server.start(timeout)
        self.port = int(match.group(1))
        self.server_api = f"{match.group(2)}:{match.group(3)}"
        self.sets = int(match.group(4))

    def start_hosts(self, connections: int, hosts: int, per_source: int, name: str,
                    nice: int = 0, timeout: float = START_TIMEOUT, **flags: object) -> None:
        """``hosts`` agents sharing users 1..connections, each on its own addresses."""
        for k in range(hosts):
            first = 1 + k * connections // hosts
            last = (k + 1) * connections // hosts
            sources = host_sources(k, max(1, math.ceil((last - first + 1) / per_source)))
            cmd = client_command(self.port, (first, last), sources, self.server_api,
                                 host_name=f"{name}{k}", hosts=hosts, host_index=k, qps=0,
                                 log_level=self.log_level, **flags,
                                 **({"statsd": self.statsd} if self.statsd else {}))
            service = Service(f"client{k}", niced(cmd, nice), self.run_dir / f"client{k}.log",
                              CLIENT_READY)
            self.clients.append(service)
            match = service.start(timeout)
            self.client_apis.append(f"{match.group(1)}:{match.group(2)}")

    def services(self) -> list[Service]:
        return [s for s in (self.server, *self.clients) if s is not None]

    def check_alive(self) -> None:
        """RuntimeError naming the first of its processes that has ended."""
        for service in self.services():
            service.check()

    def stop(self) -> None:
        stop_services([*self.clients, self.server])

    def connections(self) -> int:
        """Connections logged in over every client host."""
        return sum(get_json(a, "/health", tries=3)["connections"] for a in self.client_apis)

    def set_total(self, total: int, at: int) -> None:
        """Every host sends its share of ``total`` SHAKEs a second from second ``at``."""
        for address in self.client_apis:
            get_json(address, f"/qps?total={total}&at={at}", tries=3)

    def start_envelopes(self, shake_rate: int, shake_sum: int, groups_rate: int,
                        groups_sum: int, max_recipients: int) -> None:
        """Shake envelopes and group envelopes (1..max_recipients shares) from now on."""
        get_json(self.server_api, f"/yaohongbao?qps={shake_rate}&sum={shake_sum}", tries=3)
        get_json(self.server_api, f"/fahongbao?qps={groups_rate}&sum={groups_sum}&min=1"
                                  f"&max={max_recipients}", tries=3)

    def server_stats(self, seconds: int, tries: int = 5, timeout: float = 10.0) -> dict:
        """The server's /stats, retried until every SET answered (or ``tries`` ran out)."""
        stats: dict = {}
        for _ in range(tries):
            stats = get_json(self.server_api, f"/stats?seconds={seconds}", timeout=timeout,
                             tries=tries)
            if stats.get("sets_up", stats.get("sets")) == stats.get("sets"):
                break
            time.sleep(1.0)
        return stats

    def snapshot(self, polled: dict[int, dict[str, Any]], phases: list, now: float,
                 timeout: float = 10.0) -> tuple[dict, dict, Any] | None:
        """``snapshot`` of this fleet's server, with both ends' CPU and memory."""
        assert self.server is not None
        return snapshot(self.server_api, polled, phases, now, timeout, self.server.pid,
                        tuple(c.pid for c in self.clients))

    def client_stats(self, since: int, timeout: float = 10.0) -> list[dict]:
        return [get_json(a, f"/stats?since={since}&hist=1", timeout=timeout, tries=3)
                for a in self.client_apis]


def process_figures(roots: list[int]) -> tuple[float, int]:
    """(CPU seconds, resident bytes) of the processes ``roots`` and all their children.

    One pass over ``/proc/*/stat`` (parent and CPU) for every root together,
    then ``statm`` of the members. Why: psutil's ``children()`` reads every
    process's stat for each root, and the bench takes this snapshot every
    second; at one million connections (17 agents, ~190 processes) that was
    ~3,000 reads and 40-50 ms of the bench's own CPU a second, counted in
    the box's figure.
    """
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ticks, rss, todo, seen = 0, 0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        ticks += stats[pid][1]
        rss += _resident_bytes(pid)
        todo.extend(children.get(pid, ()))
    return round(ticks / _CLOCK_TICKS, 3), rss


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, user + system CPU in clock ticks) of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:  # ended meanwhile
            continue
        # after the command's closing parenthesis (a name may hold spaces or ')'):
        # state ppid ... utime stime, fields 3, 4, 14 and 15 of proc(5)
        fields = raw[raw.rfind(b")") + 2:].split()
        try:
            out[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        except (IndexError, ValueError):
            continue
    return out


def _resident_bytes(pid: int) -> int:
    """Resident memory of ``pid`` as psutil reads it (``statm``); 0 once it has ended."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def host_counters() -> dict[str, dict[str, int]]:
    """This machine's packets and bytes in/out over all interfaces, cumulative.

    The smoke run's simulated hosts share this machine (and its loopback), so
    the run has one host to show: the one the server and the clients run on.
    """
    c = psutil.net_io_counters()
    return {socket.gethostname(): {"packets_in": c.packets_recv, "packets_out": c.packets_sent,
                                   "bytes_in": c.bytes_recv, "bytes_out": c.bytes_sent}}


def snapshot(server_api: str, polled: dict[int, dict[str, Any]], phases: list,
             now: float, timeout: float = 10.0, server_pid: int | None = None,
             client_pids: tuple[int, ...] = ()) -> tuple[dict, dict, Any] | None:
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
